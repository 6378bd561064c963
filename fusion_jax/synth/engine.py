"""generate_dataset: synthesize a whole set (optionally with worker processes) and cache it."""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import sys
from collections.abc import Sequence

from .pipeline import SynthConfig, SynthPipeline, encode_sample
from .qa import SPATIAL_YESNO_FRACTION
from .scene import KINDS
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


def generate_dataset(out_dir: str, num: int, seed: int = 0, *, kinds: Sequence[str] | None = None,
                     image_size: int = 384, workers: int = 1, heldout_fraction: float = 0.1,
                     difficulty: str = "full", max_turns: int | None = None,
                     mc_fraction: float | None = None, long_fraction: float | None = None,
                     describe_fraction: float = 0.0, spatial_refs: str = "shape", locate_fraction: float = 0.0,
                     describe_positions: bool = False, spatial_order: str = "subject_first",
                     spatial_yesno_fraction: float = SPATIAL_YESNO_FRACTION, fonts: str = "builtin",
                     progress: bool = False, overwrite: bool = False,
                     pipeline: SynthPipeline | None = None, cache_key: dict | None = None) -> dict:
    """Synthesize ``num`` samples into ``out_dir`` and return the summary dict.

    ``num`` counts all samples; ``round(num * heldout_fraction)`` of them (at least one when the
    fraction is positive) become held-out questions, the rest training conversations.
    Training sample i has kind ``kinds[i % len(kinds)]`` (same for held-out sample j), so kinds
    are balanced. Output is byte-identical for the same arguments, whatever ``workers``.

    Caching: when ``out_dir/summary.json`` exists with the same arguments the set is not
    regenerated (the stored summary is returned with ``"cached": True``); with different
    arguments a ``ValueError`` is raised unless ``overwrite=True``.

    ``pipeline``: a custom :class:`SynthPipeline` (plug-in stages); its config then wins over
    the keyword arguments, and ``cache_key`` (any JSON-able dict) should describe the plug-ins.
    """
    if pipeline is None:
        cfg = SynthConfig(kinds=tuple(kinds) if kinds else KINDS, image_size=int(image_size),
                          difficulty=difficulty, max_turns=max_turns, mc_fraction=mc_fraction,
                          long_fraction=long_fraction, describe_fraction=float(describe_fraction),
                          spatial_refs=spatial_refs, locate_fraction=float(locate_fraction),
                          describe_positions=bool(describe_positions), spatial_order=spatial_order,
                          spatial_yesno_fraction=float(spatial_yesno_fraction),
                          fonts=fonts)
        pipeline = SynthPipeline(cfg)
    cfg = pipeline.config
    n_train, n_eval = split_sizes(int(num), float(heldout_fraction))
    args = {"num": int(num), "seed": int(seed), "kinds": list(cfg.kinds), "image_size": cfg.image_size,
            "heldout_fraction": float(heldout_fraction), "difficulty": cfg.difficulty,
            "max_turns": cfg.max_turns, "mc_fraction": cfg.mc_fraction,
            "long_fraction": cfg.long_fraction, "fonts": cfg.fonts, "max_attempts": cfg.max_attempts,
            "format_version": FORMAT_VERSION, "plugins": cache_key}
    if cfg.describe_fraction:  # absent when off, so sets cached before the option stay valid
        args["describe_fraction"] = cfg.describe_fraction
    if cfg.locate_fraction:
        args["locate_fraction"] = cfg.locate_fraction
    if cfg.describe_positions:
        args["describe_positions"] = True
    if cfg.spatial_refs != "shape":
        args["spatial_refs"] = cfg.spatial_refs
    if cfg.spatial_order != "subject_first":
        args["spatial_order"] = cfg.spatial_order
    if cfg.spatial_yesno_fraction != SPATIAL_YESNO_FRACTION:
        args["spatial_yesno_fraction"] = cfg.spatial_yesno_fraction
    old = read_summary(out_dir) if os.path.isdir(out_dir) else None
    if old is not None and not overwrite:
        if old.get("args") == args:
            return {**old, "cached": True}
        raise ValueError(f"{out_dir} holds a synthesized set made with other arguments "
                         f"({old.get('args')}); pass overwrite=True (CLI --overwrite) to replace it")
    os.makedirs(out_dir, exist_ok=True)
    clear_output(out_dir)

    tasks = [(int(seed), "train", i) for i in range(n_train)] + [(int(seed), "eval", j) for j in range(n_eval)]
    writer = DatasetWriter(out_dir, cfg.kinds)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=len(tasks), desc="synth", unit="img")
    try:
        if workers <= 1 or len(tasks) < 2:
            _init_worker(pipeline)
            results = map(_work, tasks)
            _consume(results, writer, bar)
        else:
            ctx = mp.get_context(_start_method())
            chunk = max(1, min(32, len(tasks) // (workers * 8) or 1))
            with ctx.Pool(int(workers), initializer=_init_worker, initargs=(pipeline,)) as pool:
                _consume(pool.imap(_work, tasks, chunksize=chunk), writer, bar)
    finally:
        if bar is not None:
            bar.close()
    summary = writer.close()
    summary["args"] = args
    write_summary(out_dir, summary)
    return {**summary, "cached": False}


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
