"""generate_dataset: synthesize a whole set (optionally with worker processes) and cache it."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys

from .pipeline import SynthConfig, SynthPipeline, encode_sample
from .writers import DatasetWriter, clear_output, read_summary, write_summary

FORMAT_VERSION = 1

_WORKER_PIPELINE: SynthPipeline | None = None


def _init_worker(pipeline: SynthPipeline):
    global _WORKER_PIPELINE
    _WORKER_PIPELINE = pipeline


def _work(task):
    seed, split, index = task
    return encode_sample(_WORKER_PIPELINE, seed, split, index)


def split_sizes(num: int, heldout_fraction: float) -> tuple:
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError("heldout_fraction must be in [0, 1)")
    n_eval = int(math.floor(num * heldout_fraction + 0.5))
    if heldout_fraction > 0 and num >= 2:
        n_eval = max(1, n_eval)
    return num - n_eval, n_eval


def generate_dataset(out_dir: str, cfg: SynthConfig, *, overwrite: bool = False,
                     pipeline: SynthPipeline | None = None, plugins: dict | None = None) -> dict:
    """Synthesize ``cfg.num`` samples into ``out_dir`` and return the summary dict.

    ``round(num * heldout_fraction)`` of them (at least one when the fraction is positive) become
    held-out questions, the rest training conversations. Training sample i has kind
    ``kinds[i % len(kinds)]`` (same for held-out sample j), so kinds are balanced. Output is
    byte-identical for the same config, whatever ``cfg.workers``.

    Caching: when ``out_dir/summary.json`` holds the same cache key (``cfg.cache_key()``) the set
    is not regenerated (the stored summary is returned with ``"cached": True``); with another key a
    ``ValueError`` is raised unless ``overwrite=True``.

    ``pipeline``: a :class:`SynthPipeline` built from ``cfg`` with plug-in stages; ``plugins`` (any
    JSON-able dict) describes them in the cache key.
    """
    pipeline = pipeline or SynthPipeline(cfg)
    if pipeline.config != cfg.resolved():
        raise ValueError("generate_dataset: the pipeline was built from another SynthConfig")
    tasks = _tasks(cfg)
    key = {**cfg.cache_key(), "format_version": FORMAT_VERSION, "plugins": plugins}
    cached = _cached_summary(out_dir, key, overwrite)
    if cached is not None:
        return cached
    os.makedirs(out_dir, exist_ok=True)
    clear_output(out_dir)
    writer = DatasetWriter(out_dir, pipeline.config.kinds)
    _run(pipeline, tasks, writer, cfg.workers, cfg.progress)
    summary = {**writer.close(), "args": key}
    write_summary(out_dir, summary)
    return {**summary, "cached": False}


def _tasks(cfg: SynthConfig) -> list:
    """(seed, split, index) of every sample, in the order they are written."""
    n_train, n_eval = split_sizes(cfg.num, cfg.heldout_fraction)
    return [(cfg.seed, "train", i) for i in range(n_train)] + [(cfg.seed, "eval", j) for j in range(n_eval)]


def _cached_summary(out_dir: str, key: dict, overwrite: bool) -> dict | None:
    """The stored summary when ``out_dir`` holds the set ``key`` describes; None to (re)generate."""
    old = read_summary(out_dir) if os.path.isdir(out_dir) else None
    if old is None or overwrite:
        return None
    if old.get("args") == key:
        return {**old, "cached": True}
    raise ValueError(f"{out_dir} holds a synthesized set made with other arguments "
                     f"({old.get('args')}); pass overwrite=True (CLI --overwrite) to replace it")


def _run(pipeline: SynthPipeline, tasks: list, writer: DatasetWriter, workers: int, progress: bool):
    """Make every sample (in worker processes when ``workers > 1``) and hand them to the writer in order."""
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    try:
        if workers <= 1 or len(tasks) < 2:
            _init_worker(pipeline)
            _consume(map(_work, tasks), writer, bar)
        else:
            ctx = mp.get_context(_start_method())
            chunk = max(1, min(32, len(tasks) // (workers * 8) or 1))
            with ctx.Pool(workers, initializer=_init_worker, initargs=(pipeline,)) as pool:
                _consume(pool.imap(_work, tasks, chunksize=chunk), writer, bar)
    finally:
        if bar is not None:
            bar.close()


def _start_method() -> str:
    """fork is fast and works from any __main__ (stdin, notebooks); but forking a process that
    has JAX (threads) loaded can deadlock, so then spawn (needs an importable __main__)."""
    if "fork" in mp.get_all_start_methods() and "jax" not in sys.modules:
        return "fork"
    return "spawn"


def _consume(results, writer: DatasetWriter, bar):
    for r in results:
        writer.add(r)
        if bar is not None:
            bar.update(1)
