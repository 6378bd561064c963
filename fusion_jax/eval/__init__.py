"""Question/answer evaluation in the reference's LLaVA `model_vqa` line format.

    python -m fusion_jax.eval --ckpt DIR --questions Q.jsonl --image-folder DIR --out answers.jsonl
    python -m fusion_jax.eval score --pred answers.jsonl --gold gold.jsonl [--summary S.json]

`run_eval` (batched generation with a progress bar) and the scorers in
`fusion_jax.eval.scorers` (multiple-choice letters, normalized short answers,
per-category summary) are importable.

The paper's benchmarks, built and scored exactly as the reference's scripts do:
`benchmarks` (readers -> question dicts), `metrics` / `mmmu_metrics` / `evalai` (the reference's
scorers), `submission` (files for the scoring servers), `bench_cli` (`run`, `score --benchmark`,
`convert`, `--list`).
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("run_eval", "read_jsonl", "write_jsonl"):
        from fusion_jax.eval import runner
        return getattr(runner, name)
    if name in ("score_answers", "score_one", "extract_letter", "normalize_answer"):
        from fusion_jax.eval import scorers
        return getattr(scorers, name)
    raise AttributeError(name)
