"""Records what the reference's own evaluation code does on the fixtures (documentation of how
tests/golden/eval_ref/recorded/ was made; the tests only read the recorded files).

    python tests/golden/eval_ref/make_fixtures.py
    git -C /work/.mirror/starriver030515+FUSION/repo archive HEAD | tar -x -C /tmp/fusion_ref
    python tests/golden/eval_ref/record.py /tmp/fusion_ref

Needs torch, transformers, pandas, openpyxl, pyyaml, pyarrow (no GPU, no weights). The reference's
prompt-building scripts (model_vqa*.py, MMMU run_fusion.py) run unchanged with a stand-in model
and tokenizer that record the prompt, the instructs text, max_new_tokens and the image, and answer
with the canned responses of fixtures/responses.json; their answer files then go through the
reference's scorers and converters (eval_*.py, m4c_evaluator, MMMU eval_utils, convert_*.py).
MMMU's random fallback is pinned to the middle choice for the recording (the test passes the same
rule to our scorer).
"""
from __future__ import annotations

import json
import os
import runpy
import shutil
import sys
import tempfile
import types
from argparse import Namespace

HERE = os.path.dirname(os.path.abspath(__file__))
FIX = os.path.join(HERE, "fixtures")
OUT = os.path.join(HERE, "recorded")
REF = sys.argv[1] if len(sys.argv) > 1 else "/tmp/fusion_ref"
LOG = {"prompts": [], "instructs": [], "max_new_tokens": [], "images": []}
RESPONSES: list = []


class FakeTok:
    bos_token_id = None

    def __call__(self, text):
        LOG["instructs"].append(text)
        return Namespace(input_ids=[5, 6, 7])

    def batch_decode(self, ids, skip_special_tokens=True):
        return [RESPONSES.pop(0)]


class FakeModel:
    config = Namespace(mm_use_im_start_end=True, image_aspect_ratio="static_hd")

    def generate(self, input_ids, images=None, max_new_tokens=None, **kw):
        import torch
        LOG["max_new_tokens"].append(max_new_tokens)
        LOG["images"].append(list(images.shape) if images is not None else None)
        return torch.zeros(1, 2, dtype=torch.long)


def _record_prompt(prompt, tokenizer, return_tensors=None):
    import torch
    LOG["prompts"].append(prompt)
    return torch.tensor([1, 2, 3], dtype=torch.long)


def _process_images(images, processor, cfg):
    import torch
    LOG["images"].append([list(im.size) for im in images])
    return torch.zeros(len(images), 5, 3, 4, 4)


def install_stubs():
    import torch
    orig_to = torch.Tensor.to

    def to(self, *a, **kw):
        kw.pop("device", None)
        kw.pop("non_blocking", None)
        a = [x for x in a if x != "cuda"]
        return orig_to(self, *a, **kw) if (a or kw) else self
    torch.Tensor.to = to
    torch.Tensor.cuda = lambda self, *a, **k: self
    sys.path[:0] = [REF, os.path.join(REF, "fusion", "eval", "MMMU", "eval")]
    pkg = types.ModuleType("fusion")
    pkg.__path__ = [os.path.join(REF, "fusion")]
    sys.modules["fusion"] = pkg
    builder = types.ModuleType("fusion.model.builder")
    builder.load_pretrained_model = lambda *a, **k: (FakeTok(), FakeModel(), Namespace(), 4096)
    sys.modules["fusion.model"] = types.ModuleType("fusion.model")
    sys.modules["fusion.model.builder"] = builder
    utils = types.ModuleType("fusion.utils")
    utils.disable_torch_init = lambda: None
    sys.modules["fusion.utils"] = utils
    su = types.ModuleType("shortuuid")
    su.uuid = lambda: "x"
    sys.modules["shortuuid"] = su
    import fusion.mm_utils as mm
    mm.tokenizer_image_token = _record_prompt
    mm.process_images = _process_images


def _reset(responses):
    for v in LOG.values():
        v.clear()
    RESPONSES[:] = list(responses)


def run_script(module: str, argv: list, responses) -> dict:
    """Run one reference model script on canned responses; its log and its answer file."""
    import importlib
    _reset(responses * 4)
    mod = importlib.import_module(module)
    if hasattr(mod, "DataLoader"):       # model_vqa_loader: no worker processes (the log lives here)
        real = mod.DataLoader
        mod.DataLoader = lambda *a, **k: real(*a, **{**k, "num_workers": 0})
    tmp = tempfile.mkdtemp()
    ans = os.path.join(tmp, "answers.jsonl")
    args = Namespace(model_path="/x/fusion-test", model_base=None, answers_file=ans, conv_mode="phi_3",
                     num_chunks=1, chunk_idx=0, temperature=0.0, top_p=None, num_beams=1, max_new_tokens=128,
                     single_pred_prompt=True, answer_prompter=False, all_rounds=False, lang="en")
    for k, v in argv:
        setattr(args, k, v)
    mod.args = args
    mod.eval_model(args)
    rows = [json.loads(x) for x in open(ans)]
    return {"log": {k: list(v) for k, v in LOG.items()}, "answers": rows}


def _fx(*p):
    return os.path.join(FIX, *p)


def record_prompts(resp) -> dict:
    out = {}
    loader = "fusion.eval.model_vqa_loader"
    for name, qfile in (("pope", "pope/llava_pope_test.jsonl"), ("textvqa", "textvqa/llava_textvqa_val_v051_ocr.jsonl"),
                        ("mme", "mme/llava_mme.jsonl"), ("gqa", "gqa/llava_gqa_testdev_balanced.jsonl"),
                        ("vqav2", "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl"), ("vizwiz", "vizwiz/llava_test.jsonl"),
                        ("seed", "seed/llava-seed-bench.jsonl")):
        out[name] = run_script(loader, [("question_file", _fx(qfile)), ("image_folder", _fx("images"))], resp[name])
    out["mmvet"] = run_script("fusion.eval.model_vqa", [("question_file", _fx("mmvet/llava-mm-vet-cot.jsonl")),
                                                        ("image_folder", _fx("images"))], resp["mmvet"])
    out["scienceqa"] = run_script("fusion.eval.model_vqa_science",
                                  [("question_file", _fx("scienceqa/llava_test_CQM-A.json")),
                                   ("image_folder", _fx("images"))], [r or "" for r in resp["scienceqa"]])
    out["cvbench"] = run_script("fusion.eval.model_vqa_cvbench", [("question_file", _fx("cvbench/test.jsonl")),
                                                                  ("image_folder", _fx("images"))], resp["cvbench"])
    out["mmvp"] = run_script("fusion.eval.model_vqa_mmvp", [("question_file", _fx("mmvp/Questions.jsonl")),
                                                            ("image_folder", _fx("images"))], resp["mmvp"])
    tsv_en, tsv_cn = _fx("mmbench/MMBench_TEST_EN_legacy.tsv"), _fx("mmbench/MMBench_TEST_CN_legacy.tsv")
    out["mmbench"] = run_script("fusion.eval.model_vqa_mmbench", [("question_file", tsv_en)], resp["mmbench"])
    out["mmbench_cn"] = run_script("fusion.eval.model_vqa_mmbench", [("question_file", tsv_cn), ("lang", "cn")],
                                   resp["mmbench"])
    out["mmbench_all_rounds"] = run_script("fusion.eval.model_vqa_mmbench",
                                           [("question_file", tsv_en), ("all_rounds", True)], resp["mmbench"])
    return out


def record_mmmu(resp) -> dict:
    """run_fusion.main on the parquet fixture (datasets.load_dataset stood in by a parquet reader)."""
    import io

    import pyarrow.parquet as pq
    from PIL import Image

    def load_dataset(path, subject, split):
        f = os.path.join(path, subject, f"{split}-00000-of-00001.parquet")
        rows = pq.read_table(f).to_pylist() if os.path.exists(f) else []
        for r in rows:
            r["image_1"] = Image.open(io.BytesIO(r["image_1"]["bytes"])) if r["image_1"] else None
        return rows
    ds = types.ModuleType("datasets")
    ds.load_dataset, ds.concatenate_datasets = load_dataset, lambda lists: [x for li in lists for x in li]
    sys.modules["datasets"] = ds
    import random
    random.choice = lambda seq: seq[len(seq) // 2]     # pinned fallback (the reference's is unseeded)
    _reset(resp["mmmu"])
    ans = os.path.join(tempfile.mkdtemp(), "merge_val.jsonl")
    sys.argv = ["run_fusion.py", "--data_path", _fx("mmmu", "MMMU"), "--config_path",
                os.path.join(REF, "fusion/eval/MMMU/eval/configs/llava1.5.yaml"), "--model_path", "/x/fusion-test",
                "--answers-file", ans, "--conv-mode", "phi_3"]
    runpy.run_path(os.path.join(REF, "fusion/eval/MMMU/eval/run_fusion.py"), run_name="__main__")
    log = {k: list(v) for k, v in LOG.items()}
    rows = [json.loads(x) for x in open(ans)]
    from utils.eval_utils import calculate_ins_level_acc, evaluate
    judge, overall = evaluate(rows)
    subjects = {}
    for r in rows:
        subjects.setdefault("_".join(r["id"].split("_")[1:-1]), []).append(r)
    per = {}
    for s, rs in subjects.items():
        per[s] = evaluate(rs)[1]
        per[s]["num_example"] = len(rs)
    import yaml
    cfg = yaml.safe_load(open(os.path.join(REF, "fusion/eval/MMMU/eval/configs/llava1.5.yaml")))
    return {"log": log, "answers": rows, "judge": judge, "overall": overall, "subjects": per,
            "overall_ins": calculate_ins_level_acc(per), "config": cfg}


def _write(name, obj):
    os.makedirs(OUT, exist_ok=True)
    with open(os.path.join(OUT, name), "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")


def main():
    install_stubs()
    resp = json.load(open(_fx("responses.json")))
    prompts = record_prompts(resp)
    prompts["mmmu"] = record_mmmu(resp)
    answers_dir = os.path.join(OUT, "answers")
    os.makedirs(answers_dir, exist_ok=True)
    for name, rec in prompts.items():
        rows = rec.pop("answers")
        if name == "scienceqa":          # question 5 was never answered
            rows = [r for r in rows if r["question_id"] != "5"]
        with open(os.path.join(answers_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    _write("prompts.json", prompts)
    from score_ref import record_scores  # the scorers and converters, on the answer files just written
    _write("scores.json", record_scores(REF, FIX, answers_dir, OUT))


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
    shutil.rmtree(os.path.join(HERE, "__pycache__"), ignore_errors=True)
