"""LLaVA question files answered by `model_vqa_loader` (POPE, TextVQA, MME, GQA, VQAv2, VizWiz, SEED)
and `model_vqa` (MM-Vet): one JSON object a line with question_id, image and text.

Both put the image tag before `text` unchanged and give the vision tower `text` stripped;
they differ only in max_new_tokens (128 for the loader, the scripts pass none; 1024 fixed in
model_vqa).
"""
from __future__ import annotations

from fusion_jax.eval.benchmarks.common import (
    TOKENS_LOADER,
    TOKENS_LONG,
    field,
    jsonl_records,
    question,
    question_id,
)


def _read(path, max_new_tokens: int, extra=()) -> list:
    out = []
    for n, rec in jsonl_records(path):
        qid = question_id(rec, "question_id", path, n)
        meta = {k: field(rec, k, path, n) for k in extra}
        out.append(question(qid, field(rec, "text", path, n), field(rec, "image", path, n),
                            max_new_tokens, **meta))
    return out


def read_loader(path, **_) -> list:
    return _read(path, TOKENS_LOADER)


def read_pope(path, **_) -> list:
    return _read(path, TOKENS_LOADER, extra=("category",))


def read_mmvet(path, **_) -> list:
    return _read(path, TOKENS_LONG)
