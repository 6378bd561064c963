"""Streaming safetensors I/O with exact bits (bf16 included) and no pickle.

`SafeReader`, the one checkpoint-file reader (conversion and `from_pretrained`), reads one
tensor at a time straight from the file (header parsed by hand, data read into a fresh
buffer, so host memory holds one tensor, not the checkpoint). `ShardedWriter` writes
tensors one at a time into pre-planned shards plus `model.safetensors.index.json`.
PyTorch `.bin` files are read only with `torch.load(weights_only=True, mmap=True)`, and
only when the caller allows them. `CheckpointError` is the one error for bad checkpoints.

Opening a file checks everything before reading data: the header length (capped at
MAX_HEADER_BYTES), every entry's dtype, shape and data_offsets (in order, the right size, inside
the file, no overlap), and that the shards and their index agree on where each tensor is.
`cast_checked` is the one dtype cast of conversion and loading: overflow to inf is an error.
"""
from __future__ import annotations

import json
import math
import os
import struct
from itertools import pairwise

import ml_dtypes
import numpy as np
from etils import epath

ST_TO_NP = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
}
NP_TO_ST = {v: k for k, v in ST_TO_NP.items()}


def np_dtype(name) -> np.dtype:
    """'bfloat16' / 'float32' / np dtype / safetensors code -> numpy dtype."""
    if isinstance(name, str) and name in ST_TO_NP:
        return ST_TO_NP[name]
    if isinstance(name, str) and name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be read as asked (every loader raises this)."""


def is_float(d) -> bool:
    d = np.dtype(d)
    return np.issubdtype(d, np.floating) or d == ST_TO_NP["BF16"]


def cast_checked(a: np.ndarray, dt, name: str) -> np.ndarray:
    """`a` as `dt`; a CheckpointError naming `name` when finite values would become inf
    (e.g. 1e6 cast to float16), never a silent overflow."""
    dt = np.dtype(dt)
    if a.dtype == dt:
        return a
    with np.errstate(over="ignore"):         # an overflow is reported below, naming the tensor
        out = a.astype(dt)
    if not is_float(dt) or not is_float(a.dtype) or np.isfinite(out).all():
        return out
    src = a.astype(np.float64)
    finite = np.isfinite(src)
    if (np.isinf(out) & finite).any():
        amax = float(np.abs(src[finite]).max())
        limit = float(ml_dtypes.finfo(dt).max)
        raise CheckpointError(f"tensor {name}: max |value| {amax:.6g} overflows {dt} (largest finite {limit:.6g}); "
                              f"keep a wider dtype (bfloat16 or float32)")
    return out


MAX_HEADER_BYTES = 100 * 2**20   # the safetensors library's own cap: a larger header is not one


class _StFile:
    def __init__(self, path):
        self.path = path
        size = epath.Path(path).stat().length
        with epath.Path(path).open("rb") as f:
            n = _header_len(path, f.read(8), size)
            header = _parse_header(path, f.read(n))
        self.metadata = header.pop("__metadata__", None) or {}
        self.base = 8 + n
        self.entries = header
        _check_spans(path, {k: _entry_span(path, k, e) for k, e in header.items()}, size - self.base)

    def shape(self, name):
        return tuple(self.entries[name]["shape"])

    def dtype(self, name):
        return ST_TO_NP[self.entries[name]["dtype"]]

    def nbytes(self, name):
        a, b = self.entries[name]["data_offsets"]
        return b - a

    def get(self, name) -> np.ndarray:
        e = self.entries[name]
        a, b = e["data_offsets"]
        dt = ST_TO_NP[e["dtype"]]
        buf = np.empty(b - a, np.uint8)
        with epath.Path(self.path).open("rb") as f:  # a local file or a gs:// object (ranged read)
            f.seek(self.base + a)
            got = f.readinto(buf) if b > a else 0
        if got != b - a:
            raise CheckpointError(f"{self.path}: tensor {name} is truncated")
        return buf.view(dt).reshape(e["shape"])


def _header_len(path, head: bytes, size: int) -> int:
    """The 8-byte header length, refused before any big read when it cannot be right."""
    if len(head) < 8:
        raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path}: header length {n} bytes exceeds the {MAX_HEADER_BYTES} byte cap "
                              f"(not a safetensors file, or a corrupt one)")
    if 8 + n > size:
        raise CheckpointError(f"{path}: header length {n} bytes runs past the end of the file ({size} bytes)")
    return n


def _parse_header(path, raw: bytes) -> dict:
    try:
        header = json.loads(raw)
    except ValueError as e:          # bad JSON or bad UTF-8
        raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__") or {}, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object of tensor entries")
    return header


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_span(path, name, e) -> tuple[int, int]:
    """(start, end) of one tensor's bytes after checking its dtype, shape and size."""
    code = e.get("dtype") if isinstance(e, dict) else None
    if not (isinstance(code, str) and code in ST_TO_NP):
        raise CheckpointError(f"{path}: tensor {name} has unknown dtype {code!r} (known: {', '.join(ST_TO_NP)})")
    shape, offs = e.get("shape"), e.get("data_offsets")
    if not (isinstance(shape, list) and all(map(_is_count, shape))):
        raise CheckpointError(f"{path}: tensor {name} has a bad shape {shape!r}")
    if not (isinstance(offs, list) and len(offs) == 2 and all(map(_is_count, offs))):
        raise CheckpointError(f"{path}: tensor {name} has bad data_offsets {offs!r}")
    a, b = offs
    if b < a:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets [{a}, {b}] out of order")
    need = math.prod(shape) * ST_TO_NP[code].itemsize
    if b - a != need:
        raise CheckpointError(f"{path}: tensor {name} has data_offsets [{a}, {b}] ({b - a} bytes) but shape "
                              f"{tuple(shape)} x {code} is {need} bytes")
    return a, b


def _check_spans(path, spans: dict, data_size: int):
    """No tensor runs past the end of the file or shares bytes with another."""
    for name, (a, b) in spans.items():
        if b > data_size:
            raise CheckpointError(f"{path}: tensor {name} has data_offsets [{a}, {b}] past the end of the data "
                                  f"({data_size} bytes; truncated file?)")
    order = sorted((a, b, name) for name, (a, b) in spans.items())
    for (a0, b0, n0), (a1, b1, n1) in pairwise(order):
        if a1 < b0:
            raise CheckpointError(f"{path}: tensors {n0} [{a0}, {b0}] and {n1} [{a1}, {b1}] overlap")


class _BinFile:
    """PyTorch pickle checkpoint, loaded with weights_only=True (never arbitrary unpickling)."""

    def __init__(self, path):
        import torch
        self.path = path
        if "://" in str(path):  # torch memory-maps a local file only
            raise CheckpointError(f"{path}: pytorch_model*.bin is read from local folders only; convert "
                                  f"it to safetensors or copy the folder to a local disk")
        self.sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        self.entries = self.sd
        self.metadata = {}

    def shape(self, name):
        return tuple(self.sd[name].shape)

    def dtype(self, name):
        import torch
        t = self.sd[name]
        if t.dtype == torch.bfloat16:
            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(torch.empty((), dtype=t.dtype).numpy().dtype)

    def nbytes(self, name):
        t = self.sd[name]
        return t.numel() * t.element_size()

    def get(self, name):
        import torch
        t = self.sd[name].contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()


class SafeReader:
    """Lazy name -> np.ndarray over a folder: model.safetensors, sharded index, any *.safetensors,
    or, when `allow_bin`, (weights_only) pytorch_model*.bin."""

    def __init__(self, folder: str, *, allow_bin: bool = True):
        self.folder = folder
        files, index = _weight_files(folder, allow_bin)
        self.files = {}
        self.where = {}
        for fn in files:
            p = os.fspath(epath.Path(folder) / fn)
            if not epath.Path(p).exists():
                raise CheckpointError(f"{folder}: shard {fn} listed in the index is missing")
            h = _StFile(p) if fn.endswith(".safetensors") else _BinFile(p)
            self.files[fn] = h
            for k in h.entries:
                if k in self.where:
                    raise CheckpointError(f"{folder}: tensor {k} appears in {self.where[k]} and {fn}")
                self.where[k] = fn
        if index is not None:
            _check_index(folder, *index, self.where)

    def keys(self):
        return list(self.where)

    def __contains__(self, name):
        return name in self.where

    def shape(self, name):
        return self.files[self.where[name]].shape(name)

    def dtype(self, name):
        return self.files[self.where[name]].dtype(name)

    def nbytes(self, name):
        return self.files[self.where[name]].nbytes(name)

    def get(self, name) -> np.ndarray:
        return self.files[self.where[name]].get(name)

    @property
    def total_bytes(self):
        return sum(self.nbytes(k) for k in self.where)


def _weight_files(folder, allow_bin):
    """(file names, (index name, weight_map) or None) of a checkpoint folder."""
    indexes = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
    for idx in indexes if allow_bin else indexes[:1]:
        if (epath.Path(folder) / idx).exists():
            wmap = _read_index(folder, idx)
            return sorted(set(wmap.values())), (idx, wmap)
    if (epath.Path(folder) / "model.safetensors").exists():
        return ["model.safetensors"], None
    names = [p.name for p in epath.Path(folder).iterdir()]
    st = sorted(x for x in names if x.endswith(".safetensors"))
    if st:
        return st, None
    bins = sorted(x for x in names if x.endswith(".bin") and "pytorch_model" in x)
    if bins and allow_bin:
        return bins, None
    raise CheckpointError(f"{folder}: no model.safetensors, index, *.safetensors"
                          + (" or pytorch_model*.bin" if allow_bin else " file"))


def _read_index(folder, name) -> dict:
    path = os.fspath(epath.Path(folder) / name)
    try:
        wmap = json.loads(epath.Path(path).read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: not a checkpoint index with a weight_map ({type(e).__name__}: {e})") from None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{path}: weight_map is not an object")
    for k, fn in wmap.items():
        if not isinstance(fn, str) or os.path.basename(fn) != fn or fn in ("", ".", ".."):
            raise CheckpointError(f"{path}: tensor {k} maps to {fn!r}, not a file name in the folder")
    return wmap


def _check_index(folder, name, wmap, where):
    """The index and the shards agree on where every tensor is."""
    problems = [f"{name} maps {k} to {fn}, which lacks it" + (f" (it is in {where[k]})" if k in where else "")
                for k, fn in wmap.items() if where.get(k) != fn]
    problems += [f"tensor {k} in {fn} is not listed in {name}" for k, fn in where.items() if k not in wmap]
    if problems:
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"{folder}: {len(problems)} index problem(s):\n  " + "\n  ".join(problems[:10]) + more)


# ----------------------------------------------------------------------------- writing

def parse_size(s) -> int:
    if isinstance(s, int):
        return s
    s = s.strip().upper()
    for unit, mul in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                      ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mul)
    return int(s)


class ShardedWriter:
    """Write planned tensors (name, shape, dtype) one at a time; HF shard naming and index."""

    def __init__(self, folder, plan, max_shard_size="5GB", metadata=None):
        self.folder = folder
        limit = parse_size(max_shard_size)
        shards, cur, cur_size = [], [], 0
        for name, shape, dt in plan:
            nb = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            if cur and cur_size + nb > limit:
                shards.append(cur)
                cur, cur_size = [], 0
            cur.append((name, tuple(shape), np.dtype(dt), nb))
            cur_size += nb
        if cur or not shards:
            shards.append(cur)
        n = len(shards)
        self.names = (["model.safetensors"] if n == 1 else
                      [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards = shards
        self.where = {}
        self.total = 0
        for fn, sh in zip(self.names, shards, strict=True):
            for name, *_rest in sh:
                self.where[name] = fn
                self.total += _rest[2]
        self._order = [t for sh in shards for t in sh]
        self._pos = 0
        self._fh = None
        self._shard_idx = -1

    def _open_next(self):
        if self._fh:
            self._fh.close()
        self._shard_idx += 1
        sh = self.shards[self._shard_idx]
        header, off = {}, 0
        for name, shape, dt, nb in sh:
            header[name] = {"dtype": NP_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
        header = {"__metadata__": self.metadata, **header}
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        self._fh = (epath.Path(self.folder) / self.names[self._shard_idx]).open("wb")
        self._fh.write(struct.pack("<Q", len(hb)))
        self._fh.write(hb)
        self._left = len(sh)

    def write(self, name, arr: np.ndarray):
        exp_name, shape, dt, nb = self._order[self._pos]
        if name != exp_name:
            raise CheckpointError(f"writer expected tensor {exp_name}, got {name}")
        if tuple(arr.shape) != shape or arr.dtype != dt:
            raise CheckpointError(f"tensor {name}: got {arr.shape} {arr.dtype}, planned {shape} {dt}")
        if self._fh is None or self._left == 0:
            self._open_next()
            while self._left == 0:  # empty shard (only when nothing planned)
                self._open_next()
        a = np.ascontiguousarray(arr)
        self._fh.write(a.reshape(-1).view(np.uint8).data if a.size else b"")
        self._left -= 1
        self._pos += 1

    def close(self):
        if self._pos != len(self._order):
            raise CheckpointError(f"writer closed after {self._pos} of {len(self._order)} tensors")
        if self._fh is None:  # no tensors at all
            self._open_next()
        self._fh.close()
        if len(self.names) > 1:
            (epath.Path(self.folder) / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.where.items()))}, indent=2))
