"""Checkpoint loading for generation and evaluation: converted Orbax or reference HF folders,
and train.py step directories (WORKDIR/checkpoints/<step>, which `train/` writes and re-reads
through this module), plus the tokenizer folder that goes with each."""
from __future__ import annotations

import json
import re

from etils import epath

from fusion_jax import paths
from fusion_jax.convert.orbax_io import CONFIG, TOKENIZER, is_orbax_dir, load_orbax_model
from fusion_jax.convert.orbax_io import restore_params_tree as restore_params_tree

CKPT_DIR = "checkpoints"


def step_dir(ckpt_dir: str, step: int) -> str:
    return paths.join(ckpt_dir, str(int(step)))


def resolve_step_dir(path: str) -> str:
    """A workdir (-> its latest checkpoint), a checkpoints/ dir, or a step dir -> the step dir."""
    path = paths.absolute(path)
    if paths.isdir(paths.join(path, "params")):
        return path
    for d in (epath.Path(path) / CKPT_DIR, epath.Path(path)):
        if d.is_dir():
            steps = sorted(int(p.name) for p in d.iterdir()
                           if re.fullmatch(r"\d+", p.name) and (p / "params").is_dir())
            if steps:
                return step_dir(d, steps[-1])
    raise FileNotFoundError(f"{path}: no checkpoint (expected WORKDIR/checkpoints/<step>/params)")


def _workdir_file(step_path: str, name: str) -> str:
    return paths.join(epath.Path(step_path).parent.parent, name)


def read_model_config(step_path: str):
    """FusionConfig of a step dir: its fusion_config.json, else the workdir's, else meta/."""
    from fusion_jax.config import FusionConfig
    for c in (paths.join(step_path, CONFIG), _workdir_file(step_path, CONFIG)):
        if paths.isfile(c):
            return FusionConfig.from_dict(json.loads(epath.Path(c).read_text()))
    meta = epath.Path(step_path) / "meta" / "metadata"
    if meta.is_file():
        return FusionConfig.from_dict(json.loads(meta.read_text())["model_config"])
    raise FileNotFoundError(f"{step_path}: no {CONFIG}")


def tokenizer_dir_of(step_path: str) -> str | None:
    for c in (paths.join(step_path, TOKENIZER), _workdir_file(step_path, TOKENIZER)):
        if paths.isfile(paths.join(c, "tokenizer.json")):
            return c
    return None


def load_params(path: str, *, mesh=None, dtype: str | None = None, base: str | None = None, **overrides):
    """(model, cfg, tokenizer_dir) from a train workdir (latest step) or a step directory.

    The model is a concrete `FusionForCausalLM` (placed by the logical-axis rules on `mesh`
    when given, else on the default device); `cfg` its FusionConfig (with `overrides` applied,
    e.g. compute_dtype); `tokenizer_dir` the tokenizer folder saved with the run (None if none).
    A LoRA run's step dir loads its adapters onto `base` (default: lora.base of its config).
    """
    sd = resolve_step_dir(path)
    cfg = read_model_config(sd)
    if cfg.lora is not None:
        from fusion_jax.lora import load_adapter_model
        model = load_adapter_model(sd, base, mesh=mesh, **overrides)
        return model, model.cfg, tokenizer_dir_of(sd)
    model = load_orbax_model(sd, mesh=mesh, dtype=dtype, cfg=cfg, **overrides)
    return model, model.cfg, tokenizer_dir_of(sd)


def train_step_dir(ckpt: str) -> str | None:
    """The step dir when `ckpt` is a train.py workdir / checkpoints dir / step dir, else None."""
    if is_orbax_dir(ckpt):
        return None
    try:
        return resolve_step_dir(ckpt)
    except FileNotFoundError:
        return None


def find_tokenizer_dir(ckpt: str, tokenizer: str | None = None) -> str:
    cands = [tokenizer] if tokenizer else [ckpt, paths.join(ckpt, TOKENIZER)]
    step = None if tokenizer else train_step_dir(ckpt)
    if step is not None:
        cands.append(tokenizer_dir_of(step))
    for c in cands:
        if c and paths.isfile(paths.join(c, "tokenizer.json")):
            return c
    raise FileNotFoundError(f"no tokenizer.json in {' or '.join(c for c in cands if c)} (pass --tokenizer DIR)")


def load_model(ckpt: str, base: str | None = None, **overrides):
    """Orbax or HF folder, or a train.py workdir / step dir -> model (LoRA adapters: on `base`)."""
    if train_step_dir(ckpt) is not None:
        return load_params(ckpt, base=base, **overrides)[0]
    from fusion_jax import from_pretrained
    return from_pretrained(ckpt, base=base, **overrides)
