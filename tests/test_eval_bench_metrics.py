"""Our benchmark metrics and submission files against the reference's own scorers and converters,
run on the same answer files (fusion/eval/eval_*.py, m4c_evaluator, MMMU eval_utils,
scripts/convert_*.py; recorded by tests/golden/eval_ref/record.py): equal to 1e-9, files equal
byte for byte. The answers hold the tricky cases ("Yes, there is...", "No there isn't.", "(B)",
"The answer is C.", "10,000", "Coca-Cola.", a missing prediction, more letters than choices)."""
import json
import os

import pytest

from fusion_jax.eval import metrics
from fusion_jax.eval.bench_score import read_answers
from fusion_jax.eval.evalai import normalize_vqa_answer
from fusion_jax.eval.mmmu_metrics import parse_multi_choice, parse_open, score_mmmu

REF = os.path.join(os.path.dirname(__file__), "golden", "eval_ref")
FIX = os.path.join(REF, "fixtures")
SCORES = json.load(open(os.path.join(REF, "recorded", "scores.json"), encoding="utf-8"))


def _answers(name):
    return os.path.join(REF, "recorded", "answers", f"{name}.jsonl")


def _close(ours: dict, ref: dict):
    for k, v in ref.items():
        if isinstance(v, dict):
            _close(ours[k], v)
        else:
            assert ours[k] == pytest.approx(v, abs=1e-9), k


def _cli_json(capsys, *argv) -> dict:
    from fusion_jax.eval.__main__ import main
    assert main(["score", *argv, "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    return res


def _fractions(d):
    for k, v in d.items():
        if isinstance(v, dict):
            _fractions(v)
        elif isinstance(v, float):
            assert 0.0 <= v <= 1.0, k


def test_pope(capsys):
    pope = os.path.join(FIX, "pope")
    res = _cli_json(capsys, "--benchmark", "pope", "--pred", _answers("pope"), "--questions",
                    os.path.join(pope, "llava_pope_test.jsonl"), "--annotations", os.path.join(pope, "coco"))
    _close(res, SCORES["pope"])
    assert set(res["categories"]["random"]) == {"accuracy", "precision", "recall", "f1", "yes_ratio"}
    _fractions(res)
    assert metrics.pope_says_no("No there isn't.") and not metrics.pope_says_no("Yes, there is a dog.")


def test_pope_missing_answer_keeps_labels_aligned():
    """Question 10 unanswered: equal to the reference run without that answer *and* its label line
    (the reference itself would pair every later label with the wrong answer)."""
    qs = [json.loads(x) for x in open(os.path.join(FIX, "pope", "llava_pope_test.jsonl"))]
    labels = {c: [json.loads(x)["label"] for x in open(os.path.join(FIX, "pope", "coco", f"coco_pope_{c}.json"))]
              for c in ("adversarial", "popular", "random")}
    answers = [a for a in read_answers(_answers("pope")) if a["question_id"] != 10]
    res = metrics.score_pope(answers, qs, labels)
    _close(res, SCORES["pope_without_q10"])
    assert res["missing"] == 1


def test_textvqa(capsys):
    res = _cli_json(capsys, "--benchmark", "textvqa", "--pred", _answers("textvqa"), "--annotations",
                    os.path.join(FIX, "textvqa", "TextVQA_0.5.1_val.json"))
    assert res["accuracy"] == pytest.approx(SCORES["textvqa"]["accuracy"], abs=1e-9)
    for raw, norm in SCORES["textvqa"]["normalized"].items():
        assert normalize_vqa_answer(raw) == norm, raw


def test_scienceqa(capsys, tmp_path):
    sqa = os.path.join(FIX, "scienceqa")
    res = _cli_json(capsys, "--benchmark", "scienceqa", "--pred", _answers("scienceqa"), "--annotations", sqa)
    _close(res, SCORES["scienceqa"])
    assert set(res) == {"accuracy", "img_accuracy", "total", "correct"}
    # answers whose prompt lacks the <image> tag: IMG questions come from --questions
    plain = tmp_path / "a.jsonl"
    plain.write_text("".join(json.dumps({**a, "prompt": a["prompt"].replace("<image>\n", "")}) + "\n"
                             for a in read_answers(_answers("scienceqa"))))
    res2 = _cli_json(capsys, "--benchmark", "scienceqa", "--pred", str(plain), "--annotations", sqa,
                     "--questions", os.path.join(sqa, "llava_test_CQM-A.json"))
    _close(res2, SCORES["scienceqa"])


def test_cvbench_and_mmvp(capsys, tmp_path):
    res = _cli_json(capsys, "--benchmark", "cvbench", "--pred", _answers("cvbench"))
    _close(res, SCORES["cvbench"])
    assert set(res) == {"accuracy", "accuracy_2d", "accuracy_3d", "ADE20K", "COCO", "Omni3D"}
    res = _cli_json(capsys, "--benchmark", "mmvp", "--pred", _answers("mmvp"))
    _close(res, SCORES["mmvp"])
    # answers without the ground-truth fields take them from --questions
    bare = tmp_path / "a.jsonl"
    bare.write_text("".join(json.dumps({"question_id": a["question_id"], "text": a["text"]}) + "\n"
                            for a in read_answers(_answers("cvbench"))))
    res = _cli_json(capsys, "--benchmark", "cvbench", "--pred", str(bare), "--questions",
                    os.path.join(FIX, "cvbench", "test.jsonl"))
    _close(res, SCORES["cvbench"])
    assert metrics.parse_letter("E", metrics.SQA_OPTIONS[:5]) == "E" and metrics.gold_letter("(B)") == "B"


def _mmmu_rows():
    ref = [json.loads(x) for x in open(_answers("mmmu"), encoding="utf-8")]
    return ref, read_answers(_answers("mmmu"))      # run_fusion's records read as model_vqa ones


def test_mmmu_parsing_and_accuracy():
    ref, ours = _mmmu_rows()
    def middle(qid, ch):      # record.py pinned the reference's random.choice to this
        return ch[len(ch) // 2]
    for r in ref:
        if r["question_type"] == "multiple-choice":
            choices = sorted(r["index2ans"])
            got = parse_multi_choice(r["response"], choices, r["index2ans"], fallback=lambda c: c[len(c) // 2])
            assert got == r["parsed_pred"], r["id"]
        else:
            assert sorted(map(str, parse_open(r["response"]))) == sorted(map(str, r["parsed_pred"])), r["id"]
    mm = json.load(open(os.path.join(REF, "recorded", "prompts.json"), encoding="utf-8"))["mmmu"]
    res = score_mmmu(ours, {a["question_id"]: {"options": [], **a} for a in ours}, fallback=middle)
    assert res["accuracy"] == pytest.approx(mm["overall"]["acc"], abs=1e-9)
    for subj, m in mm["subjects"].items():
        assert res["subjects"][subj]["accuracy"] == pytest.approx(m["acc"], abs=1e-9)
        assert res["subjects"][subj]["num"] == m["num_example"]
    assert res["random_fallbacks"] == 1      # "I am not sure which painter..."


def test_mmmu_cli_gold_from_data_is_seeded(capsys, tmp_path):
    _, ours = _mmmu_rows()
    p = tmp_path / "a.jsonl"
    p.write_text("".join(json.dumps({"question_id": a["question_id"], "text": a["text"]}) + "\n" for a in ours))
    args = ("--benchmark", "mmmu", "--pred", str(p), "--questions", os.path.join(FIX, "mmmu", "MMMU"))
    first, second = _cli_json(capsys, *args), _cli_json(capsys, *args)
    assert first == second and first["random_fallbacks"] == 1 and "seed 42" in first["fallback"]
    _fractions(first)
    assert set(first["subjects"]) == {"Accounting", "Art_Theory", "Math"}


def _convert(tmp_path, bench, *extra, ext="json"):
    from fusion_jax.eval.__main__ import main
    out = str(tmp_path / f"{bench}.{ext}")
    assert main(["convert", "--benchmark", bench, "--pred", _answers(bench), "--out", out, *extra]) == 0
    return out


def test_converters_write_what_the_reference_writes(tmp_path):
    conv = SCORES["converters"]
    assert open(_convert(tmp_path, "gqa")).read() == conv["gqa"]
    assert open(_convert(tmp_path, "mmvet")).read() == conv["mmvet"]
    assert open(_convert(tmp_path, "vizwiz", "--annotations", os.path.join(FIX, "vizwiz", "llava_test.jsonl"))
                ).read() == conv["vizwiz"]
    assert open(_convert(tmp_path, "vqav2", "--annotations", os.path.join(
        FIX, "vqav2", "llava_vqav2_mscoco_test2015.jsonl"))).read() == conv["vqav2"]
    from fusion_jax.eval.submission import seed
    doc = json.load(open(os.path.join(FIX, "seed", "SEED-Bench.json")))
    acc = seed(doc, read_answers(_answers("seed")), str(tmp_path / "seed.jsonl"))
    assert open(tmp_path / "seed.jsonl").read() == conv["seed"]["upload"]
    printed = conv["seed"]["printed"]
    assert f"Total accuracy: {acc['accuracy'] * 100:.2f}%" in printed
    assert f"image accuracy: {acc['image_accuracy'] * 100:.2f}%" in printed
    assert f"video accuracy: {acc['video_accuracy'] * 100:.2f}%" in printed


@pytest.mark.parametrize("bench,tsv", [("mmbench", "MMBench_TEST_EN_legacy.tsv"),
                                       ("mmbench_cn", "MMBench_TEST_CN_legacy.tsv")])
def test_mmbench_sheet(tmp_path, bench, tsv):
    import openpyxl
    out = _convert(tmp_path, bench, "--questions", os.path.join(FIX, "mmbench", tsv), ext="xlsx")
    cells = [list(r) for r in openpyxl.load_workbook(out).active.iter_rows(values_only=True)]
    assert cells == SCORES["converters"][bench]


def test_missing_answers_are_named(tmp_path):
    from fusion_jax.eval.submission import vizwiz
    qs = [json.loads(x) for x in open(os.path.join(FIX, "vizwiz", "llava_test.jsonl"))]
    with pytest.raises(ValueError, match="VizWiz_test_1.jpg"):
        vizwiz(qs, read_answers(_answers("vizwiz"))[:1], str(tmp_path / "v.json"))


def test_score_refuses_server_scored_benchmarks(capsys):
    from fusion_jax.eval.__main__ import main
    assert main(["score", "--benchmark", "mmbench", "--pred", _answers("mmbench")]) == 2
    assert "convert" in capsys.readouterr().err
