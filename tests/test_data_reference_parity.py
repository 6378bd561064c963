"""Parity with the reference's own preprocess_llama_3 / preprocess_phi_3.

The reference's outputs for the conversations below were recorded once by executing its functions
(tests/golden/data_ref/README.md says how); the recording and its tokenizer ship with the tests. The
phi_3 multi-round case is not recorded: the reference's length arithmetic there is tuned to the
SentencePiece Phi tokenizer and, with the tiny BPE used here, it masks the whole sample (our
span-based labels stay correct).
"""
import json
import pathlib

import numpy as np
import pytest

from fusion_jax.data.sample import SampleConfig, SampleProcessor
from fusion_jax.data.tokenizer import load_tokenizer

RECORDED = pathlib.Path(__file__).resolve().parent / "golden" / "data_ref"

CONVS = [
    [{"from": "human", "value": "What is in the image?\n<image>"}, {"from": "gpt", "value": "A cat."},
     {"from": "human", "value": "How many?"}, {"from": "gpt", "value": "Three apples on the table."}],
    [{"from": "gpt", "value": "lead"}, {"from": "human", "value": "<image> Describe."},
     {"from": "gpt", "value": "Two dogs playing in the park."}],
]


def _cases():
    # shipped with the tests: a missing file fails collection, it never skips
    rows = [json.loads(line) for line in (RECORDED / "cases.jsonl").read_text().splitlines() if line.strip()]
    assert len(rows) == 6, f"{RECORDED / 'cases.jsonl'}: expected 6 recorded cases, found {len(rows)}"
    return [pytest.param(r, id=f"{r['template']}-conv{r['conv_idx']}-{'image' if r['has_image'] else 'text'}")
            for r in rows]


@pytest.mark.parametrize("case", _cases())
def test_matches_reference_preprocess(case):
    conv = [dict(t) for t in CONVS[case["conv_idx"]]]
    if not case["has_image"]:
        for t in conv:
            t["value"] = t["value"].replace("<image>", "").strip()
    proc = SampleProcessor(load_tokenizer(str(RECORDED / "tokenizer")),
                           SampleConfig(template=case["template"], max_length=None))
    proc._load_image = lambda *a, **k: np.zeros(1)  # text-side parity only
    rec = {"id": "x", "conversations": conv} | ({"image": "a.png"} if case["has_image"] else {})
    out = proc({"payload": json.dumps(rec), "key": "k"})
    assert out["input_ids"].tolist() == case["input_ids"]
    assert out["labels"].tolist() == case["labels"]
    assert out["instructs"].tolist() == case["instructs"]

