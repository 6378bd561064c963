"""Orbax checkpoints of FUSION params, written one tensor (one layer) at a time.

Layout of a converted folder:
  DIR/fusion_config.json   FusionConfig.to_json()
  DIR/params/              an Orbax PyTree checkpoint (zarr3, non-OCDBT) of our nested param
                           dict, one array per parameter, layers stacked on axis 0
  DIR/hf_config.json       the reference config.json it came from (to write it back exactly)
  DIR/hf_vision_config.json  vision_config.json when there was one
  DIR/tokenizer/           tokenizer files, copied through

Why tensorstore directly: Orbax's own save wants every array of the tree in host memory
at once (and a stacked 8B MLP weight alone is ~24% of the checkpoint). Here each stacked
parameter is created as a zarr3 array chunked one layer per chunk and filled layer by
layer, so host memory holds one per-layer tensor at a time. The metadata files are the
ones `PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True)` writes, so the folder
restores with stock Orbax (`ocp.PyTreeCheckpointer` / `StandardCheckpointer`) onto any
sharding; `restore_params_tree` below does that from an abstract target.
"""
from __future__ import annotations

import json
import time

import numpy as np
from etils import epath

from fusion_jax import paths
from fusion_jax.convert.st_io import cast_checked, is_float, np_dtype

PARAMS = "params"
CONFIG = "fusion_config.json"
HF_CONFIG = "hf_config.json"
HF_VISION_CONFIG = "hf_vision_config.json"
TOKENIZER = "tokenizer"
_CHUNK_BYTES = 256 * 2**20
_TS_CONTEXT = {"cache_pool": {"total_bytes_limit": 0}, "file_io_concurrency": {"limit": 4}}


def is_orbax_dir(path: str) -> bool:
    return paths.isfile(paths.join(path, CONFIG)) and paths.isdir(paths.join(path, PARAMS))


def _kvstore(path: str):
    """TensorStore's kvstore for a local folder or a gs:// URL (its gcs driver)."""
    return path.rstrip("/") + "/" if paths.is_url(path) else {"driver": "file", "path": path}


def _zarr_dtype(dt: np.dtype) -> str:
    return "bfloat16" if dt == np_dtype("bfloat16") else dt.name


def _chunk_shape(shape, itemsize, stacked):
    chunk = list(shape)
    if stacked and chunk:
        chunk[0] = 1
    # split the next axis until a chunk is at most _CHUNK_BYTES (bounds memory on restore too)
    ax = 1 if stacked else 0
    while ax < len(chunk) and int(np.prod(chunk, dtype=np.int64)) * itemsize > _CHUNK_BYTES and chunk[ax] > 1:
        chunk[ax] = (chunk[ax] + 1) // 2
    return chunk


class ParamWriter:
    """Create one zarr3 array per parameter; fill it whole or one layer at a time."""

    def __init__(self, folder: str):
        import tensorstore as ts
        self.ts = ts
        self.dir = paths.join(folder, PARAMS)
        epath.Path(self.dir).mkdir(parents=True, exist_ok=True)
        self.ctx = ts.Context(_TS_CONTEXT)
        self.meta = {}        # dotted name -> (shape, chunk)

    def create(self, name: str, shape, dtype, *, stacked: bool = False):
        """A zarr3 array; `stacked` chunks it one layer (axis 0 entry) per chunk."""
        shape, dt = tuple(shape), np.dtype(dtype)
        chunk = [max(c, 1) for c in _chunk_shape(shape, dt.itemsize, stacked)]
        spec = {
            "driver": "zarr3",
            "kvstore": _kvstore(paths.join(self.dir, name)),
            "metadata": {
                "shape": list(shape), "data_type": _zarr_dtype(dt),
                "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": chunk}},
                "chunk_key_encoding": {"name": "default"},
                "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                "fill_value": 0, "node_type": "array",
            },
            "create": True, "delete_existing": True, "store_data_equal_to_fill_value": True,
        }
        self.meta[name] = (list(shape), chunk)
        return self.ts.open(spec, context=self.ctx).result()

    def finish(self):
        tree = {}
        arrays = []
        for name, (shape, chunk) in self.meta.items():
            keys = name.split(".")
            tree[str(tuple(keys))] = {
                "key_metadata": [{"key": k, "key_type": 2} for k in keys],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False, "write_shape": shape},
            }
            arrays.append({"array_metadata": {"param_name": name, "write_shape": shape, "chunk_shape": chunk,
                                              "ext_metadata": None}})
        meta = {"tree_metadata": tree, "use_ocdbt": False, "use_zarr3": True,
                "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        d = epath.Path(self.dir)
        (d / "_METADATA").write_text(json.dumps(meta))
        (d / "array_metadatas").mkdir(parents=True, exist_ok=True)
        (d / "array_metadatas" / "process_0").write_text(json.dumps({"array_metadatas": arrays}))
        now = time.time_ns()
        (d / "_CHECKPOINT_METADATA").write_text(json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.pytree_checkpoint_handler.PyTreeCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {}}))


class ParamReader:
    """Read stored parameters (or single layers of stacked ones) as numpy, exact bits."""

    def __init__(self, folder: str):
        import tensorstore as ts
        self.ts = ts
        self.dir = paths.join(folder, PARAMS)
        meta = json.loads((epath.Path(self.dir) / "_METADATA").read_text())
        self.names = [".".join(k["key"] for k in v["key_metadata"]) for v in meta["tree_metadata"].values()]
        self.ctx = ts.Context(_TS_CONTEXT)
        self._open = {}

    def array(self, name):
        if name not in self._open:
            if name not in self.names:
                raise KeyError(name)
            spec = {"driver": "zarr3", "kvstore": _kvstore(paths.join(self.dir, name))}
            self._open[name] = self.ts.open(spec, context=self.ctx, open=True, read=True).result()
        return self._open[name]

    def shape(self, name):
        return tuple(self.array(name).shape)

    def dtype(self, name):
        return np.dtype(self.array(name).dtype.numpy_dtype)

    def get(self, name, layer=None) -> np.ndarray:
        a = self.array(name)
        return np.asarray(a.read().result() if layer is None else a[layer].read().result())


def read_fusion_config(folder: str):
    from fusion_jax.config import FusionConfig
    return FusionConfig.from_dict(json.loads((epath.Path(folder) / CONFIG).read_text()))


def nest(flat: dict) -> dict:
    out = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def flatten(tree: dict, prefix="") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def restore_params_tree(folder: str, abstract: dict) -> dict:
    """The nested `params/` tree of a folder (converted model or train step dir), restored onto
    the shardings carried by `abstract` (jax.ShapeDtypeStruct leaves). Stock Orbax does the
    reading; each host reads only its shards."""
    import jax
    import orbax.checkpoint as ocp
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(
        sharding=getattr(s, "sharding", None), dtype=s.dtype, global_shape=s.shape), abstract)
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_zarr3=True))
    return ckptr.restore(paths.absolute(paths.join(folder, PARAMS)),
                         args=ocp.args.PyTreeRestore(item=abstract, restore_args=restore_args))


def param_problems(reader: ParamReader, shapes: dict) -> list[str]:
    """Every missing, unexpected or mis-shaped stored parameter against `shapes` (name -> shape)."""
    problems = [f"missing parameter {n}" for n in sorted(set(shapes) - set(reader.names))]
    problems += [f"unexpected parameter {n}" for n in sorted(set(reader.names) - set(shapes))]
    return problems + [f"parameter {n} has shape {reader.shape(n)}, expected {tuple(shapes[n])}"
                       for n in sorted(set(shapes) & set(reader.names)) if reader.shape(n) != tuple(shapes[n])]


def load_orbax_model(folder: str, *, mesh=None, shardings=None, dtype=None, cfg=None, **overrides):
    """FusionForCausalLM from a converted folder, arrays placed directly on their shardings.

    shardings / mesh: as `fusion_jax.hf_io.param_shardings` (default: the default device).
    dtype: parameter dtype after loading (default: the config's param_dtype).
    cfg: the FusionConfig when it is not the folder's fusion_config.json (train step dirs).
    """
    import jax

    from fusion_jax.hf_io import CheckpointError, abstract_model, flat_state, param_shardings

    cfg = cfg or read_fusion_config(folder)
    model = abstract_model(cfg.replace(**overrides) if overrides else cfg)
    ours = flat_state(model)
    reader = ParamReader(folder)
    problems = param_problems(reader, {n: v.get_value().shape for n, v in ours.items()})
    if problems:
        raise CheckpointError(f"{folder}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    placed = param_shardings(model, mesh, shardings)
    abstract = {n: jax.ShapeDtypeStruct(v.get_value().shape, np_dtype(dtype) if dtype else v.get_value().dtype,
                                        sharding=placed[n]) for n, v in ours.items()}
    restored = flatten(restore_params_tree(folder, nest(abstract)))
    check_restore_casts(reader, restored)
    for n, arr in restored.items():
        ours[n].set_value(arr)
    return model


def check_restore_casts(reader: ParamReader, restored: dict):
    """Orbax casts on restore, where a value too large for the new dtype silently becomes inf:
    an array that gained infs is re-cast from the stored values on the host, which names it."""
    import jax.numpy as jnp
    for n, arr in restored.items():
        if reader.dtype(n) != arr.dtype and is_float(arr.dtype) and bool(jnp.isinf(arr).any()):
            cast_checked(reader.get(n), arr.dtype, f"{n} of {reader.dir}")
