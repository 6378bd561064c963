"""`inspect DIR`: tensors, shapes, dtypes and the detected config of an HF or Orbax folder."""
from __future__ import annotations

import json

import numpy as np
from etils import epath

from fusion_jax.convert import orbax_io as oio
from fusion_jax.convert.st_io import SafeReader, np_dtype


def inspect_dir(path: str, out=print) -> dict:
    if oio.is_orbax_dir(path):
        cfg = oio.read_fusion_config(path)
        r = oio.ParamReader(path)
        rows = [(n, r.shape(n), str(r.dtype(n))) for n in sorted(r.names)]
        kind = "orbax"
    else:
        r = SafeReader(path)
        rows = [(n, r.shape(n), str(r.dtype(n))) for n in sorted(r.keys())]
        kind = "hf"
        try:
            from fusion_jax.hf_io import read_config
            cfg = read_config(path)
        except Exception as e:  # a plain LLM / SigLIP folder: show its config.json as is
            cfg = None
            out(f"(no FUSION config detected: {e})")
    total = 0
    for n, shp, dt in rows:
        nb = int(np.prod(shp, dtype=np.int64)) * np_dtype(dt).itemsize
        total += nb
        out(f"{n:80s} {str(list(shp)):22s} {dt}")
    out(f"{kind} folder {path}: {len(rows)} tensors, {total / 2**20:.1f} MiB")
    if cfg is not None:
        out(cfg.to_json())
    elif (epath.Path(path) / "config.json").is_file():
        out(json.dumps(json.loads((epath.Path(path) / "config.json").read_text()), indent=2))
    return {"kind": kind, "tensors": rows, "config": cfg, "total_bytes": total}
