"""Benchmark readers build every question as the reference's scripts do: prompts, instructs,
max_new_tokens, images and answer-record fields compared with what the reference's own
model_vqa*.py / MMMU run_fusion.py produced on the same fixture files (recorded by
tests/golden/eval_ref/record.py); malformed files are rejected with file, line and field;
one tiny end-to-end `run`."""
import json
import os

import pytest
from PIL import Image

from fusion_jax.eval.benchmarks import BenchmarkFormatError, fill_template_instructs, read_questions
from fusion_jax.generate.prompts import encode_request

REF = os.path.join(os.path.dirname(__file__), "golden", "eval_ref")
FIX = os.path.join(REF, "fixtures")
PROMPTS = json.load(open(os.path.join(REF, "recorded", "prompts.json"), encoding="utf-8"))
DATA = {"pope": "pope/llava_pope_test.jsonl", "textvqa": "textvqa/llava_textvqa_val_v051_ocr.jsonl",
        "mme": "mme/llava_mme.jsonl", "gqa": "gqa/llava_gqa_testdev_balanced.jsonl",
        "vqav2": "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vizwiz": "vizwiz/llava_test.jsonl",
        "seed": "seed/llava-seed-bench.jsonl", "mmvet": "mmvet/llava-mm-vet-cot.jsonl",
        "scienceqa": "scienceqa/llava_test_CQM-A.json", "cvbench": "cvbench/test.jsonl",
        "mmvp": "mmvp/Questions.jsonl", "mmbench": "mmbench/MMBench_TEST_EN_legacy.tsv",
        "mmbench_cn": "mmbench/MMBench_TEST_CN_legacy.tsv", "mmmu": "mmmu/MMMU"}
CASES = [(b, b, {}) for b in DATA] + [("mmbench_all_rounds", "mmbench", {"all_rounds": True})]
# answer-record fields the reference writes beside question_id / prompt / text
EXTRA = {"cvbench": ("ground_truth", "source"), "mmvp": ("ground_truth",),
         "mmbench": ("round_id", "options", "option_char"), "mmbench_cn": ("round_id", "options", "option_char"),
         "mmbench_all_rounds": ("round_id", "options", "option_char")}


def _questions(bench, **opts):
    qs = read_questions(bench, os.path.join(FIX, DATA[bench]), **opts)
    return fill_template_instructs(qs, "phi_3")


def _image_size(q):
    img = q["image"]
    if isinstance(img, str):
        img = Image.open(os.path.join(FIX, "images", img))
    return list(img.size)


def _ref_images(log):
    """Per question: the processed image's [w, h], or None where the reference passed a zero tensor."""
    out, pending = [], None
    for item in log:
        if item and isinstance(item[0], list):       # process_images([image]) -> its size
            pending = item[0]
        else:                                        # generate(images=...) shape
            out.append(pending if item[-1] == 4 else None)
            pending = None
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from fusion_jax.data.testing import make_tokenizer_folder
    from fusion_jax.data.tokenizer import load_tokenizer
    return load_tokenizer(make_tokenizer_folder(str(tmp_path_factory.mktemp("tok"))))


@pytest.mark.parametrize("name,bench,opts", CASES)
def test_prompts_match_the_reference(tok, name, bench, opts):
    """Through `encode_request` as `run_eval` calls it: prompt text and instruct ids."""
    log = PROMPTS[name]["log"]
    qs = _questions(bench, **opts)
    encs = [encode_request(tok, "phi_3", [(q["text"], None)], has_image=q["image"] is not None,
                           instructs=q["instructs"]) for q in qs]
    assert [e["prompt"] for e in encs] == log["prompts"]
    for e, text in zip(encs, log["instructs"], strict=True):
        assert e["instructs"].tolist() == tok(text)
    assert [q["max_new_tokens"] for q in qs] == log["max_new_tokens"]
    sizes = _ref_images(log["images"])
    for q, size in zip(qs, sizes, strict=True):
        if size is None:     # the reference's zero image: ours none (text-only) or, for MMMU, a grey one
            assert q["image"] is None or (bench == "mmmu" and q["image"].getpixel((0, 0)) == (128, 128, 128))
        else:
            assert _image_size(q) == size


@pytest.mark.parametrize("name,bench,opts", [c for c in CASES if c[1] != "mmmu"])
def test_answer_records_match_the_reference(name, bench, opts):
    from fusion_jax.eval.bench_cli import with_answer_fields
    from fusion_jax.eval.runner import answer_record
    rows = [answer_record(q, "x", "m") for q in with_answer_fields(_questions(bench, **opts))]
    ref = [json.loads(x) for x in open(os.path.join(REF, "recorded", "answers", f"{name}.jsonl"), encoding="utf-8")]
    if bench == "scienceqa":
        rows = [r for r in rows if r["question_id"] != "5"]        # the fixture's unanswered question
    for ours, theirs in zip(rows, ref, strict=True):
        assert ours["question_id"] == theirs["question_id"]
        assert ours["prompt"] == theirs["prompt"]
        for k in EXTRA.get(name, ()):
            assert ours[k] == theirs[k], k


def test_instructs_override(tok):
    """A text-only question keeps the instructs its benchmark gives (ScienceQA, CV-Bench); without
    one it reads nothing ([0]), as before."""
    enc = encode_request(tok, "phi_3", [("Which word?", None)], has_image=False, instructs="Which word?")
    assert enc["instructs"].tolist() == tok("Which word?")
    assert encode_request(tok, "phi_3", [("Which word?", None)], has_image=False)["instructs"].tolist() == [0]


def test_mmmu_prompt_config_is_the_reference_yaml():
    from fusion_jax.eval.benchmarks.mmmu import PROMPT_CONFIG
    cfg = PROMPTS["mmmu"]["config"]
    assert {k: v[0] for k, v in cfg.items() if k != "temperature"} == PROMPT_CONFIG
    ref = {r["id"]: r["question"] for r in [json.loads(x) for x in open(
        os.path.join(REF, "recorded", "answers", "mmmu.jsonl"), encoding="utf-8")]}
    assert {q["question_id"]: q["text"] for q in _questions("mmmu")} == ref


def test_mmmu_json_layout(tmp_path):
    """The same questions from a JSON file with image_1 paths."""
    qs = _questions("mmmu")
    recs = []
    for q in qs:
        m = q["meta"]
        recs.append({"id": q["question_id"], "question": "x", "options": repr(m["options"]), "answer": m["answer"],
                     "question_type": m["question_type"], "image_1": "a.png"})
    p = tmp_path / "mmmu.json"
    p.write_text(json.dumps(recs))
    got = read_questions("mmmu", str(p))
    assert [g["image"] for g in got] == ["a.png"] * len(qs)
    assert [g["meta"]["options"] for g in got] == [q["meta"]["options"] for q in qs]


def _bad(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


@pytest.mark.parametrize("bench,name,text,where", [
    ("pope", "q.jsonl", '{"question_id": 1, "image": "a.png", "text": "x", "category": "random"}\n'
                        '{"question_id": 2, "image": "a.png", "category": "random"}\n', ("line 2", "'text'")),
    ("textvqa", "q.jsonl", '{"question_id": 1, "image": "a.png", "text": "x"}\n{not json\n', ("line 2", "JSON")),
    ("mmvp", "q.jsonl", '{"Index": 1, "Question": "q", "Options": 3, "Correct Answer": "A"}\n',
     ("line 1", "'Options'")),
    ("scienceqa", "q.json", '[{"id": "1", "conversations": []}]', ("record 0", "'conversations'")),
    ("cvbench", "q.jsonl", '{"id": 0, "prompt": "p", "answer": "A"}\n', ("line 1", "'source'")),
    ("mmbench", "q.tsv", "index\tquestion\thint\tA\tB\tC\tD\timage\n1\tq\tnan\tx\ty\tnan\tnan\tnot-an-image\n",
     ("line 2", "'image'")),
    ("mmmu", "q.jsonl", '{"id": "validation_Art_1", "question": "q", "options": "[1, 2", "answer": "A", '
                        '"question_type": "multiple-choice", "image_1": null}\n', ("line 1", "'options'")),
    ("mmmu", "r.jsonl", '{"id": "validation_Art_1", "question": "q", "options": "[\'a\']", "answer": "C", '
                        '"question_type": "multiple-choice", "image_1": null}\n', ("line 1", "'answer'")),
])
def test_malformed_files_name_file_line_field(tmp_path, bench, name, text, where):
    path = _bad(tmp_path, name, text)
    with pytest.raises(BenchmarkFormatError) as e:
        read_questions(bench, path)
    msg = str(e.value)
    assert path in msg and all(w in msg for w in where), msg


def test_list_names_files_and_scripts(capsys):
    from fusion_jax.eval.__main__ import main
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for bench in DATA:
        assert f"\n{bench}\n" in f"\n{out}"
    assert "model_vqa_mmbench.py" in out and "run_fusion.py" in out and "MMBench_TEST_EN_legacy.tsv" in out


def test_run_scienceqa_end_to_end(tmp_path):
    """`run` on a tiny checkpoint: an image question and a text-only one (the instructs override)."""
    from fusion_jax.eval.__main__ import main
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    ckpt, _, _ = write_tiny_checkpoint(str(tmp_path / "ckpt"))
    out = str(tmp_path / "answers.jsonl")
    assert main(["run", "--benchmark", "scienceqa", "--ckpt", ckpt, "--data", os.path.join(FIX, DATA["scienceqa"]),
                 "--image-folder", os.path.join(FIX, "images"), "--out", out, "--limit", "2",
                 "--max-new-tokens", "1", "--query-len", "4", "--batch-size", "2", "--instruct-bucket", "64",
                 "--no-progress"]) == 0
    rows = [json.loads(x) for x in open(out)]
    ref = [json.loads(x) for x in open(os.path.join(REF, "recorded", "answers", "scienceqa.jsonl"))][:2]
    assert [r["question_id"] for r in rows] == ["1", "2"]
    assert [r["prompt"] for r in rows] == [r["prompt"] for r in ref]
    assert all(isinstance(r["text"], str) for r in rows)
