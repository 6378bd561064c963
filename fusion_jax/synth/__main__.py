"""python -m fusion_jax.synth --out DIR --num N [--seed S] [options]: one flag per SynthConfig field."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .engine import generate_dataset
from .pipeline import SynthConfig, SynthPipeline

_PARSE = {"int": int, "float": float, "str": str,
          "tuple": lambda v: tuple(k.strip() for k in v.split(",") if k.strip())}  # a comma list


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.synth",
                                 description="Synthesize a FUSION-style language-first QA set offline.")
    ap.add_argument("--out", required=True, help="output folder (also the image folder)")
    for f in dataclasses.fields(SynthConfig):
        if f.name != "progress":  # on by default here: --no-progress
            ap.add_argument("--" + f.name.replace("_", "-"), type=_PARSE[f.type.split(" |")[0]],
                            default=argparse.SUPPRESS, required=f.name == "num", help=f.metadata["help"])
    ap.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    ap.add_argument("--scorer", default=None,
                    help="model-based filter 'module:factory' (factory(**scorer_args) -> scorer(image, q, a))")
    ap.add_argument("--scorer-arg", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--scorer-threshold", type=float, default=0.5)
    ap.add_argument("--overwrite", action="store_true", help="replace a set made with other arguments")
    return ap


def main(argv=None) -> int:
    a = vars(_parser().parse_args(argv))
    out, overwrite = a.pop("out"), a.pop("overwrite")
    scorer, threshold = a.pop("scorer"), a.pop("scorer_threshold")
    kw = dict(kv.split("=", 1) for kv in a.pop("scorer_arg"))
    try:
        cfg = SynthConfig(**a)
        pipeline = plugins = None
        if scorer:
            from .filters import load_scorer
            pipeline = SynthPipeline(cfg, scorer=load_scorer(scorer, **kw), scorer_threshold=threshold)
            plugins = {"scorer": scorer, "scorer_args": kw, "threshold": threshold}
        summary = generate_dataset(out, cfg, overwrite=overwrite, pipeline=pipeline, plugins=plugins)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(summary, sort_keys=True, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
