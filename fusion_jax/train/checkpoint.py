"""Checkpoints: Orbax CheckpointManager (async, keep-N) under WORKDIR/checkpoints/<step>.

Each step directory holds the items
    params/                 model parameters (PyTree, zarr3, no OCDBT: the converter's format)
    train/                  optimizer state, step and RNG key
    data/                   data-iterator state, one JSON file per process (grain's handler)
    meta/                   JSON: step, train config, model config
and, once finalized, `fusion_config.json` and `tokenizer/`, so a step directory is also a
converted Orbax model folder: `fusion_jax.from_pretrained(step_dir)` and `--config.init_from`
both accept it.

Reading them back (`load_params`, `resolve_step_dir`, ...) lives in `fusion_jax.generate.loading`.
"""
from __future__ import annotations

import json
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from fusion_jax import paths
from fusion_jax.generate.loading import (  # noqa: F401  (the read side lives in the model layer)
    CKPT_DIR,
    CONFIG,
    TOKENIZER,
    load_params,
    read_model_config,
    resolve_step_dir,
    restore_params_tree,
    step_dir,
    tokenizer_dir_of,
)
from fusion_jax.train.resume import remove_tmp_checkpoints

UNRESTORABLE = "unrestorable_checkpoints"  # WORKDIR/<this>/<step>: set aside by a resume, kept for a look


class _StateBox:
    """A data-iterator state snapshot in the shape grain's CheckpointHandler expects."""

    def __init__(self, state: Any = None):
        self.state = state

    def get_state(self) -> bytes:
        return json.dumps(self.state, indent=1).encode()

    def set_state(self, state: bytes):
        self.state = json.loads(state.decode() if isinstance(state, bytes) else state)

    def start_prefetch(self):
        pass


class _ParamsHandler(ocp.PyTreeCheckpointHandler):
    """zarr3 without OCDBT (the converter's format, read per array by convert/orbax_io). Orbax's
    finalize merges per-process OCDBT files whatever use_ocdbt says, and warns at every save that
    it found none: there is nothing to merge."""

    def finalize(self, directory):
        del directory


@ocp.args.register_with_handler(_ParamsHandler, for_save=True)
class _ParamsSave(ocp.args.PyTreeSave):
    pass


@ocp.args.register_with_handler(_ParamsHandler, for_restore=True)
class _ParamsRestore(ocp.args.PyTreeRestore):
    pass


def _handlers():
    import grain
    return {
        "params": _ParamsHandler(use_ocdbt=False, use_zarr3=True),
        "train": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with the FUSION train-state layout."""

    def __init__(self, workdir: str, *, keep: int = 2, every: int = 1000, async_save: bool = True,
                 model_config_json: str | None = None, tokenizer_dir: str | None = None, params_part=None):
        """`params_part(params)`: the part of the params a checkpoint stores (LoRA: adapters + full_train;
        restore then takes an abstract state of that part)."""
        self.params_part = params_part or (lambda p: p)
        self.workdir = paths.absolute(workdir)
        self.directory = paths.join(self.workdir, CKPT_DIR)
        self.model_config_json = model_config_json
        self.tokenizer_dir = tokenizer_dir
        remove_tmp_checkpoints(self.directory)
        opts = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=max(1, every),
                                            enable_async_checkpointing=async_save, create=True)
        self.mngr = ocp.CheckpointManager(self.directory, options=opts, item_handlers=_handlers())

    # ---------------------------------------------------------------- save
    def save(self, step: int, state: dict, data_state: Any, meta: dict, *, force: bool = False) -> bool:
        args = ocp.args.Composite(
            params=_ParamsSave(self.params_part(state["params"])),
            train=ocp.args.StandardSave({k: state[k] for k in ("opt_state", "step", "rng")}),
            data=_grain_save(_StateBox(data_state)),
            meta=ocp.args.JsonSave({**meta, "step": int(step)}),
        )
        saved = self.mngr.save(int(step), args=args, force=force)
        self.finalize_dirs()
        return saved

    def wait(self):
        self.mngr.wait_until_finished()
        self.finalize_dirs()

    def finalize_dirs(self):
        """Write fusion_config.json + tokenizer/ into finished step dirs (process 0 only)."""
        if jax.process_index() != 0 or not self.model_config_json:
            return
        for s in self.mngr.all_steps():
            d = epath.Path(step_dir(self.directory, s))
            if not d.is_dir() or (d / CONFIG).is_file():
                continue
            if self.tokenizer_dir and paths.isdir(self.tokenizer_dir):
                paths.copy_tree(self.tokenizer_dir, d / TOKENIZER)
            paths.write_text_atomic(d / CONFIG, self.model_config_json)

    # ---------------------------------------------------------------- restore
    def latest_step(self) -> int | None:
        return self.mngr.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.mngr.all_steps())

    def set_aside(self, steps) -> str:
        """Move step folders that cannot be restored out of the manager's sight (process 0; kept, never
        deleted, so a later save of the same step and keep-N do not meet them). Returns where."""
        dest = epath.Path(self.workdir) / UNRESTORABLE
        if jax.process_index() == 0:
            dest.mkdir(parents=True, exist_ok=True)
            for s in steps:
                target, n = dest / str(s), 1
                while target.exists():
                    target, n = dest / f"{s}.{n}", n + 1
                epath.Path(step_dir(self.directory, s)).rename(target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("fusion_set_aside")
        self.mngr.reload()
        return str(dest)

    def restore_data_state(self, step: int):
        """This host's data-iterator state of `step`, read by grain's handler from this host's own file
        with no cross-host step: a host that fails here leaves no other host waiting in a barrier."""
        import grain
        box = _StateBox()
        grain.checkpoint.CheckpointHandler().restore(epath.Path(step_dir(self.directory, step)) / "data", item=box)
        return box.state

    def restore(self, step: int, abstract_state: dict):
        """(state, data_state, meta) with arrays placed on the shardings of `abstract_state`
        (a tree of jax.ShapeDtypeStruct carrying .sharding)."""
        p_abs = abstract_state["params"]
        t_abs = {k: abstract_state[k] for k in ("opt_state", "step", "rng")}
        box = _StateBox()
        out = self.mngr.restore(int(step), args=ocp.args.Composite(
            params=_ParamsRestore(item=p_abs, restore_args=_restore_args(p_abs)),
            train=ocp.args.StandardRestore(t_abs),
            data=_grain_restore(box),
            meta=ocp.args.JsonRestore(),
        ))
        state = {"params": out["params"], **out["train"]}
        return state, box.state, out["meta"]

    def close(self):
        self.wait()
        self.mngr.close()


def _grain_save(item):
    import grain
    return grain.checkpoint.CheckpointSave(item)


def _grain_restore(item):
    import grain
    return grain.checkpoint.CheckpointRestore(item)


def _restore_args(abstract):
    return jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=getattr(s, "sharding", None),
                                                       dtype=s.dtype, global_shape=s.shape), abstract)
