"""`score` and `convert` for the paper's benchmarks: read the files each reference scorer reads,
then call `metrics` / `mmmu_metrics` / `submission`."""
from __future__ import annotations

from etils import epath

from fusion_jax.eval import metrics, submission
from fusion_jax.eval.benchmarks import read_questions
from fusion_jax.eval.benchmarks.common import BenchmarkFormatError, json_document, jsonl_records

SCORED = ("pope", "textvqa", "scienceqa", "cvbench", "mmvp", "mmmu")
CONVERTED = ("mmbench", "mmbench_cn", "vizwiz", "vqav2", "gqa", "mmvet", "seed")


def _from_mmmu_reference(rec: dict) -> dict:
    """MMMU run_fusion.py's own records (id, response, index2ans) in the model_vqa names."""
    if "question_id" in rec or not {"id", "response"} <= rec.keys():
        return rec
    out = {**rec, "question_id": rec["id"], "text": rec["response"]}
    if isinstance(rec.get("index2ans"), dict):
        out["options"] = list(rec["index2ans"].values())
    return out


def read_answers(path) -> list:
    rows = []
    for n, rec in jsonl_records(path):
        rec = _from_mmmu_reference(rec)
        for key, types in (("question_id", (str, int)), ("text", (str,))):
            if not isinstance(rec.get(key), types):
                raise BenchmarkFormatError(path, n, key, "missing or not a " + "/".join(t.__name__ for t in types))
        rows.append(rec)
    return rows


def _need(value, flag: str, bench: str, what: str):
    if not value:
        raise ValueError(f"{bench}: {flag} is required ({what})")
    return value


def _with_meta(answers, questions_path, bench: str, keys) -> list:
    """Answers carrying the gold fields the reference's answer files carry, from --questions if absent."""
    if all(all(k in a for k in keys) for a in answers):
        return answers
    qs = {q["question_id"]: q for q in read_questions(bench, _need(questions_path, "--questions", bench,
                                                                     f"the question file, for {keys}"))}
    out = []
    for a in answers:
        q = qs.get(a["question_id"])
        if q is None:
            raise ValueError(f"{bench}: answer {a['question_id']!r} is not in {questions_path}")
        out.append({**{k: q["meta"][k] for k in keys if k in q["meta"]}, "prompt": q["meta"].get("prompt", q["text"]),
                    **a})
    return out


def _pope(answers, a) -> dict:
    qs = [rec for _, rec in jsonl_records(_need(a.questions, "--questions", "pope", "llava_pope_test.jsonl"))]
    folder = epath.Path(_need(a.annotations, "--annotations", "pope", "the folder of coco_pope_CAT.json"))
    labels = {}
    for f in sorted(folder.iterdir()):
        if not (f.name.startswith("coco_pope_") and f.name.endswith(".json")):
            raise ValueError(f"{f}: the POPE annotation folder holds only coco_pope_CAT.json files")
        labels[f.name[len("coco_pope_"):-len(".json")]] = [r.get("label") for _, r in jsonl_records(f)]
    return metrics.score_pope(answers, qs, labels)


def _textvqa(answers, a) -> dict:
    doc = json_document(_need(a.annotations, "--annotations", "textvqa", "TextVQA_0.5.1_val.json"))
    return metrics.score_textvqa(_with_meta(answers, a.questions, "textvqa", ("prompt",)), doc["data"])


def _scienceqa(answers, a) -> dict:
    base = epath.Path(_need(a.annotations, "--annotations", "scienceqa", "the folder of problems.json"))
    splits, problems = json_document(base / "pid_splits.json"), json_document(base / "problems.json")
    split = a.split or "test"
    if split not in splits:
        raise ValueError(f"{base / 'pid_splits.json'}: no split {split!r} (has {sorted(splits)})")
    image_ids = set()
    if a.questions:
        image_ids = {q["question_id"] for q in read_questions("scienceqa", a.questions) if q["image"] is not None}
    return metrics.score_scienceqa(answers, problems, splits[split], image_ids)


def _mmmu(answers, a) -> dict:
    from fusion_jax.eval.mmmu_metrics import score_mmmu
    def has_gold(x):
        return "question_type" in x and "answer" in x and ("options" in x or x["question_type"] != "multiple-choice")
    if all(has_gold(x) for x in answers):
        golds = {x["question_id"]: x for x in answers}
    else:
        qs = read_questions("mmmu", _need(a.questions, "--questions", "mmmu", "the MMMU data, for the gold answers"),
                            split=a.split)
        golds = {q["question_id"]: q["meta"] for q in qs}
    return score_mmmu(answers, golds, seed=a.seed)


def score(bench: str, a) -> dict:
    """a: argparse namespace with pred, questions, annotations, split, seed."""
    answers = read_answers(a.pred)
    if bench == "pope":
        return _pope(answers, a)
    if bench == "textvqa":
        return _textvqa(answers, a)
    if bench == "scienceqa":
        return _scienceqa(answers, a)
    if bench == "cvbench":
        return metrics.score_cvbench(_with_meta(answers, a.questions, bench, ("ground_truth", "source")))
    if bench == "mmvp":
        return metrics.score_mmvp(_with_meta(answers, a.questions, bench, ("ground_truth",)))
    if bench == "mmmu":
        return _mmmu(answers, a)
    raise ValueError(f"{bench} is scored by its own server or tool: use `convert` ({', '.join(CONVERTED)}); "
                     f"`score` knows {', '.join(SCORED)}")


def convert(bench: str, a) -> dict:
    """a: namespace with pred, questions, annotations, out. Returns a small summary."""
    answers = read_answers(a.pred)
    if bench in ("mmbench", "mmbench_cn"):
        n = submission.mmbench_sheet(_need(a.questions, "--questions", bench, "the MMBench TSV"), answers, a.out)
    elif bench == "vizwiz":
        path = _need(a.annotations or a.questions, "--annotations", bench, "llava_test.jsonl")
        n = submission.vizwiz([r for _, r in jsonl_records(path)], answers, a.out)
    elif bench == "vqav2":
        path = _need(a.annotations, "--annotations", bench, "llava_vqav2_mscoco_test2015.jsonl")
        n = submission.vqav2([r for _, r in jsonl_records(path)], answers, a.out)
    elif bench == "gqa":
        n = submission.gqa(answers, a.out)
    elif bench == "mmvet":
        n = submission.mmvet(answers, a.out)
    elif bench == "seed":
        doc = json_document(_need(a.annotations, "--annotations", bench, "SEED-Bench.json"))
        return {"written": a.out, **submission.seed(doc, answers, a.out)}
    else:
        raise ValueError(f"{bench} has no submission file; `convert` knows {', '.join(CONVERTED)}")
    return {"written": a.out, "rows": n}
