"""The demo's last step: answer the synthesized held-out split and score it per kind against chance.

The same harness as `python -m fusion_jax.eval`, run in-process on the trained parameters; the
answers and the summary land in WORKDIR/heldout_answers.jsonl and WORKDIR/heldout_summary.json.
"""
from __future__ import annotations

import json
import time

from etils import epath
from flax import nnx

from fusion_jax import paths
from fusion_jax.eval.runner import read_jsonl, run_eval, write_jsonl
from fusion_jax.eval.scorers import score_answers


def format_summary(summary: dict) -> str:
    lines = [f"{'kind':12s} {'accuracy':>8s} {'chance':>7s} {'n':>5s}"]
    rows = [*summary["per_category"].items(), ("overall", summary["overall"])]
    for kind, s in rows:
        chance = f"{s['chance']:.3f}" if "chance" in s else "?"
        lines.append(f"{kind:12s} {s['accuracy']:8.3f} {chance:>7s} {s['n']:5d}")
    return "\n".join(lines)


def evaluate_heldout(graphdef, params, tokenizer, data_dir: str, workdir: str, *, batch_size: int,
                     max_new_tokens: int, log=print) -> dict:
    """Greedy answers to data_dir/eval/questions.jsonl, scored against eval/answers.jsonl."""
    from fusion_jax.generate import GenerationConfig
    t0 = time.time()
    questions = read_jsonl(paths.join(data_dir, "eval", "questions.jsonl"))
    golds = {g["question_id"]: g for g in read_jsonl(paths.join(data_dir, "eval", "answers.jsonl"))}
    model = nnx.merge(graphdef, params)
    gcfg = GenerationConfig(max_new_tokens=max_new_tokens, instruct_bucket=16)  # as the eval CLI
    answers = run_eval(model, tokenizer, questions, image_folder=data_dir, gcfg=gcfg, batch_size=batch_size,
                       model_id=epath.Path(workdir).name, progress=False)
    summary, _ = score_answers(answers, golds)
    summary["seconds"] = round(time.time() - t0, 1)
    write_jsonl(paths.join(workdir, "heldout_answers.jsonl"), answers)
    paths.write_text_atomic(paths.join(workdir, "heldout_summary.json"),
                            json.dumps(summary, indent=1, sort_keys=True) + "\n")
    log(f"held-out evaluation: {len(questions)} questions in {summary['seconds']:.1f}s "
        f"(answers and summary in {workdir}/heldout_*)\n{format_summary(summary)}")
    return summary
