"""Evaluation harness: scorers, the model_vqa answer format, and both CLIs end to end on a
synthesized held-out split with a tiny random checkpoint (offline)."""
import json
import os

import pytest

from fusion_jax.eval.scorers import extract_letter, normalize_answer, score_answers, score_one


def test_extract_letter():
    ch = ["blue", "red", "green", "yellow"]
    assert extract_letter("B", ch) == "B"
    assert extract_letter("B.", ch) == "B"
    assert extract_letter("(C) green", ch) == "C"
    assert extract_letter("The answer is D.", ch) == "D"
    assert extract_letter("red", ch) == "B"                    # the text of one choice
    assert extract_letter("E", ch) is None                     # not an option
    assert extract_letter("red or blue", ch) is None           # ambiguous


def test_normalize_and_score():
    assert normalize_answer("The Three red cubes.") == "3 red cubes"
    assert score_one("Three.", {"answer": "3", "style": "short"})
    assert not score_one("3 cubes", {"answer": "3", "style": "short"})
    assert score_one("Yes", {"answer": "yes"})
    assert score_one("There are 3 cubes.", {"answer": "There are three cubes.", "answer_text": "3",
                                             "style": "long"})
    assert not score_one("There are 13 cubes.", {"answer": "x", "answer_text": "3", "style": "long"})
    assert score_one("A", {"answer": "A", "choices": ["x", "y"]})


def test_summary_per_category():
    golds = {"q1": {"answer": "red", "category": "color", "chance": 0.25},
             "q2": {"answer": "B", "category": "color", "style": "mc", "choices": ["a", "b"], "chance": 0.5},
             "q3": {"answer": "2", "category": "count", "chance": 0.2}}
    preds = [{"question_id": "q1", "text": "Red."}, {"question_id": "q2", "text": "A"}]
    s, rows = score_answers(preds, golds)
    assert s["overall"]["n"] == 3 and s["overall"]["correct"] == 1
    assert s["per_category"]["color"]["accuracy"] == 0.5
    assert s["per_category"]["count"]["correct"] == 0
    assert s["per_style"]["mc"]["n"] == 1
    assert s["missing"] == ["q3"]


@pytest.fixture(scope="module")
def split_and_ckpt(tmp_path_factory):
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    from fusion_jax.synth import SynthConfig, generate_dataset
    root = tmp_path_factory.mktemp("eval")
    data = str(root / "synth")
    generate_dataset(data, SynthConfig(num=8, seed=0, image_size=48, heldout_fraction=0.5))
    ckpt, _, _ = write_tiny_checkpoint(str(root / "ckpt"))
    return data, ckpt, root


def test_eval_cli_on_synth_split(split_and_ckpt, capsys):
    from fusion_jax.eval.__main__ import main
    data, ckpt, root = split_and_ckpt
    q = os.path.join(data, "eval", "questions.jsonl")
    out = str(root / "answers.jsonl")
    assert main(["--ckpt", ckpt, "--questions", q, "--image-folder", data, "--out", out,
                 "--batch-size", "4", "--max-new-tokens", "4", "--no-progress"]) == 0
    questions = [json.loads(x) for x in open(q)]
    rows = [json.loads(x) for x in open(out)]
    assert [r["question_id"] for r in rows] == [x["question_id"] for x in questions]
    for r, x in zip(rows, questions, strict=True):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == x["text"] and r["model_id"] == "ckpt" and isinstance(r["text"], str)
    summary = json.load(open(str(root / "answers.summary.json")))
    assert summary["overall"]["n"] == len(questions)
    assert set(summary["per_category"]) == {x["category"] for x in questions}
    assert "accuracy" in capsys.readouterr().out
    # the score subcommand reproduces the summary
    s2 = str(root / "s2.json")
    assert main(["score", "--pred", out, "--gold", os.path.join(data, "eval", "answers.jsonl"),
                 "--summary", s2]) == 0
    assert json.load(open(s2))["overall"] == summary["overall"]


def test_generate_cli(split_and_ckpt, capsys):
    from fusion_jax.generate.cli import main
    data, ckpt, _ = split_and_ckpt
    img = os.path.join(data, "images", "eval", sorted(os.listdir(os.path.join(data, "images", "eval")))[0])
    assert main(["--ckpt", ckpt, "--image", img, "--prompt", "What is in the image?",
                 "--max-new-tokens", "3", "--query-len", "4", "--template", "phi_3"]) == 0
    assert capsys.readouterr().out.endswith("\n")
    assert main(["--ckpt", ckpt, "--image", img, "--prompt", "x", "--query-len", "9"]) == 2
    assert "query_len 9" in capsys.readouterr().err
