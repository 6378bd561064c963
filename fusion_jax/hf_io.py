"""Read reference PyTorch/HF FUSION folders into our model (safetensors only, never pickle).

A folder holds `config.json` (model_type fusion_phi / fusion_llama / fusion_qwen),
optionally `vision_config.json`, and `model.safetensors` or shards listed in
`model.safetensors.index.json`. Tensors are read one at a time (`SafeReader`).
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable

import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.config import FusionConfig, from_hf_config, vision_config_from_hf
from fusion_jax.convert.st_io import CheckpointError, SafeReader, cast_checked, np_dtype
from fusion_jax.param_map import Row, hf_shape, param_table, to_ours


def read_config(folder: str, **overrides) -> FusionConfig:
    from etils import epath  # a local folder or a gs:// URL
    path = epath.Path(folder) / "config.json"
    if not path.exists():
        raise CheckpointError(f"{folder}: no config.json")
    d = json.loads(path.read_text())
    vpath = epath.Path(folder) / "vision_config.json"
    vision = vision_config_from_hf(json.loads(vpath.read_text())) if vpath.exists() else None
    try:
        cfg = from_hf_config(d, vision)
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return cfg.replace(**overrides) if overrides else cfg


class DictReader:
    """In-memory stand-in for SafeReader (tests, conversion of already-loaded tensors)."""

    def __init__(self, tensors: dict, folder: str = "<in-memory>"):
        self.tensors, self.folder = tensors, folder

    def keys(self):
        return self.tensors.keys()

    def shape(self, name):
        return tuple(np.shape(self.tensors[name]))

    def get(self, name):
        return np.asarray(self.tensors[name])


def check_names(rows: Iterable[Row], available: Iterable[str], shape_of: Callable, per_layer_shape):
    """Collect every missing, extra or mis-shaped tensor; raise one error naming all."""
    avail = set(available)
    want, problems = set(), []
    for r in rows:
        for n in r.hf_names():
            want.add(n)
            if n not in avail:
                problems.append(f"missing tensor {n}")
                continue
            exp = per_layer_shape(r)
            got = shape_of(n)
            if tuple(got) != tuple(exp):
                problems.append(f"tensor {n} has shape {tuple(got)}, expected {tuple(exp)}")
    extra = sorted(avail - want)
    problems += [f"unexpected tensor {n}" for n in extra]
    return problems


def abstract_model(cfg: FusionConfig):
    from fusion_jax.model import FusionForCausalLM
    return nnx.eval_shape(lambda: FusionForCausalLM(cfg, rngs=nnx.Rngs(0)))


def flat_state(model) -> dict[str, nnx.Variable]:
    _, state = nnx.split(model)
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def load_weights(model, reader, *, dtype=None, select: Callable[[Row], bool] | None = None):
    """Fill `model` (concrete or abstract) from HF tensors; returns the model.

    `select` loads a subset of the table (e.g. only the LLM) into a concrete model
    and ignores tensors outside it; without it every row must be present and
    every tensor used.
    """
    cfg = model.cfg
    rows = param_table(cfg)
    ours = flat_state(model)
    table_paths = {r.ours for r in rows}
    stray = sorted(set(ours) - table_paths)
    if stray:
        raise CheckpointError(f"parameters with no mapping row: {stray}")
    if select is not None:
        rows = [r for r in rows if select(r)]

    def per_layer(r):
        shp = ours[r.ours].get_value().shape
        shp = tuple(shp[1:]) if r.stack else tuple(shp)
        return hf_shape(r, shp, cfg)

    problems = check_names(rows, reader.keys(), reader.shape, per_layer)
    if select is not None:
        problems = [p for p in problems if not p.startswith("unexpected")]
    if problems:
        raise CheckpointError(f"{reader.folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    for r in rows:
        var = ours[r.ours]
        dt = np.dtype(dtype or var.get_value().dtype)
        parts = [cast_checked(to_ours(reader.get(n), r.transform), dt, n) for n in r.hf_names()]
        var.set_value(jnp.asarray(np.stack(parts) if r.stack else parts[0]))
    return model


def param_shardings(model, mesh=None, shardings=None) -> dict:
    """Dotted name -> Sharding for every parameter: `shardings` (dict, or callable(name, variable)),
    else the logical-axis rules on `mesh`, else the default device."""
    import jax

    from fusion_jax.convert.orbax_io import flatten
    from fusion_jax.sharding import logical_shardings
    ours = flat_state(model)
    if callable(shardings):
        return {n: shardings(n, v) for n, v in ours.items()}
    if shardings is not None:
        return dict(shardings)
    if mesh is not None:
        return flatten(logical_shardings(nnx.state(model), mesh))
    return dict.fromkeys(ours, jax.sharding.SingleDeviceSharding(jax.devices()[0]))


def from_pretrained(folder: str, *, mesh=None, shardings=None, dtype=None, **overrides):
    """Model from a reference HF folder (`fusion_jax.from_pretrained` also takes Orbax folders)."""
    import jax
    cfg = read_config(folder, **overrides)
    model = load_weights(abstract_model(cfg), SafeReader(folder, allow_bin=False),
                         dtype=np_dtype(dtype) if dtype else None)
    if mesh is not None or shardings is not None:
        ours = flat_state(model)
        for name, sh in param_shardings(model, mesh, shardings).items():
            ours[name].set_value(jax.device_put(ours[name].get_value(), sh))
    return model
