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
import dataclasses
import json
import os
import sys

RUN_INTERNAL_META = ("instructs_from_prompt",)


def run_parser() -> argparse.ArgumentParser:
    """The `run` options; extend it (dtype, mesh, resume, ...) by adding arguments to the returned parser."""
    from fusion_jax.eval.benchmarks import BENCHMARKS
    from fusion_jax.generate.cli import add_generation_args
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.eval run",
                                 description="Answer a benchmark's questions as the reference's script builds them.")
    add_generation_args(ap)
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


def attach_meta(rows, questions) -> list:
    """Answer rows + the fields the reference's answer files carry (its prompt, ground truth, rounds...)."""
    out = []
    for row, q in zip(rows, questions, strict=True):
        meta = {k: v for k, v in q["meta"].items() if k not in RUN_INTERNAL_META}
        out.append({**row, **meta})
    return out


def answer_questions(model, tok, questions, a, gcfg) -> list:
    """run_eval per max_new_tokens group (each group one GenerationConfig), rows back in question order."""
    from fusion_jax.eval.runner import run_eval
    model_id = a.model_id or os.path.basename(os.path.normpath(a.ckpt))
    order = {}
    for k, q in enumerate(questions):
        limit = a.max_new_tokens if a.max_new_tokens else q["max_new_tokens"]
        order.setdefault(limit, []).append(k)
    rows = [None] * len(questions)
    for limit, idx in order.items():
        got = run_eval(model, tok, [questions[k] for k in idx], image_folder=a.image_folder,
                       gcfg=dataclasses.replace(gcfg, max_new_tokens=limit), batch_size=max(1, a.batch_size),
                       model_id=model_id, progress=not a.no_progress)
        for k, r in zip(idx, got, strict=True):
            rows[k] = r
    return attach_meta(rows, questions)


def run_main(argv) -> int:
    if "--list" in argv:
        return list_main()
    a = run_parser().parse_args(argv)
    from fusion_jax.eval.benchmarks import fill_template_instructs, read_questions
    from fusion_jax.eval.runner import write_jsonl
    from fusion_jax.generate.cli import generation_config, load_for_cli
    from fusion_jax.generate.prompts import default_template
    try:
        questions = read_questions(a.benchmark, a.data, all_rounds=a.all_rounds, split=a.split)
        questions = questions[:a.limit] if a.limit else questions
        tok, model = load_for_cli(a)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gcfg = generation_config(a)              # max_new_tokens set per question group
    gcfg.seq_bucket, gcfg.instruct_bucket = a.seq_bucket, a.instruct_bucket
    fill_template_instructs(questions, a.template or default_template(model.cfg))
    rows = answer_questions(model, tok, questions, a, gcfg)
    write_jsonl(a.out, rows)
    print(f"wrote {len(rows)} answers to {a.out}")
    return 0


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


def bench_score_main(argv) -> int:
    a = _score_parser("python -m fusion_jax.eval score", out=False).parse_args(argv)
    from fusion_jax.eval.bench_score import score
    try:
        res = score(a.benchmark, a)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(res, a.json)
    return 0


def convert_main(argv) -> int:
    a = _score_parser("python -m fusion_jax.eval convert", out=True).parse_args(argv)
    from fusion_jax.eval.bench_score import convert
    try:
        res = convert(a.benchmark, a)
    except (FileNotFoundError, ValueError, KeyError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _print_result(res, False)
    return 0


def list_main() -> int:
    from fusion_jax.eval.benchmarks import list_text
    print(list_text())
    return 0
