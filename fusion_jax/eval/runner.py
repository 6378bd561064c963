"""Batched `model_vqa`-style answering: questions JSONL in, answers JSONL out.

Prompts are built as `fusion/eval/model_vqa_loader.py` builds them (image tag in the
question, conversation template, prompt ending with the assistant header, instructs =
the question without tags, labels=None). Differences, by design: samples are batched
(the reference requires batch 1) and the last batch is padded with copies so every batch
has the same shape; in the reference early-attention mode the width of the padded
instructs nudges the numbers (~1e-3 on logits), so `--batch-size 1 --instruct-bucket 0`
is the setting closest to the reference.
"""
from __future__ import annotations

import json
import uuid


def read_jsonl(path: str) -> list:
    from etils import epath  # a local path or a gs:// URL
    text = epath.Path(path).expanduser().read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(path: str, rows) -> None:
    from etils import epath  # a local path or a gs:// URL
    epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(path).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                encoding="utf-8")


def answer_id(model_id: str, question_id) -> str:
    """Deterministic stand-in for the reference's shortuuid answer ids."""
    return uuid.uuid5(uuid.NAMESPACE_URL, f"fusion_jax/{model_id}/{question_id}").hex[:22]


def run_eval(model, tokenizer, questions, *, image_folder: str | None, gcfg=None, batch_size: int = 8,
             model_id: str = "fusion_jax", progress: bool = True, log=print) -> list:
    """Answer every question; returns model_vqa answer records in input order."""
    from tqdm import tqdm

    from fusion_jax.data.images import ImageError, resolve_image_path
    from fusion_jax.generate import GenerationConfig, answer
    gcfg = gcfg or GenerationConfig(max_new_tokens=128)
    out = []
    bar = tqdm(total=len(questions), desc="eval", unit="q", disable=not progress)
    for start in range(0, len(questions), batch_size):
        chunk = questions[start:start + batch_size]
        reqs = []
        for line in chunk:
            img = line.get("image")       # a path relative to image_folder, a PIL image, or None
            if isinstance(img, str):
                img = resolve_image_path(image_folder, img) if img else None
            reqs.append({"question": line["text"], "image": img, "instructs": line.get("instructs")})
        if len(reqs) < batch_size and start > 0:       # keep the compiled shape
            reqs += [reqs[-1]] * (batch_size - len(reqs))
        try:
            texts = answer(model, tokenizer, reqs, gcfg)
        except ImageError as e:
            raise SystemExit(f"error: {e}") from None
        for line, text in zip(chunk, texts[:len(chunk)], strict=True):  # padded rows dropped
            out.append({"question_id": line["question_id"], "prompt": line["text"], "text": text,
                        "answer_id": answer_id(model_id, line["question_id"]), "model_id": model_id,
                        "metadata": {}})
        bar.update(len(chunk))
    bar.close()
    return out
