"""MMMU's response parsing and accuracy (fusion/eval/MMMU/eval/utils/eval_utils.py, eval.py,
main_eval_only.py), reproduced from their behaviour.

One difference, by design: where no option can be parsed from a multiple-choice response the
reference picks a letter with the unseeded global `random.choice`, so its number changes from
run to run. We pick with a generator seeded by (seed, question id): the same answers give the
same number on every run, on any sharding. `score_mmmu` reports how many answers fell back.
"""
from __future__ import annotations

import random
import re

from fusion_jax.eval.benchmarks.mmmu import DOMAINS, SUBJECTS, subject_of

_STRIP_CHARS = (",", ".", "!", "?", ";", ":", "'")
_NUM_COMMAS = re.compile(r"-?\b\d{1,3}(?:,\d{3})+\b")
_NUM_SCI = re.compile(r"-?\d+(?:\.\d+)?[eE][+-]?\d+")
_NUM_SIMPLE = re.compile(r"-?(?:\d+\.\d+|\.\d+|\d+\b)(?![eE][+-]?\d+)(?![,\d])")
_KEY_INDICATORS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def seeded_choice(seed: int):
    def choose(qid, choices):
        return random.Random(f"{seed}/{qid}").choice(list(choices))
    return choose


def _candidates(resp: str, choices, index2ans):
    """(candidates, answered with letters?, with brackets?) as the reference looks for them."""
    for fmt, brack in (("The final answer is:\n{}", True), ("({})", True), (" {} ", False)):
        found = [c for c in choices if fmt.format(c) in resp]
        if found:
            return found, True, brack
    if len(resp.split()) > 5:
        return [k for k, v in index2ans.items() if v.lower() in resp.lower()], False, False
    return [], True, False


def parse_multi_choice(response: str, choices, index2ans: dict, fallback=None):
    """The letter a response names; `fallback(choices)` when none (None: returns None)."""
    for ch in _STRIP_CHARS:
        response = response.strip(ch)
    resp = " " + response + " "
    cands, by_index, brack = _candidates(resp, choices, index2ans)
    if not cands:
        return fallback(choices) if fallback else None
    if len(cands) == 1:
        return cands[0]
    if not by_index:
        starts = [resp.lower().rfind(index2ans[c].lower()) for c in cands]
    else:
        starts = [resp.rfind(f"({c})" if brack else f" {c} ") for c in cands]
    return cands[max(range(len(starts)), key=lambda i: (starts[i], -i))]   # argmax: first of the maxima


def _is_number(s: str) -> bool:
    try:
        float(s.replace(",", ""))
        return True
    except ValueError:
        return False


def normalize_str(s: str) -> list:
    s = s.strip()
    if _is_number(s):
        return [round(float(s.replace(",", "")), 2)]
    s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]


def extract_numbers(s: str) -> list:
    return _NUM_COMMAS.findall(s) + _NUM_SCI.findall(s) + _NUM_SIMPLE.findall(s)


def _key_responses(response: str) -> list:
    response = response.strip().strip(".").lower()
    parts = re.split(r"\.\s(?=[A-Z])|\n", response)
    keys = []
    for k, part in enumerate(parts):
        indicators = _KEY_INDICATORS + (("=",) if k == len(parts) - 1 else ())
        tails = [part.split(ind)[-1].strip() for ind in indicators if ind in part]
        shortest = None
        for t in tails:      # the first of the shortest tails
            if not shortest or len(t) < len(shortest):
                shortest = t
        if shortest and shortest.strip() not in (":", ",", ".", "!", "?", ";", "'"):
            keys.append(shortest)
    return keys or [response]


def parse_open(response: str) -> list:
    keys = _key_responses(response)
    preds = keys + [n for k in keys for n in extract_numbers(k)]
    return list({v for p in preds for v in normalize_str(p)})


def eval_multi_choice(gold, pred) -> bool:
    return pred in gold if isinstance(gold, list) else gold == pred


def eval_open(gold, preds) -> bool:
    golds = [v for g in gold for v in normalize_str(g)] if isinstance(gold, list) else normalize_str(gold)
    for p in preds:
        if isinstance(p, str):
            if any(isinstance(g, str) and g in p for g in golds):
                return True
        elif p in golds:
            return True
    return False


def judge(answer: dict, gold: dict, fallback) -> tuple:
    """(correct, fell back to a random letter) for one answer record and its gold meta."""
    text = answer["text"]
    if gold["question_type"] == "multiple-choice":
        choices = [chr(ord("A") + k) for k in range(len(gold["options"]))]
        index2ans = dict(zip(choices, gold["options"], strict=True))
        pred = parse_multi_choice(text, choices, index2ans)
        fell_back = pred is None
        if fell_back:
            pred = fallback(answer["question_id"], choices)
        return eval_multi_choice(gold["answer"], pred), fell_back
    return eval_open(gold["answer"], parse_open(text)), False


def score_mmmu(answers, golds: dict, *, seed: int = 42, fallback=None) -> dict:
    """golds: question_id -> {question_type, answer, options}. Overall (eval.py: over the answers),
    per subject and per domain (main_eval_only.py, unrounded)."""
    fallback = fallback or seeded_choice(seed)
    per_subject, fallbacks = {}, 0
    for a in answers:
        qid = a["question_id"]
        if qid not in golds:
            raise ValueError(f"MMMU answer {qid!r} has no question in the data")
        ok, fb = judge(a, golds[qid], fallback)
        fallbacks += fb
        per_subject.setdefault(subject_of(qid), []).append(ok)
    subjects = {s: {"accuracy": sum(v) / len(v), "num": len(v)} for s in SUBJECTS if (v := per_subject.get(s))}
    extra = {s: {"accuracy": sum(v) / len(v), "num": len(v)} for s, v in per_subject.items() if s not in SUBJECTS}
    domains = {}
    for d, subs in DOMAINS.items():
        rows = [subjects[s] for s in subs if s in subjects]
        n = sum(r["num"] for r in rows)
        domains[d] = {"accuracy": sum(r["accuracy"] * r["num"] for r in rows) / n if n else 0.0, "num": n}
    n = sum(len(v) for v in per_subject.values())
    ok = sum(sum(v) for v in per_subject.values())
    return {"accuracy": ok / n if n else 0.0, "num": n, "subjects": {**subjects, **extra}, "domains": domains,
            "random_fallbacks": fallbacks, "fallback": f"seeded random choice (seed {seed})"}
