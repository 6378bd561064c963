"""The benchmark subcommands of `python -m fusion_jax.eval`::

    python -m fusion_jax.eval --list
    python -m fusion_jax.eval run --benchmark NAME --ckpt DIR --data PATH [--image-folder DIR] --out ANSWERS.jsonl
    python -m fusion_jax.eval score --benchmark NAME --pred ANSWERS.jsonl [--questions Q] [--annotations PATH]
        [--split S] [--json]
    python -m fusion_jax.eval convert --benchmark NAME --pred ANSWERS.jsonl [--questions Q] [--annotations PATH]
        --out FILE

`--batch-size 1 --instruct-bucket 0` is the setting that reproduces the reference's numbers.
"""
from __future__ import annotations

import argparse
import json
import sys

RUN_INTERNAL_META = ("instructs_from_prompt",)


def run_parser() -> argparse.ArgumentParser:
    """The `run` options; extend it (dtype, mesh, resume, ...) by adding arguments to the returned parser."""
    from fusion_jax.eval.benchmarks import BENCHMARKS
    from fusion_jax.eval.scale import add_scale_args
    from fusion_jax.generate.cli import add_generation_args
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.eval run",
                                 description="Answer a benchmark's questions as the reference's script builds them.")
    add_generation_args(ap)
    add_scale_args(ap)
    ap.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    ap.add_argument("--data", required=True, help="the benchmark's question file (see --list)")
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--out", required=True, help="answers JSONL (model_vqa records + the reference's extra fields)")
    ap.add_argument("--all-rounds", action="store_true", help="MMBench: ask once per option rotation")
    ap.add_argument("--split", default=None, help="MMMU split (default validation)")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--seq-bucket", type=int, default=64)
    ap.add_argument("--instruct-bucket", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    ap.set_defaults(max_new_tokens=None)      # None: the benchmark's own (the reference script's)
    return ap


def with_answer_fields(questions, max_new_tokens=None) -> list:
    """The reference's extra answer fields (its prompt, ground truth, rounds...) ride on each question."""
    out = []
    for q in questions:
        fields = {k: v for k, v in q["meta"].items() if k not in RUN_INTERNAL_META}
        out.append({**q, "answer_fields": fields, "max_new_tokens": max_new_tokens or q["max_new_tokens"]})
    return out


def run_main(argv) -> int:
    if "--list" in argv:
        return list_main()
    a = run_parser().parse_args(argv)
    from etils import epath

    from fusion_jax.eval.benchmarks import fill_template_instructs, read_questions
    from fusion_jax.eval.scale import load_for_eval, run_questions
    from fusion_jax.generate.cli import generation_config
    from fusion_jax.generate.prompts import default_template
    try:
        questions = read_questions(a.benchmark, a.data, all_rounds=a.all_rounds, split=a.split)
        questions = questions[:a.limit] if a.limit else questions
        tok, model = load_for_eval(a)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gcfg = generation_config(a)              # max_new_tokens: per question (the reference script's)
    gcfg.seq_bucket, gcfg.instruct_bucket = a.seq_bucket, a.instruct_bucket
    fill_template_instructs(questions, a.template or default_template(model.cfg))
    questions = with_answer_fields(questions, a.max_new_tokens)
    model_id = a.model_id or epath.Path(a.ckpt).name
    return run_questions(a, questions, model, tok, gcfg, model_id=model_id)


def _score_parser(prog: str, out: bool) -> argparse.ArgumentParser:
    from fusion_jax.eval.benchmarks import BENCHMARKS
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--benchmark", required=True, choices=sorted(BENCHMARKS))
    ap.add_argument("--pred", required=True, help="answers JSONL")
    ap.add_argument("--questions", default=None, help="the benchmark's question/data file")
    ap.add_argument("--annotations", default=None, help="the gold file or folder the reference scorer reads")
    ap.add_argument("--split", default=None, help="ScienceQA split (default test); MMMU split (default validation)")
    if out:
        ap.add_argument("--out", required=True, help="the file to write")
    else:
        ap.add_argument("--seed", type=int, default=42, help="MMMU: seed of the fallback choice")
        ap.add_argument("--json", action="store_true", help="print the result as one JSON line, last")
    return ap


def _print_result(res: dict, as_json: bool) -> None:
    def walk(d, pad=""):
        for k, v in d.items():
            if isinstance(v, dict):
                print(f"{pad}{k}:")
                walk(v, pad + "  ")
            else:
                print(f"{pad}{k}: {v:.4f}" if isinstance(v, float) else f"{pad}{k}: {v}")
    walk(res)
    if as_json:
        print(json.dumps(res, sort_keys=True))


def _scoring_main(argv, convert: bool) -> int:
    """`score` prints the reference's metric; `convert` writes what a scoring server expects."""
    verb = "convert" if convert else "score"
    a = _score_parser(f"python -m fusion_jax.eval {verb}", out=convert).parse_args(argv)
    from fusion_jax.eval import bench_score
    try:
        res = getattr(bench_score, verb)(a.benchmark, a)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(res, not convert and a.json)
    return 0


def bench_score_main(argv) -> int:
    return _scoring_main(argv, convert=False)


def convert_main(argv) -> int:
    return _scoring_main(argv, convert=True)


def list_main() -> int:
    from fusion_jax.eval.benchmarks import list_text
    print(list_text())
    return 0
