"""The reference's own metrics (fusion/eval/eval_*.py), parsing rules included; fractions in [0, 1].

Answers are model_vqa records ({"question_id", "text", "prompt", ...}). Differences from the
reference, all on input where it crashes or silently misaligns (on well-formed input the numbers
are equal, tests/test_eval_bench_metrics.py checks them against its recorded output):

* POPE: the reference pairs the i-th *answer* of a category with the i-th label line, so one
  missing or reordered answer shifts every later label. We pair the i-th *question* of the
  category (question-file order) with the i-th label and look its answer up by question_id;
  unanswered questions are left out and counted under "missing".
* A denominator of zero (no positive predictions, a CV-Bench source with no answers, no image
  question) gives 0.0 where the reference raises ZeroDivisionError.
* CV-Bench / MMVP: a ground truth written "(B)" is compared as "B" (the reference compares the
  parsed letter with the raw string, which can never equal "(B)").
"""
from __future__ import annotations

import re

from fusion_jax.constants import DEFAULT_IMAGE_TOKEN
from fusion_jax.eval.evalai import normalize_vqa_answer, soft_scores

# eval_science_qa / eval_cvbench_qa / eval_mmvp_qa: exact option letter, else the first
# "X." "X," "X\n" or "(X)" with X in A-F.
_LETTER = re.compile(r"([A-F])\.|([A-F]),|([A-F])\n|\(([A-F])\)")
SQA_OPTIONS = ("A", "B", "C", "D", "E")
CHOICE_OPTIONS = ("A", "B", "C", "D", "E", "F")


def _div(a, b) -> float:
    return a / b if b else 0.0


def parse_letter(text: str, options=CHOICE_OPTIONS) -> str:
    if text in options:
        return text
    m = _LETTER.search(text)
    return next(g for g in m.groups() if g) if m else "FAILED"


# ---------------------------------------------------------------- POPE
def pope_says_no(text: str) -> bool:
    """First sentence, commas dropped, split on spaces: 'No', 'no' or 'not' among the words."""
    first = text.split(".")[0] if "." in text else text
    words = first.replace(",", "").split(" ")
    return "No" in words or "not" in words or "no" in words


def pope_counts(pairs) -> dict:
    """pairs: (prediction says yes, label is yes) -> accuracy, precision, recall, f1, yes_ratio."""
    tp = sum(p and g for p, g in pairs)
    fp = sum(p and not g for p, g in pairs)
    tn = sum(not p and not g for p, g in pairs)
    fn = sum(not p and g for p, g in pairs)
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return {"accuracy": _div(tp + tn, tp + tn + fp + fn), "precision": precision, "recall": recall,
            "f1": _div(2 * precision * recall, precision + recall),
            "yes_ratio": _div(sum(p for p, _ in pairs), len(pairs))}


def score_pope(answers, questions, labels: dict) -> dict:
    """questions: records with question_id and category (file order); labels: category -> label list."""
    by_id = {a["question_id"]: a for a in answers}
    out, counts, missing = {}, {}, 0
    for cat in sorted(labels):
        qs = [q for q in questions if q.get("category") == cat]
        if len(qs) != len(labels[cat]):
            raise ValueError(f"POPE category {cat!r}: {len(qs)} questions but {len(labels[cat])} labels")
        pairs = []
        for q, label in zip(qs, labels[cat], strict=True):
            a = by_id.get(q["question_id"])
            if a is None:
                missing += 1
                continue
            pairs.append((not pope_says_no(a["text"]), label != "no"))
        out[cat], counts[cat] = pope_counts(pairs), len(pairs)
    return {"categories": out, "counts": counts, "missing": missing}


# ---------------------------------------------------------------- TextVQA
def textvqa_question(prompt: str) -> str:
    """eval_textvqa.prompt_processor: the question inside a model_vqa prompt, lower case."""
    lines = prompt.split("\n")
    if prompt.startswith("OCR tokens: "):
        m = re.search(r"Question: (.*?) Short answer:", prompt, re.DOTALL)
        if m is None:
            raise ValueError(f"TextVQA prompt {prompt[:60]!r}: no 'Question: ... Short answer:'")
        q = m.group(1)
    elif "Reference OCR token: " in prompt and len(lines) == 3:
        q = lines[1] if prompt.startswith("Reference OCR token:") else lines[0]
    elif len(lines) == 2:
        q = lines[0]
    else:
        raise ValueError(f"TextVQA prompt {prompt[:60]!r}: not a format eval_textvqa.py knows")
    return q.lower()


def score_textvqa(answers, annotations: list) -> dict:
    """annotations: TextVQA_0.5.1_val.json's "data" (image_id, question, answers)."""
    gold = {(a["image_id"], a["question"].lower()): a["answers"] for a in annotations}
    scores = []
    for a in answers:
        key = (a["question_id"], textvqa_question(a["prompt"]))
        if key not in gold:
            raise ValueError(f"TextVQA answer {a['question_id']!r}: no annotation for image {key[0]!r} "
                             f"question {key[1]!r}")
        scores.append(soft_scores(gold[key]).get(normalize_vqa_answer(a["text"]), 0.0))
    return {"accuracy": _div(sum(scores), len(scores)), "n": len(scores)}


# ---------------------------------------------------------------- ScienceQA
def score_scienceqa(answers, problems: dict, split_ids, image_ids=frozenset()) -> dict:
    """eval_science_qa.py over the split's problems; a missing answer is 'FAILED' (wrong).
    IMG questions: answers whose prompt holds <image> (as the reference), or whose question
    in `image_ids` has an image (our answers may record the prompt without the tag)."""
    preds = {a["question_id"]: a for a in answers}
    correct = img_total = img_correct = 0
    for pid in split_ids:
        prob, a = problems[pid], preds.get(pid)
        text = a["text"] if a is not None else "FAILED"
        letter = parse_letter(text, SQA_OPTIONS)
        valid = SQA_OPTIONS[:len(prob["choices"])]
        ok = (valid.index(letter) if letter in valid else -1) == prob["answer"]
        img = a is not None and (DEFAULT_IMAGE_TOKEN in a.get("prompt", "") or pid in image_ids)
        correct += ok
        img_total += img
        img_correct += ok and img
    total = len(split_ids)
    return {"accuracy": _div(correct, total), "img_accuracy": _div(img_correct, img_total),
            "total": total, "correct": correct}


# ---------------------------------------------------------------- CV-Bench, MMVP
def gold_letter(gt) -> str:
    gt = str(gt).strip()
    return gt[1:-1].strip() if len(gt) >= 3 and gt[0] == "(" and gt[-1] == ")" else gt


def score_cvbench(answers) -> dict:
    """answers carry ground_truth and source (as model_vqa_cvbench writes them)."""
    acc = {}
    for src in ("ADE20K", "COCO", "Omni3D"):
        rows = [a for a in answers if a["source"] == src]
        acc[src] = _div(sum(parse_letter(a["text"]) == gold_letter(a["ground_truth"]) for a in rows), len(rows))
    a2d, a3d = (acc["ADE20K"] + acc["COCO"]) / 2, acc["Omni3D"]
    return {"accuracy": (a2d + a3d) / 2, "accuracy_2d": a2d, "accuracy_3d": a3d, **acc}


def score_mmvp(answers) -> dict:
    ok = sum(parse_letter(a["text"]) == gold_letter(a["ground_truth"]) for a in answers)
    return {"accuracy": _div(ok, len(answers)), "n": len(answers)}
