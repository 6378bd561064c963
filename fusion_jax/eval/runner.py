"""Batched `model_vqa`-style answering: question dicts in, answer records out.

Prompts are built as `fusion/eval/model_vqa_loader.py` builds them (image tag in the
question, conversation template, prompt ending with the assistant header, instructs =
the question without tags, labels=None). Differences, by design: samples are batched
(the reference requires batch 1) and the last batch is padded with copies so every batch
has the same shape; in the reference early-attention mode the width of the padded
instructs nudges the numbers (~1e-3 on logits), so `--batch-size 1 --instruct-bucket 0`
is the setting that reproduces the reference.

A question dict: {"question_id", "text", "image": relative path (against image_folder) |
PIL image | None, "instructs": str | None (per-question vision instructs), "max_new_tokens":
int (optional), ...}. A bad question (malformed dict, missing or unsafe image, prompt longer
than the context) becomes a failure record {"question_id", "index", "reason"}; the others
are still answered.
"""
from __future__ import annotations

import dataclasses
import json
import uuid

from etils import epath


def read_jsonl(path: str) -> list:
    from etils import epath  # a local path or a gs:// URL
    text = epath.Path(path).expanduser().read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def read_questions(path: str) -> tuple[list, list]:
    """(questions, failures): a line that is not a JSON object is a failure naming the line."""
    questions, failures = [], []
    with epath.Path(path).expanduser().open("r") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
                if not isinstance(q, dict):
                    raise ValueError(f"expected a JSON object, got {type(q).__name__}")
            except ValueError as e:
                failures.append({"question_id": None, "line": n, "reason": f"malformed: {path} line {n}: {e}"})
                continue
            questions.append(q)
    return questions, failures


def write_jsonl(path: str, rows) -> None:
    """Write rows atomically (a temporary file renamed over `path`)."""
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.parent / (p.name + f".tmp-{uuid.uuid4().hex[:8]}")
    with tmp.open("w") as f:
        f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.rename(p)


def answer_id(model_id: str, question_id) -> str:
    """Deterministic stand-in for the reference's shortuuid answer ids."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"fusion_jax/{model_id}/{question_id}").hex[:22]


def answer_record(line: dict, text: str, model_id: str) -> dict:
    """A model_vqa answer record, plus the question's "answer_fields" (a benchmark's extra fields)."""
    return {"question_id": line["question_id"], "prompt": line["text"], "text": text,
            "answer_id": answer_id(model_id, line["question_id"]), "model_id": model_id, "metadata": {},
            **(line.get("answer_fields") or {})}


def _failure(index: int, line, reason: str) -> dict:
    qid = line.get("question_id") if isinstance(line, dict) else None
    return {"question_id": qid, "index": index, "reason": reason}


def prepare(model, tokenizer, line: dict, image_folder, gcfg) -> dict:
    """A question dict -> an `answer()` request; raises ValueError / ImageError naming the problem."""
    from fusion_jax.data.images import resolve_image_path
    from fusion_jax.generate.prompts import (
        check_context,
        default_template,
        encode_request,
        open_image,
        pick_query_len,
    )
    from fusion_jax.layout import spliced_length
    if "question_id" not in line or not isinstance(line.get("text"), str):
        raise ValueError(f"malformed: needs 'question_id' and a string 'text', got keys {sorted(line)}")
    img = line.get("image")
    if isinstance(img, str) and img:
        img = open_image(resolve_image_path(image_folder, img))
    elif img is not None and not hasattr(img, "convert"):
        raise ValueError(f"malformed: 'image' must be a path, a PIL image or null, got {type(img).__name__}")
    req = {"question": line["text"], "image": img or None}
    if line.get("instructs") is not None:
        req["instructs"] = line["instructs"]
    cfg = model.cfg
    enc = encode_request(tokenizer, gcfg.template or default_template(cfg), [(line["text"], None)],
                         has_image=req["image"] is not None, convention=gcfg.convention)
    n = spliced_length(enc["input_ids"], num_image_tokens=cfg.num_image_tokens,
                       query_len=pick_query_len(cfg, gcfg.query_len))
    check_context(cfg, [n], int(line.get("max_new_tokens") or gcfg.max_new_tokens))
    return req


def _answer_batch(model, tokenizer, items, gcfg, batch_size):
    """items: [(index, line, request)] of one max_new_tokens -> ([(index, text)], [failure])."""
    from fusion_jax.data.images import ImageError
    from fusion_jax.generate import answer
    reqs = [r for _, _, r in items]
    if len(reqs) < batch_size:                     # keep the compiled shape
        reqs = reqs + [reqs[-1]] * (batch_size - len(reqs))
    try:
        texts = answer(model, tokenizer, reqs, gcfg)
        return [(i, t) for (i, _, _), t in zip(items, texts, strict=False)], []
    except (ValueError, ImageError) as e:
        if len(items) == 1:
            return [], [_failure(items[0][0], items[0][1], f"generation: {e}")]
    done, failed = [], []                          # isolate the bad question(s)
    for it in items:
        d, f = _answer_batch(model, tokenizer, [it], gcfg, batch_size)
        done += d
        failed += f
    return done, failed


def run_eval(model, tokenizer, questions, *, image_folder: str | None, gcfg=None, batch_size: int = 8,
             model_id: str = "fusion_jax", progress: bool = True, log=print, failures: list | None = None,
             on_batch=None, indices=None) -> list:
    """Answer every question; returns answer records in input order.

    Bad questions are appended to `failures` (a list; logged when None) and skipped.
    Questions are grouped by their "max_new_tokens" (default gcfg's). `on_batch(records)`
    is called after every batch with its records (the resumable writer); `indices` are the
    questions' positions in the full list (for failure records; default 0..n-1).
    """
    from tqdm import tqdm

    from fusion_jax.data.images import ImageError
    from fusion_jax.generate import GenerationConfig
    gcfg = gcfg or GenerationConfig(max_new_tokens=128)
    indices = list(range(len(questions))) if indices is None else list(indices)
    fails = [] if failures is None else failures
    groups: dict[int, list] = {}
    for i, line in zip(indices, questions, strict=True):
        try:
            if not isinstance(line, dict):
                raise ValueError(f"malformed: expected a dict, got {type(line).__name__}")
            req = prepare(model, tokenizer, line, image_folder, gcfg)
        except (ValueError, ImageError) as e:
            fails.append(_failure(i, line, str(e) if str(e).startswith("malformed") else f"{type(e).__name__}: {e}"))
            continue
        groups.setdefault(int(line.get("max_new_tokens") or gcfg.max_new_tokens), []).append((i, line, req))
    by_index = dict(zip(indices, questions, strict=True))
    texts = {}
    bar = tqdm(total=sum(len(g) for g in groups.values()), desc="eval", unit="q", disable=not progress)
    for mnt, items in groups.items():
        g = dataclasses.replace(gcfg, max_new_tokens=mnt)
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            done, failed = _answer_batch(model, tokenizer, chunk, g, batch_size if start or len(items) > len(chunk)
                                         else len(chunk))
            fails += failed
            recs = [answer_record(by_index[i], t, model_id) for i, t in done]
            texts.update(zip((i for i, _ in done), recs, strict=True))
            if on_batch is not None:
                on_batch(recs)
            bar.update(len(chunk))
    bar.close()
    if failures is None:
        for f in fails:
            log(f"failed: question {f['question_id']!r} (#{f['index']}): {f['reason']}")
    return [texts[i] for i in indices if i in texts]
