"""Benchmark readers: each turns a benchmark's released files into question dicts built exactly
as the reference's script for that benchmark builds them (see `common` for the dict).

    from fusion_jax.eval.benchmarks import BENCHMARKS, read_questions
    qs = read_questions("pope", "llava_pope_test.jsonl")
"""
from __future__ import annotations

from dataclasses import dataclass

from fusion_jax.eval.benchmarks import choice, mmbench, mmmu, vqa
from fusion_jax.eval.benchmarks.common import BenchmarkFormatError, question


@dataclass(frozen=True)
class Benchmark:
    name: str
    read: object           # (path, **options) -> [question dict]
    data: str              # what --data points at
    images: str            # what --image-folder points at
    script: str            # the reference script that builds the prompts
    scoring: str           # how the numbers are obtained


_LOADER = "fusion/eval/model_vqa_loader.py"
BENCHMARKS = {b.name: b for b in (
    Benchmark("pope", vqa.read_pope, "llava_pope_test.jsonl", "COCO val2014 images",
              f"scripts/eval/pope.sh ({_LOADER})",
              "score: eval_pope.py (--questions llava_pope_test.jsonl --annotations coco/ with coco_pope_*.json)"),
    Benchmark("textvqa", vqa.read_loader, "llava_textvqa_val_v051_ocr.jsonl", "train_images",
              f"scripts/eval/textvqa.sh ({_LOADER})", "score: eval_textvqa.py (--annotations TextVQA_0.5.1_val.json)"),
    Benchmark("scienceqa", choice.read_scienceqa, "llava_test_CQM-A.json", "images/test",
              "scripts/eval/sqa.sh (fusion/eval/model_vqa_science.py)",
              "score: eval_science_qa.py (--annotations folder with problems.json, pid_splits.json)"),
    Benchmark("mmbench", mmbench.read_mmbench, "MMBench_TEST_EN_legacy.tsv", "(images inside the TSV)",
              "scripts/eval/mmbench_test.sh (fusion/eval/model_vqa_mmbench.py)",
              "convert: convert_mmbench_for_submission.py -> .xlsx for the OpenCompass server"),
    Benchmark("mmbench_cn", mmbench.read_mmbench_cn, "MMBench_TEST_CN_legacy.tsv", "(images inside the TSV)",
              "scripts/eval/mmbench_cn_test.sh (fusion/eval/model_vqa_mmbench.py --lang cn)",
              "convert: convert_mmbench_for_submission.py -> .xlsx for the OpenCompass server"),
    Benchmark("cvbench", choice.read_cvbench, "CVBench/test.jsonl", "CVBench/img",
              "scripts/eval/cvbench.sh (fusion/eval/model_vqa_cvbench.py)", "score: eval_cvbench_qa.py"),
    Benchmark("mmvp", choice.read_mmvp, "MMVP/Questions.jsonl", "MMVP/MMVP_Images ({Index}.jpg)",
              "scripts/eval/mmvp.sh (fusion/eval/model_vqa_mmvp.py)", "score: eval_mmvp_qa.py"),
    Benchmark("mmmu", mmmu.read_mmmu, "MMMU folder (<Subject>/validation-*.parquet), a parquet or a JSON file",
              "(images inside the parquet; for JSON: image_1 paths)",
              "scripts/eval/mmmu_val.sh (fusion/eval/MMMU/eval/run_fusion.py, configs/llava1.5.yaml)",
              "score: MMMU/eval/eval.py + main_eval_only.py (seeded where the reference picks at random)"),
    Benchmark("mme", vqa.read_loader, "MME/llava_mme.jsonl", "MME/MME_Benchmark_release_version",
              f"scripts/eval/mme.sh ({_LOADER})", "MME's own eval_tool/calculation.py (not in the reference repo)"),
    Benchmark("mmvet", vqa.read_mmvet, "mm-vet/llava-mm-vet-cot.jsonl", "mm-vet/images",
              "scripts/eval/mmvet.sh (fusion/eval/model_vqa.py)",
              "convert: convert_mmvet_for_eval.py -> JSON for the MM-Vet GPT-4 grader"),
    Benchmark("gqa", vqa.read_loader, "gqa/llava_gqa_testdev_balanced.jsonl", "gqa/images",
              f"{_LOADER} (LLaVA's gqa.sh; no script in the reference)",
              "convert: convert_gqa_for_eval.py -> GQA's eval.py"),
    Benchmark("vqav2", vqa.read_loader, "vqav2/llava_vqav2_mscoco_test-dev2015.jsonl", "vqav2/test2015",
              f"{_LOADER} (LLaVA's vqav2.sh; no script in the reference)",
              "convert: convert_vqav2_for_submission.py (--annotations llava_vqav2_mscoco_test2015.jsonl) -> EvalAI"),
    Benchmark("vizwiz", vqa.read_loader, "vizwiz/llava_test.jsonl", "vizwiz/test",
              f"scripts/eval/vizwiz.sh ({_LOADER})",
              "convert: convert_vizwiz_for_submission.py (--annotations llava_test.jsonl) -> EvalAI"),
    Benchmark("seed", vqa.read_loader, "seed_bench/llava-seed-bench.jsonl", "seed_bench (images, video frames)",
              f"{_LOADER} (LLaVA's seed.sh; no script in the reference)",
              "convert: convert_seed_for_submission.py (--annotations SEED-Bench.json) -> upload JSONL + accuracy"),
)}


def get_benchmark(name: str) -> Benchmark:
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def read_questions(name: str, path, **options) -> list:
    """Question dicts of benchmark `name` from its file (options: all_rounds for MMBench, split for MMMU)."""
    return get_benchmark(name).read(path, **options)


def fill_template_instructs(questions, template) -> list:
    """MMMU's instructs are the rendered prompt: fill them in once the chat template is known."""
    for q in questions:
        if q["meta"].get("instructs_from_prompt"):
            q["instructs"] = mmmu.mmmu_instructs(q["text"], template)
    return questions


def list_text() -> str:
    lines = []
    for b in BENCHMARKS.values():
        lines += [b.name, f"  --data          {b.data}", f"  --image-folder  {b.images}",
                  f"  reference       {b.script}", f"  numbers         {b.scoring}"]
    return "\n".join(lines)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkFormatError", "fill_template_instructs", "get_benchmark",
           "list_text", "question", "read_questions"]
