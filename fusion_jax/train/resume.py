"""Resuming a run safely: the saved config must match (config drift), and a checkpoint that cannot be
restored is set aside for the previous good one instead of crashing or starting from scratch.

Workdir paths go through etils.epath, so a `gs://` workdir works as a local one.
"""
from __future__ import annotations

import json
import re
import time

import jax
import numpy as np
from etils import epath

from fusion_jax import paths
from fusion_jax.train.metrics import TrainingError, log

RUN_CONFIG = "config.json"
# Keys that change the logs, the checkpoint cadence, the guard rails or what is recomputed (remat),
# never the numbers a step computes or the data it sees.
FREE_KEYS = ("log_every", "checkpoint_every", "keep_checkpoints", "async_checkpoint", "tensorboard",
             "stop_after", "allow_config_change", "heldout_eval", "optim.max_nonfinite_steps",
             "data.max_skip_fraction", "data.synth.workers", "model.remat_policy", "model.vision_remat_policy")
# For data.source = "synth", prepare_data fills these from the workdir; data.synth describes the data.
SYNTH_FILLED = ("data.path", "data.image_folder", "data.tokenizer")


# ----------------------------------------------------------------------------- config drift

def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def config_changes(saved: dict, new: dict, *, resolved: bool = True) -> tuple[list[str], list[str]]:
    """('key: old -> new' lines that change the run, lines that may differ freely), dotted keys, sorted.
    `resolved`: new's total_steps is final (prepare_data turns -1 into one epoch's steps)."""
    old_f, new_f = _flatten(saved), _flatten(new)
    ignore = set(SYNTH_FILLED) if old_f.get("data.source") == new_f.get("data.source") == "synth" else set()
    if not resolved and new_f.get("total_steps") == -1:
        ignore.add("total_steps")
    run, free = [], []
    for k in sorted((old_f.keys() | new_f.keys()) - ignore):
        a, b = old_f.get(k, "(absent)"), new_f.get(k, "(absent)")
        if a == b:
            continue
        grows = k == "total_steps" and isinstance(a, int) and isinstance(b, int) and b > a
        (free if grows or _is_free(k) else run).append(f"{k}: {a!r} -> {b!r}")
    return run, free


def has_checkpoint(workdir: str) -> bool:
    """A finished step folder under WORKDIR/checkpoints (Orbax's temp folders are not finished)."""
    d = epath.Path(workdir) / "checkpoints"
    return d.is_dir() and any(re.fullmatch(r"\d+", p.name) for p in d.iterdir())


def _saved_config(path: epath.Path, allow: bool) -> dict | None:
    """The saved config; None when allowed to replace an unreadable one."""
    try:
        saved = json.loads(path.read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"a JSON {type(saved).__name__}, not an object")
        return saved
    except (ValueError, UnicodeDecodeError) as e:
        if not allow:
            raise ValueError(f"config.allow_config_change: {path} (the resumed run's config) is not valid JSON "
                             f"({e}); fix it, or pass --config.allow_config_change=True to replace it") from e
        return None


def check_config_drift(tc, workdir: str, *, resolved: bool = True) -> list[str]:
    """When resuming, compare the config with WORKDIR/config.json: a change that alters the run is a
    ValueError listing every such key (the saved config untouched) unless config.allow_config_change.
    Returns the allowed run changes; logs them (and the free ones) when `resolved`, the last check."""
    path = epath.Path(workdir) / RUN_CONFIG
    if not has_checkpoint(workdir):
        return []
    allow = bool(tc.get("allow_config_change", False))
    if not path.exists():
        if resolved:
            log(f"resuming without {path}: nothing to compare the config with")
        return []
    saved = _saved_config(path, allow)
    if saved is None:
        if resolved:
            log(f"allow_config_change: {path} is not valid JSON; replacing it (the old one is kept)")
        return [f"{RUN_CONFIG}: unreadable"]
    run, free = config_changes(saved, json.loads(tc.to_json_best_effort()), resolved=resolved)
    if run and not allow:
        first = run[0].split(":")[0]
        raise ValueError(f"config.{first}: resuming {workdir} with a config that differs from its {RUN_CONFIG} "
                         f"in {len(run)} key(s) that change the run: {'; '.join(run)}. Use the saved values or "
                         f"another --workdir; --config.allow_config_change=True resumes anyway")
    if resolved and run:
        log(f"allow_config_change: resuming with changed keys: {'; '.join(run)}")
    if resolved and free:
        log(f"config changes since the saved {RUN_CONFIG} (allowed): {'; '.join(free)}")
    return run


def save_run_config(tc, workdir: str, *, keep_old: bool):
    """Write WORKDIR/config.json whole (temp file then rename; one upload on a bucket); `keep_old`: the
    replaced one is kept as config.replaced-<UTC time>.json (an allowed config change)."""
    wd = epath.Path(workdir)
    path = wd / RUN_CONFIG
    if keep_old and path.exists():
        path.rename(wd / f"config.replaced-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json")
    paths.write_text_atomic(path, tc.to_json_best_effort(indent=2, sort_keys=True))


# ----------------------------------------------------------------------------- checkpoints

def remove_tmp_checkpoints(directory: str):
    """Process 0: delete the temp folders (`*.orbax-checkpoint-tmp*`) of a save that was interrupted,
    before the CheckpointManager reads the folder. Other processes skip temp folders anyway."""
    d = epath.Path(directory)
    if jax.process_index() != 0 or not d.is_dir():
        return
    tmp = sorted(p for p in d.iterdir() if ".orbax-checkpoint-tmp" in p.name)
    for p in tmp:
        p.rmtree() if p.is_dir() else p.unlink()
    if tmp:
        log(f"removed {len(tmp)} temp folder(s) of an interrupted save from {d}: {', '.join(p.name for p in tmp)}")


def _reason(e: BaseException) -> str:
    """The root cause's first line: Orbax wraps TensorStore's error (which names the file) in a vaguer one."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = str(e).strip().splitlines() or [""]
    return f"{type(e).__name__}: {lines[0][:400]}"


def _agree(err: str | None) -> str | None:
    """Every process falls back together: a failure on any process fails the step for all."""
    if jax.process_count() == 1:
        return err
    from jax.experimental import multihost_utils
    failed = multihost_utils.process_allgather(np.int32(err is not None))
    return err or ("failed on another process" if np.any(failed) else None)


def _attempt(fn):
    """(fn(), None), or (None, the reason it failed)."""
    try:
        return fn(), None
    except Exception as e:  # noqa: BLE001  (whatever the fault, the previous step is tried next)
        return None, _reason(e)


def restore_latest_good(ck, abstract_state, it):
    """(state, step) from the newest checkpoint that restores (data iterator included), None when the
    workdir has none. Newer ones that fail are named with their reason and set aside (never deleted);
    when none restores, a TrainingError names every step tried and nothing is moved.

    The hosts agree twice per step: first on this host's own data-iterator state (read with no
    cross-host step, so one host's torn file cannot leave the others in Orbax's restore barrier), then
    on the Orbax restore, whose failures (metadata, arrays) are met by every host that reads them."""
    failed = []
    for step in sorted(ck.all_steps(), reverse=True):
        _, err = _attempt(lambda s=step: it.set_state(ck.restore_data_state(s)))
        err = _agree(err)
        if err is None:
            out, err = _attempt(lambda s=step: ck.restore(s, abstract_state))
            err = _agree(err)
        if err is None:
            state, data_state, _ = out
            it.set_state(data_state)
            if failed:
                where = ck.set_aside([s for s, _ in failed])
                log(f"falling back to step {step}: moved the unrestorable step(s) "
                    f"{', '.join(str(s) for s, _ in failed)} to {where}")
            return state, step
        log(f"checkpoint {ck.directory}/{step} cannot be restored ({err}); trying the previous step")
        failed.append((step, err))
    if failed:
        raise TrainingError(f"no checkpoint in {ck.directory} can be restored: "
                            f"{'; '.join(f'step {s}: {r}' for s, r in failed)}. Nothing was moved or deleted; "
                            f"repair or remove them, or use another --workdir to start from scratch")
    return None
