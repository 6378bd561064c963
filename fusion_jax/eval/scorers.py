"""Scorers: multiple-choice letters and normalized short answers, summarized per category.

Gold records (one JSON object per line, keyed by question_id) follow the synthesized
held-out split (`fusion_jax.synth`: answer, answer_text, category, style, choices, chance);
other benchmarks work with just `answer` (+ optional `choices` / `category`).

Rules:
* mc    - the predicted option letter (first standalone A-Z, "(B)", "B.", "answer is B", or
          the text of exactly one choice) equals the gold letter;
* short - normalized prediction == normalized gold (answer or answer_text);
* long  - the normalized answer_text occurs as whole words in the normalized prediction.
Normalization: lower case, number words -> digits, punctuation and articles removed,
whitespace collapsed (as in the VQA evaluation, simplified).
"""
from __future__ import annotations

import re
import string

NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty".split())}
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")
_LETTER_PATTERNS = [
    re.compile(r"^\s*\(?([A-Z])\)?\s*(?:[.:)\]]|$)"),                  # "B", "B.", "(B)", "B) ..."
    re.compile(r"(?:answer|option|choice)\s*(?:is|:)?\s*\(?([A-Z])\)?\b", re.I),
    re.compile(r"\(([A-Z])\)"),
    re.compile(r"\b([A-Z])\b"),
]


def normalize_answer(text) -> str:
    s = str(text).lower().strip()
    s = _PUNCT.sub(" ", s)
    words = [NUMBER_WORDS.get(w, w) for w in s.split()]
    return " ".join(w for w in words if w not in ARTICLES)


def extract_letter(pred: str, choices=None, num_choices: int | None = None):
    """The option letter a free-form prediction names, or None."""
    pred = str(pred).strip()
    n = num_choices or (len(choices) if choices else 26)
    valid = set(string.ascii_uppercase[:n])
    for i, pat in enumerate(_LETTER_PATTERNS):
        if i == 1:
            m = pat.search(pred)
            hits = [m.group(1).upper()] if m else []
        else:
            hits = [m.group(1) for m in pat.finditer(pred)] if i else \
                ([pat.match(pred).group(1)] if pat.match(pred) else [])
        hits = [h for h in hits if h in valid]
        if hits:
            return hits[0]
    if choices:
        npred = normalize_answer(pred)
        named = [k for k, c in enumerate(choices) if normalize_answer(c) and
                 re.search(r"\b" + re.escape(normalize_answer(c)) + r"\b", npred)]
        if len(named) == 1:
            return string.ascii_uppercase[named[0]]
    return None


def style_of(gold: dict) -> str:
    st = gold.get("style")
    if st in ("mc", "short", "long"):
        return st
    ans = str(gold.get("answer", "")).strip()
    if gold.get("choices") or (len(ans) == 1 and ans.isupper()):
        return "mc"
    return "short"


def score_one(pred: str, gold: dict) -> bool:
    st = style_of(gold)
    if st == "mc":
        return extract_letter(pred, gold.get("choices")) == str(gold["answer"]).strip().upper()
    npred = normalize_answer(pred)
    if st == "long":
        target = normalize_answer(gold.get("answer_text", gold["answer"]))
        return bool(target) and re.search(r"(?:^| )" + re.escape(target) + r"(?: |$)", npred) is not None
    targets = {normalize_answer(gold["answer"])}
    if "answer_text" in gold:
        targets.add(normalize_answer(gold["answer_text"]))
    return npred in targets


def _acc(rows) -> dict:
    n = len(rows)
    c = sum(r["correct"] for r in rows)
    out = {"n": n, "correct": c, "accuracy": round(c / n, 6) if n else 0.0}
    ch = [r["chance"] for r in rows if r.get("chance") is not None]
    if ch and len(ch) == n:
        out["chance"] = round(sum(ch) / n, 6)
    return out


def score_answers(preds, golds: dict) -> tuple[dict, list]:
    """preds: model_vqa answer records; golds: question_id -> gold record.

    Returns (summary, per-question rows). Questions without a prediction count as wrong
    and are listed under "missing".
    """
    by_id = {}
    for p in preds:
        by_id[p["question_id"]] = p
    rows = []
    for qid, g in golds.items():
        p = by_id.get(qid)
        pred = "" if p is None else p.get("text", "")
        rows.append({"question_id": qid, "category": g.get("category", "all"), "style": style_of(g),
                     "pred": pred, "answer": g.get("answer"), "correct": bool(p is not None and score_one(pred, g)),
                     "chance": g.get("chance")})
    summary = {"overall": _acc(rows), "per_category": {}, "per_style": {}}
    for key, field in (("per_category", "category"), ("per_style", "style")):
        for v in sorted({r[field] for r in rows}):
            summary[key][v] = _acc([r for r in rows if r[field] == v])
    missing = sorted(str(q) for q in golds if q not in by_id)
    extra = sorted(str(q) for q in by_id if q not in golds)
    if missing:
        summary["missing"] = missing
    if extra:
        summary["unscored"] = extra
    return summary, rows
