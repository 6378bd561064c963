"""Mesh construction and the one logical-axis rules table.

Parameters carry `logical_axes` metadata (see `fusion_jax.nn`). `RULES` maps each
logical name to mesh axes of a ('data', 'fsdp', 'tensor') mesh. A mesh axis that
does not divide a dimension, or is already used by another dimension of the same
tensor, is dropped for that tensor (replicated) rather than failing.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

RULES: tuple[tuple[str, object], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("layers", None),
    ("lora_rank", "fsdp"),      # LoRA factors: lora_b has no embed axis; FSDP shards its rank
    ("norm", None),
    ("patch", None),
    ("patch_pos", None),
)


def resolve_mesh_shape(shape: Sequence[int], n_devices: int | None = None) -> tuple[int, ...]:
    """(data, fsdp, tensor) with at most one -1, filled from the device count."""
    n = n_devices or jax.device_count()
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh must have 3 axes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"mesh {shape}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
        if n % known:
            raise ValueError(f"mesh {shape}: {n} devices not divisible by {known}")
        shape[shape.index(-1)] = n // known
    if math.prod(shape) != n:
        raise ValueError(f"mesh {tuple(shape)} needs {math.prod(shape)} devices, have {n}")
    return tuple(shape)


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    devices = devices if devices is not None else jax.devices()
    shape = resolve_mesh_shape(shape, len(devices))
    arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)


def spec_for(axes: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh, rules=RULES) -> PartitionSpec:
    if not axes:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name, dim in zip(axes, shape, strict=False):  # fewer axes than dims: the rest replicate
        target = table.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        cand = (target,) if isinstance(target, str) else tuple(target)
        keep, size = [], 1
        for ax in cand:
            n = mesh.shape.get(ax, 1)   # meshes without this axis replicate over it
            if ax in used or n == 1 or dim % (size * n):
                continue
            keep.append(ax)
            size *= n
        used.update(keep)
        out.append(None if not keep else (keep[0] if len(keep) == 1 else tuple(keep)))
    return PartitionSpec(*out)


def logical_shardings(state: nnx.State, mesh: Mesh, rules=RULES) -> dict:
    """NamedSharding of every Variable of `state` (abstract or concrete) from its `logical_axes`,
    as a pure dict shaped like `nnx.to_pure_dict(state)`."""
    def one(v):
        return NamedSharding(mesh, spec_for(v.get_metadata().get("logical_axes"), v.get_value().shape, mesh, rules))
    return nnx.to_pure_dict(jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def shard_model(model, mesh: Mesh, rules=RULES):
    """Place a model's parameters on `mesh` according to the rules (in place)."""
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, jax.device_put(nnx.to_pure_dict(state), logical_shardings(state, mesh, rules)))
    nnx.update(model, state)
    return model


def constrain(x, *axes):
    """Activation sharding constraint by logical axes, active only under `jax.set_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def shard_batch(batch: dict, mesh: Mesh) -> dict:
    """This process's rows of every array of `batch` -> global arrays, batch axis over data x fsdp
    (replicated where the global batch does not divide). Pass only the arrays the model reads."""
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:] if v.ndim else ()
        spec = spec_for(("batch",) + (None,) * (v.ndim - 1), global_shape, mesh) if v.ndim else PartitionSpec()
        out[k] = jax.make_array_from_process_local_data(NamedSharding(mesh, spec), v)
    return out
