"""python -m fusion_jax.eval: answer model_vqa questions, then score them when gold exists.

The paper's benchmarks (`fusion_jax.eval.bench_cli`): `--list`, `run --benchmark NAME ...`,
`score --benchmark NAME ...`, `convert --benchmark NAME ...`. Generic model_vqa files:

    python -m fusion_jax.eval --ckpt DIR --questions Q.jsonl --image-folder DIR --out answers.jsonl \\
        [--gold GOLD.jsonl] [--summary S.json] [--batch-size 8] [--limit N] [generation options]
    python -m fusion_jax.eval score --pred answers.jsonl --gold GOLD.jsonl [--summary S.json]

Gold defaults to `answers.jsonl` beside the questions file (the synthesized held-out split,
`fusion_jax.synth`, writes eval/questions.jsonl and eval/answers.jsonl); the summary defaults
to OUT with `.summary.json`.
"""
from __future__ import annotations

import argparse
import json
import sys


def _summary_path(out: str) -> str:
    base = out[:-6] if out.endswith(".jsonl") else out
    return base + ".summary.json"


def _score(pred_path, gold_path, summary_path, rows_path=None, only=None) -> dict:
    from etils import epath  # outputs may be gs:// URLs

    from fusion_jax.eval.runner import read_jsonl, write_jsonl
    from fusion_jax.eval.scorers import score_answers
    from fusion_jax.paths import absolute
    golds = {r["question_id"]: r for r in read_jsonl(gold_path)}
    if only is not None:
        golds = {k: v for k, v in golds.items() if k in only}
    summary, rows = score_answers(read_jsonl(pred_path), golds)
    summary["pred"], summary["gold"] = absolute(pred_path), absolute(gold_path)
    epath.Path(summary_path).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    if rows_path:
        write_jsonl(rows_path, rows)
    o = summary["overall"]
    print(f"accuracy {o['accuracy']:.4f} ({o['correct']}/{o['n']})"
          + (f", chance {o['chance']:.4f}" if "chance" in o else ""))
    for cat, s in summary["per_category"].items():
        print(f"  {cat:16s} {s['accuracy']:.4f} ({s['correct']}/{s['n']})")
    print(f"summary: {summary_path}")
    return summary


def score_main(argv) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.eval score")
    ap.add_argument("--pred", required=True)
    ap.add_argument("--gold", required=True)
    ap.add_argument("--summary", default=None)
    ap.add_argument("--rows", default=None, help="also write per-question rows (JSONL)")
    a = ap.parse_args(argv)
    _score(a.pred, a.gold, a.summary or _summary_path(a.pred), a.rows)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    from fusion_jax.eval import bench_cli
    if argv and argv[0] == "score":
        return bench_cli.bench_score_main(argv[1:]) if "--benchmark" in argv else score_main(argv[1:])
    if argv and argv[0] in ("run", "convert"):
        return (bench_cli.run_main if argv[0] == "run" else bench_cli.convert_main)(argv[1:])
    if argv[:1] == ["--list"]:
        return bench_cli.list_main()
    from fusion_jax.eval.scale import add_scale_args, load_for_eval, run_questions
    from fusion_jax.generate.cli import add_generation_args, generation_config
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.eval", description=__doc__.splitlines()[0])
    add_generation_args(ap)
    add_scale_args(ap)
    ap.add_argument("--questions", required=True, help="model_vqa questions JSONL")
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--out", required=True, help="answers JSONL (model_vqa format)")
    ap.add_argument("--gold", default=None, help="gold answers JSONL (default: answers.jsonl beside "
                                                 "the questions, when present)")
    ap.add_argument("--summary", default=None)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--model-id", default=None)
    ap.add_argument("--seq-bucket", type=int, default=64)
    ap.add_argument("--instruct-bucket", type=int, default=16)
    ap.add_argument("--no-progress", action="store_true")
    ap.set_defaults(max_new_tokens=32)
    a = ap.parse_args(argv)

    from etils import epath  # outputs may be gs:// URLs

    from fusion_jax import paths
    from fusion_jax.eval.runner import read_questions
    try:
        questions, bad_lines = read_questions(a.questions)
        tok, model = load_for_eval(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.limit:
        questions = questions[:a.limit]
    gcfg = generation_config(a)
    gcfg.seq_bucket, gcfg.instruct_bucket = a.seq_bucket, a.instruct_bucket
    model_id = a.model_id or epath.Path(a.ckpt).name
    status = run_questions(a, questions, model, tok, gcfg, model_id=model_id, failures=bad_lines)
    import jax
    if jax.process_index() != 0:
        return status
    gold = a.gold or paths.join(epath.Path(paths.absolute(a.questions)).parent, "answers.jsonl")
    if paths.isfile(gold) and paths.absolute(gold) != paths.absolute(a.out):
        _score(a.out, gold, a.summary or _summary_path(a.out),
               only={q["question_id"] for q in questions} if a.limit else None)
    elif a.gold:
        print(f"error: gold file {a.gold} not found", file=sys.stderr)
        return 2
    return status


if __name__ == "__main__":
    sys.exit(main())
