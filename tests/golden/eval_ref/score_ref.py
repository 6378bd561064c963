"""The reference's scorers and converters on the recorded answer files (called by record.py, which
has installed the `fusion` package stand-ins first). Values come from the scripts' own variables
(runpy globals) or their full-precision prints; SEED's accuracies exist only as printed "%.2f"."""
from __future__ import annotations

import contextlib
import io
import json
import os
import runpy
import shutil
import sys
import tempfile


def _run(script: str, argv: list) -> tuple:
    sys.argv = [script, *argv]
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        g = runpy.run_path(script, run_name="__main__")
    return g, buf.getvalue()


def _pope(ref, fix, answers, drop_qid=None) -> dict:
    ann = os.path.join(fix, "pope", "coco")
    res = answers
    if drop_qid is not None:       # the reference with the answer *and* its label removed
        qs = [json.loads(x) for x in open(os.path.join(fix, "pope", "llava_pope_test.jsonl"))]
        cat = next(q["category"] for q in qs if q["question_id"] == drop_qid)
        pos = [q["question_id"] for q in qs if q["category"] == cat].index(drop_qid)
        ann = tempfile.mkdtemp()
        for f in os.listdir(os.path.join(fix, "pope", "coco")):
            lines = open(os.path.join(fix, "pope", "coco", f)).readlines()
            if f == f"coco_pope_{cat}.json":
                del lines[pos]
            open(os.path.join(ann, f), "w").writelines(lines)
        res = os.path.join(tempfile.mkdtemp(), "a.jsonl")
        open(res, "w").writelines(x for x in open(answers) if json.loads(x)["question_id"] != drop_qid)
    _, out = _run(os.path.join(ref, "fusion/eval/eval_pope.py"),
                  ["--annotation-dir", ann, "--question-file", os.path.join(fix, "pope", "llava_pope_test.jsonl"),
                   "--result-file", res])
    cats, cur = {}, None
    keys = {"Accuracy": "accuracy", "Precision": "precision", "Recall": "recall", "F1 score": "f1",
            "Yes ratio": "yes_ratio"}
    for line in out.splitlines():
        if line.startswith("Category: "):
            cur = cats.setdefault(line[len("Category: "):].split(",")[0], {})
        elif ": " in line and line.split(": ")[0] in keys:
            cur[keys[line.split(": ")[0]]] = float(line.split(": ")[1])
    return {"categories": cats}


def _textvqa(fix, answers) -> dict:
    from fusion.eval import eval_textvqa, m4c_evaluator
    got = {}
    real = m4c_evaluator.TextVQAAccuracyEvaluator.eval_pred_list

    def capture(self, pred_list):
        got["accuracy"] = real(self, pred_list)
        return got["accuracy"]
    m4c_evaluator.TextVQAAccuracyEvaluator.eval_pred_list = capture
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        eval_textvqa.eval_single(os.path.join(fix, "textvqa", "TextVQA_0.5.1_val.json"), answers)
    proc = m4c_evaluator.EvalAIAnswerProcessor()
    probes = ["Coca-Cola.", "10,000", "The answer is 2005", "STOP!", "Two", "None", "a man's hat, (left)",
              "it's 3.5 m.", "1,000.5 yes; no", "Dont go!", "x . y", "e.g. U.S.A.", "the cat's toy", "#1 - best"]
    return {**got, "normalized": {p: proc(p) for p in probes}}


def _sqa(ref, fix, answers) -> dict:
    tmp = tempfile.mkdtemp()
    g, _ = _run(os.path.join(ref, "fusion/eval/eval_science_qa.py"),
                ["--base-dir", os.path.join(fix, "scienceqa"), "--result-file", answers,
                 "--output-file", os.path.join(tmp, "o.json"), "--output-result", os.path.join(tmp, "r.json")])
    return {"accuracy": g["correct"] / g["total"], "img_accuracy": g["multimodal_correct"] / g["multimodal_total"],
            "total": g["total"], "correct": g["correct"]}


def _cvbench(ref, answers) -> dict:
    g, _ = _run(os.path.join(ref, "fusion/eval/eval_cvbench_qa.py"), ["--base-dir", "x", "--output-file", answers])
    return {"accuracy": g["combined_accuracy"], "accuracy_2d": g["accuracy_2d"], "accuracy_3d": g["accuracy_3d"],
            "ADE20K": g["accuracy_2d_ade"], "COCO": g["accuracy_2d_coco"], "Omni3D": g["accuracy_3d_omni"]}


def _converters(ref, fix, adir) -> dict:
    out, tmp = {}, tempfile.mkdtemp()
    scripts = os.path.join(ref, "scripts")
    for name, tsv in (("mmbench", "MMBench_TEST_EN_legacy.tsv"), ("mmbench_cn", "MMBench_TEST_CN_legacy.tsv")):
        rd = os.path.join(tmp, name)
        os.makedirs(rd)
        shutil.copy(os.path.join(adir, f"{name}.jsonl"), os.path.join(rd, "exp.jsonl"))
        _run(os.path.join(scripts, "convert_mmbench_for_submission.py"),
             ["--annotation-file", os.path.join(fix, "mmbench", tsv), "--result-dir", rd, "--upload-dir", rd,
              "--experiment", "exp"])
        import openpyxl
        ws = openpyxl.load_workbook(os.path.join(rd, "exp.xlsx")).active
        out[name] = [list(r) for r in ws.iter_rows(values_only=True)]
    dst = os.path.join(tmp, "vizwiz.json")
    _run(os.path.join(scripts, "convert_vizwiz_for_submission.py"),
         ["--annotation-file", os.path.join(fix, "vizwiz", "llava_test.jsonl"), "--result-file",
          os.path.join(adir, "vizwiz.jsonl"), "--result-upload-file", dst])
    out["vizwiz"] = open(dst).read()
    vq = os.path.join(tmp, "vqav2")
    os.makedirs(os.path.join(vq, "answers", "test", "ck"))
    shutil.copy(os.path.join(adir, "vqav2.jsonl"), os.path.join(vq, "answers", "test", "ck", "merge.jsonl"))
    shutil.copy(os.path.join(fix, "vqav2", "llava_vqav2_mscoco_test2015.jsonl"), vq)
    _run(os.path.join(scripts, "convert_vqav2_for_submission.py"), ["--dir", vq, "--ckpt", "ck", "--split", "test"])
    out["vqav2"] = open(os.path.join(vq, "answers_upload", "test", "ck.json")).read()
    for name, script in (("gqa", "convert_gqa_for_eval.py"), ("mmvet", "convert_mmvet_for_eval.py")):
        dst = os.path.join(tmp, name + ".json")
        _run(os.path.join(scripts, script), ["--src", os.path.join(adir, f"{name}.jsonl"), "--dst", dst])
        out[name] = open(dst).read()
    dst = os.path.join(tmp, "seed.jsonl")
    _, printed = _run(os.path.join(scripts, "convert_seed_for_submission.py"),
                      ["--annotation-file", os.path.join(fix, "seed", "SEED-Bench.json"), "--result-file",
                       os.path.join(adir, "seed.jsonl"), "--result-upload-file", dst])
    out["seed"] = {"upload": open(dst).read(), "printed": printed.splitlines()}
    return out


def record_scores(ref, fix, adir, out_dir) -> dict:
    a = {n: os.path.join(adir, f"{n}.jsonl") for n in ("pope", "textvqa", "scienceqa", "cvbench", "mmvp")}
    mmvp, _ = _run(os.path.join(ref, "fusion/eval/eval_mmvp_qa.py"), ["--base-dir", "x", "--output-file", a["mmvp"]])
    return {"pope": _pope(ref, fix, a["pope"]), "pope_without_q10": _pope(ref, fix, a["pope"], drop_qid=10),
            "textvqa": _textvqa(fix, a["textvqa"]), "scienceqa": _sqa(ref, fix, a["scienceqa"]),
            "cvbench": _cvbench(ref, a["cvbench"]), "mmvp": {"accuracy": mmvp["accuracy"]},
            "converters": _converters(ref, fix, adir)}
