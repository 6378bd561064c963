"""Shared pieces of the benchmark readers: checked record access, the question dict, suffixes.

A question dict is what `fusion_jax.eval.runner.run_eval` answers::

    {"question_id", "text": the user message exactly as the reference builds it (before the image tag),
     "image": path relative to --image-folder | PIL image | None,
     "instructs": text the vision tower reads (None: derived from "text" as model_vqa_loader does),
     "max_new_tokens": the reference script's limit, "meta": {...}}

`meta` holds what the reference writes into its answer records beside the answer (MMBench's
round and options, CV-Bench's ground truth, ...) and what our scorers need.
"""
from __future__ import annotations

import base64
import binascii
import io
import json

from etils import epath

# Suffixes the reference appends (model_vqa_science / _cvbench / _mmvp / _mmbench --single-pred-prompt).
LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
LETTER_SUFFIX_CN = "请直接回答选项字母。"
# max_new_tokens: model_vqa_loader's default (the scripts pass none), the fixed 1024 of
# model_vqa / _science / _cvbench / _mmvp / _mmbench, and MMMU's call_fusion_engine_df.
TOKENS_LOADER, TOKENS_LONG, TOKENS_MMMU = 128, 1024, 2048


class BenchmarkFormatError(ValueError):
    """A malformed benchmark file: names the file, the line (or row) and the field."""

    def __init__(self, path, line, field, problem: str):
        where = f"{path}" + (f", line {line}" if line is not None else "")
        what = f", field {field!r}" if field is not None else ""
        super().__init__(f"{where}{what}: {problem}")
        self.path, self.line, self.field = str(path), line, field


def question(qid, text: str, image, max_new_tokens: int, instructs: str | None = None, **meta) -> dict:
    return {"question_id": qid, "text": text, "image": image, "instructs": instructs,
            "max_new_tokens": int(max_new_tokens), "meta": meta}


def read_text(path) -> str:
    p = epath.Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{path}: no such file")
    return p.read_text(encoding="utf-8")


def jsonl_records(path) -> list:
    """[(line number, dict)] for every non-blank line; a bad line is a BenchmarkFormatError."""
    out = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(path, n, None, f"not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise BenchmarkFormatError(path, n, None, f"expected a JSON object, got {type(rec).__name__}")
        out.append((n, rec))
    return out


def json_document(path):
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise BenchmarkFormatError(path, e.lineno, None, f"not valid JSON ({e.msg})") from None


def field(rec: dict, name: str, path, line, types=(str,), *, allow_empty: bool = False):
    """rec[name], checked for presence and type."""
    if name not in rec:
        raise BenchmarkFormatError(path, line, name, "missing")
    v = rec[name]
    if not isinstance(v, types) or isinstance(v, bool):
        names = "/".join(t.__name__ for t in types)
        raise BenchmarkFormatError(path, line, name, f"expected {names}, got {type(v).__name__} {v!r:.60}")
    if isinstance(v, str) and not allow_empty and not v.strip():
        raise BenchmarkFormatError(path, line, name, "empty")
    return v


def question_id(rec: dict, name: str, path, line):
    return field(rec, name, path, line, (str, int))


def image_from_bytes(data: bytes, path, line, name: str):
    """A lazily decoded PIL image (only the header is read now); a bad image names its record."""
    from PIL import Image, UnidentifiedImageError
    try:
        return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as e:
        raise BenchmarkFormatError(path, line, name, f"not an image ({e})") from None


def image_from_base64(s, path, line, name: str):
    if not isinstance(s, str) or not s.strip():
        raise BenchmarkFormatError(path, line, name, "expected a base64 image string")
    try:
        data = base64.b64decode(s, validate=False)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkFormatError(path, line, name, f"not base64 ({e})") from None
    return image_from_bytes(data, path, line, name)
