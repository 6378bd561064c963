"""Files for the server-scored benchmarks, byte for byte what the reference's scripts/convert_*.py
write from the same answers (tests/test_eval_bench_metrics.py compares them with recorded output).

Where the reference crashes on a missing answer (VizWiz's assert, SEED's KeyError) we raise an
error that names the missing question ids instead.
"""
from __future__ import annotations

import json

from etils import epath

from fusion_jax.eval.evalai import normalize_vqa_answer
from fusion_jax.eval.metrics import _div

MMBENCH_DROPPED = ("hint", "category", "source", "image", "comment", "l2-category")


def _write(path, text: str) -> None:
    p = epath.Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text, encoding="utf-8")


def _last_text(answers) -> dict:
    return {a["question_id"]: a["text"] for a in answers}


def _missing(kind: str, ids) -> ValueError:
    ids = list(ids)
    return ValueError(f"{kind}: {len(ids)} questions have no answer (first: {ids[:5]}); answer them all first")


def mmbench_sheet(tsv_path, answers, out_path) -> int:
    """convert_mmbench_for_submission: the TSV without hint/category/source/image/comment/l2-category,
    a 'prediction' column at position 6 (the last answer of each index wins), as .xlsx."""
    from fusion_jax.eval.benchmarks.mmbench import read_table
    df = read_table(tsv_path)
    absent = [c for c in MMBENCH_DROPPED if c not in df.columns]
    if absent:
        raise ValueError(f"{tsv_path}: column {absent[0]!r} missing (the MMBench legacy TSV has {MMBENCH_DROPPED})")
    preds = _last_text(answers)
    sheet = df.drop(columns=list(MMBENCH_DROPPED))
    sheet.insert(6, "prediction", [preds.get(i.item() if hasattr(i, "item") else i) for i in df["index"]])
    p = epath.Path(out_path)
    p.parent.mkdir(parents=True, exist_ok=True)
    with p.open("wb") as f:
        sheet.to_excel(f, index=False, engine="openpyxl")
    return int(sheet["prediction"].notna().sum())


def vizwiz(test_questions, answers, out_path) -> int:
    """[{"image", "answer": EvalAI-normalised}] over llava_test.jsonl; every question needs an answer."""
    preds = _last_text(answers)
    absent = [q["question_id"] for q in test_questions if q["question_id"] not in preds]
    if absent:
        raise _missing("VizWiz", absent)
    rows = [{"image": q["image"], "answer": normalize_vqa_answer(preds[q["question_id"]])} for q in test_questions]
    _write(out_path, json.dumps(rows))
    return len(rows)


def vqav2(test_questions, answers, out_path) -> int:
    """[{"question_id", "answer"}] over the whole test split; unanswered questions get ''."""
    preds = _last_text(answers)
    rows = [{"question_id": q["question_id"],
             "answer": normalize_vqa_answer(preds[q["question_id"]]) if q["question_id"] in preds else ""}
            for q in test_questions]
    _write(out_path, json.dumps(rows))
    return len(rows)


def gqa(answers, out_path) -> int:
    rows = [{"questionId": a["question_id"], "prediction": a["text"].rstrip(".").lower()} for a in answers]
    _write(out_path, json.dumps(rows))
    return len(rows)


def mmvet(answers, out_path) -> int:
    rows = {f"v1_{a['question_id']}": a["text"] for a in answers}
    _write(out_path, json.dumps(rows, indent=2))
    return len(rows)


def _seed_id(qid):
    try:
        return int(qid)
    except (TypeError, ValueError):
        return qid


def seed_accuracy(annotation: dict, results: dict, data_type=None) -> float:
    """convert_seed_for_submission.eval_single: exact-match accuracy over (one data type of) the questions."""
    qs = [q for q in annotation["questions"] if data_type is None or q["data_type"] == data_type]
    ok = sum(1 for q in qs if _seed_id(q["question_id"]) in results
             and results[_seed_id(q["question_id"])]["text"] == q["answer"])
    return _div(ok, len(qs))


def seed(annotation: dict, answers, out_path) -> dict:
    """Upload JSONL {"question_id", "prediction"} for every SEED question, plus the script's accuracies."""
    results = {a["question_id"]: a for a in answers}
    lines, absent = [], []
    for q in annotation["questions"]:
        qid = q["question_id"]
        r = results.get(qid, results.get(_seed_id(qid)))
        if r is None:
            absent.append(qid)
            continue
        lines.append(json.dumps({"question_id": qid, "prediction": r["text"]}) + "\n")
    if absent:
        raise _missing("SEED", absent)
    _write(out_path, "".join(lines))
    return {"accuracy": seed_accuracy(annotation, results),
            "image_accuracy": seed_accuracy(annotation, results, "image"),
            "video_accuracy": seed_accuracy(annotation, results, "video")}
