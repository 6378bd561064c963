"""Letter-answer benchmarks with `--single-pred-prompt`: ScienceQA (LLaVA JSON,
model_vqa_science), CV-Bench (model_vqa_cvbench) and MMVP (model_vqa_mmvp).

The reference appends the letter suffix, gives the vision tower the question with the suffix
(also for ScienceQA / CV-Bench questions without an image, which get a zero image and no image
tag), and records `"<image>\\n" + question` as the prompt of image questions (ScienceQA's
IMG-accuracy counts the answers whose prompt holds `<image>`). max_new_tokens is 1024.
"""
from __future__ import annotations

from fusion_jax.constants import DEFAULT_IMAGE_TOKEN
from fusion_jax.data.templates import strip_tags
from fusion_jax.eval.benchmarks.common import (
    LETTER_SUFFIX,
    TOKENS_LONG,
    BenchmarkFormatError,
    field,
    json_document,
    jsonl_records,
    question,
    question_id,
)


def _letter_question(qid, body: str, image, **meta) -> dict:
    text = body + "\n" + LETTER_SUFFIX
    prompt = (DEFAULT_IMAGE_TOKEN + "\n" + text) if image is not None else text
    return question(qid, text, image, TOKENS_LONG, instructs=strip_tags(prompt), prompt=prompt, **meta)


def read_scienceqa(path, **_) -> list:
    """llava_test_CQM-A.json: [{"id", "conversations": [{"value": question}, ...], "image"?}]."""
    doc = json_document(path)
    if not isinstance(doc, list):
        raise BenchmarkFormatError(path, None, None, "expected a JSON list of LLaVA records")
    out = []
    for k, rec in enumerate(doc):
        where = f"record {k}"
        if not isinstance(rec, dict):
            raise BenchmarkFormatError(path, where, None, "expected a JSON object")
        qid = question_id(rec, "id", path, where)
        conv = field(rec, "conversations", path, where, (list,))
        if not conv or not isinstance(conv[0], dict) or not isinstance(conv[0].get("value"), str):
            raise BenchmarkFormatError(path, where, "conversations", "the first turn has no string 'value'")
        body = conv[0]["value"].replace(DEFAULT_IMAGE_TOKEN, "").strip()
        image = field(rec, "image", path, where) if "image" in rec else None
        out.append(_letter_question(qid, body, image))
    return out


def read_cvbench(path, **_) -> list:
    """CV-Bench test.jsonl: {"id", "prompt", "answer", "source", "image"?}."""
    out = []
    for n, rec in jsonl_records(path):
        qid = question_id(rec, "id", path, n)
        body = field(rec, "prompt", path, n).replace(DEFAULT_IMAGE_TOKEN, "").strip()
        image = field(rec, "image", path, n) if "image" in rec else None
        out.append(_letter_question(qid, body, image, ground_truth=field(rec, "answer", path, n),
                                    source=field(rec, "source", path, n)))
    return out


def read_mmvp(path, **_) -> list:
    """MMVP Questions.jsonl: {"Index", "Question", "Options", "Correct Answer"}; image {Index}.jpg."""
    out = []
    for n, rec in jsonl_records(path):
        qid = question_id(rec, "Index", path, n)
        body = field(rec, "Question", path, n) + " " + field(rec, "Options", path, n)
        # no strip here: model_vqa_mmvp joins question and options as they are
        text = body + "\n" + LETTER_SUFFIX
        out.append(question(qid, text, f"{qid}.jpg", TOKENS_LONG, instructs=None,
                            prompt=DEFAULT_IMAGE_TOKEN + "\n" + text,
                            ground_truth=field(rec, "Correct Answer", path, n)))
    return out
