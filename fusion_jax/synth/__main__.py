"""python -m fusion_jax.synth --out DIR --num N --seed S [options]"""
from __future__ import annotations

import argparse
import json
import sys

from .engine import generate_dataset
from .pipeline import SynthConfig, SynthPipeline
from .qa import SPATIAL_ORDERS, SPATIAL_REFS, SPATIAL_YESNO_FRACTION
from .scene import KINDS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.synth",
                                 description="Synthesize a FUSION-style language-first QA set offline.")
    ap.add_argument("--out", required=True, help="output folder (also the image folder)")
    ap.add_argument("--num", type=int, required=True, help="number of samples (train + held-out)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"comma list from {','.join(KINDS)}")
    ap.add_argument("--image-size", type=int, default=384)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--heldout-fraction", type=float, default=0.1)
    ap.add_argument("--difficulty", choices=("easy", "full"), default="full",
                    help="easy: 6 colours, 3 large shapes, short answers (for tiny models / small images)")
    ap.add_argument("--max-turns", type=int, default=None)
    ap.add_argument("--mc-fraction", type=float, default=None)
    ap.add_argument("--long-fraction", type=float, default=None)
    ap.add_argument("--describe-fraction", type=float, default=0.0,
                    help="probability that a training conversation ends with 'Which shapes are in the image?'")
    ap.add_argument("--describe-positions", action="store_true",
                    help="the describe turn also gives each object's location ('a red circle on the left')")
    ap.add_argument("--locate-fraction", type=float, default=0.0,
                    help="probability that a training conversation also asks which half of the image an object is in")
    ap.add_argument("--spatial-refs", choices=SPATIAL_REFS, default="shape",
                    help="spatial questions name objects by shape ('the circle'), colour ('the red object') "
                         "or mixed (the object asked about by colour, the other by shape)")
    ap.add_argument("--spatial-order", choices=SPATIAL_ORDERS, default="subject_first",
                    help="relation questions name the object asked about first ('Is the circle left of the "
                         "square?') or last ('Relative to the square, is the circle on the left?')")
    ap.add_argument("--spatial-yesno-fraction", type=float, default=SPATIAL_YESNO_FRACTION,
                    help="share of relation questions asked in the yes / no form ('Is the circle to the left "
                         "of the square?')")
    ap.add_argument("--fonts", choices=("builtin", "system"), default="builtin")
    ap.add_argument("--scorer", default=None,
                    help="model-based filter 'module:factory' (factory(**scorer_args) -> scorer(image, q, a))")
    ap.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--scorer-threshold", type=float, default=0.5)
    ap.add_argument("--overwrite", action="store_true", help="replace a set made with other arguments")
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in a.kinds.split(",") if k.strip())
    pipeline = None
    cache_key = None
    if a.scorer:
        from .filters import load_scorer
        kw = dict(kv.split("=", 1) for kv in a.scorer_arg)
        cfg = SynthConfig(kinds=kinds, image_size=a.image_size, difficulty=a.difficulty,
                          max_turns=a.max_turns, mc_fraction=a.mc_fraction, long_fraction=a.long_fraction,
                          describe_fraction=a.describe_fraction, spatial_refs=a.spatial_refs,
                          locate_fraction=a.locate_fraction, describe_positions=a.describe_positions,
                          spatial_order=a.spatial_order, spatial_yesno_fraction=a.spatial_yesno_fraction,
                          fonts=a.fonts)
        pipeline = SynthPipeline(cfg, scorer=load_scorer(a.scorer, **kw), scorer_threshold=a.scorer_threshold)
        cache_key = {"scorer": a.scorer, "scorer_args": kw, "threshold": a.scorer_threshold}
    try:
        summary = generate_dataset(a.out, a.num, a.seed, kinds=kinds, image_size=a.image_size,
                                   workers=a.workers, heldout_fraction=a.heldout_fraction,
                                   difficulty=a.difficulty, max_turns=a.max_turns, mc_fraction=a.mc_fraction,
                                   long_fraction=a.long_fraction, describe_fraction=a.describe_fraction,
                                   spatial_refs=a.spatial_refs, locate_fraction=a.locate_fraction,
                                   describe_positions=a.describe_positions, spatial_order=a.spatial_order,
                                   spatial_yesno_fraction=a.spatial_yesno_fraction,
                                   fonts=a.fonts,
                                   progress=not a.no_progress,
                                   overwrite=a.overwrite, pipeline=pipeline, cache_key=cache_key)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
