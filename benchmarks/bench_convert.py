"""Peak host memory of checkpoint conversion at FUSION-LLaMA3.1-8B shapes (bf16).

Writes a synthetic reference-style HF folder (LLaMA-3.1-8B decoder, vocab 128256+2,
SigLIP-so400m tower minus its last layer, projectors, 10 interaction layers), then runs
`to-orbax` and `to-hf` each in a fresh child process and reports the child's peak RSS
(ru_maxrss) as a ratio to the checkpoint size. Target: < 0.25.

  python benchmarks/bench_convert.py                  # full 8B shapes (~17 GB on disk, x3)
  python benchmarks/bench_convert.py --llm-layers 8   # same tensor shapes, fewer layers

Fewer layers keep every tensor's shape but shrink the checkpoint, so the ratio is an upper
bound of the full-size one (the peak is set by the largest single tensor + the runtime).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(llm_layers: int):
    from fusion_jax.config import FusionConfig, LLMConfig, VisionConfig
    llm = LLMConfig(family="llama", vocab_size=128258, hidden_size=4096, intermediate_size=14336,
                    num_hidden_layers=llm_layers, num_attention_heads=32, num_key_value_heads=8,
                    rms_norm_eps=1e-5, rope_theta=500000.0,
                    rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                    max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128009,
                    pad_token_id=None)
    return FusionConfig(llm=llm, vision=VisionConfig(), num_sampler_layers=min(10, llm_layers),
                        sampler_stride=3 if llm_layers >= 28 else 1,
                        mm_vision_tower="google/siglip-so400m-patch14-384")


def write_synthetic(folder: str, cfg, max_shard="5GB"):
    import ml_dtypes

    from fusion_jax.convert.hf_export import hf_order, our_shapes, per_layer_shape, synth_hf_config
    from fusion_jax.convert.st_io import ShardedWriter
    from fusion_jax.param_map import param_table
    rows = param_table(cfg)
    shapes = our_shapes(cfg)
    bf16 = np.dtype(ml_dtypes.bfloat16)
    order = hf_order(rows)
    plan = [(r.hf.format(i=i) if i is not None else r.hf, per_layer_shape(r, shapes, cfg), bf16)
            for r, i in order]
    os.makedirs(folder, exist_ok=True)
    w = ShardedWriter(folder, plan, max_shard)
    rng = np.random.default_rng(0)
    pool = (rng.standard_normal(1 << 20, dtype=np.float32) * 0.02).astype(bf16)
    for name, shp, _dt in plan:
        n = int(np.prod(shp))
        a = np.resize(pool, n).reshape(shp)  # distinct non-zero bytes, cheap to make
        w.write(name, a)
        del a
    w.close()
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(synth_hf_config(cfg, torch_dtype="bfloat16"), f, indent=2)
    return w.total


CHILD = r"""
import os, sys, time, json, resource
os.environ.setdefault("JAX_PLATFORMS", "cpu"); os.environ["FUSION_NO_PROGRESS"] = "1"
sys.path.insert(0, {root!r})
from fusion_jax.convert.hf_export import to_orbax, to_hf
import jax, tensorstore  # runtime loaded before the baseline is taken
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
t = time.time()
if {op!r} == "imports":
    pass
elif {op!r} == "to-orbax":
    to_orbax({src!r}, {dst!r}, log=lambda *a: None)
else:
    to_hf({src!r}, {dst!r}, log=lambda *a: None)
print(json.dumps({{"baseline_rss": base, "seconds": time.time() - t}}))
"""


def run_child(op, src="", dst=""):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = CHILD.format(root=root, op=op, src=src, dst=dst)
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    out, _ = p.communicate()
    if p.returncode:
        raise SystemExit(f"{op} failed ({p.returncode})")
    info = json.loads(out.strip().splitlines()[-1])
    return info


def peak_of(op, src="", dst=""):
    """Run one child and return (peak RSS bytes of that child, info)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    info = run_child(op, src, dst)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # RUSAGE_CHILDREN is the max over children: run the smallest first (imports) so it is exact
    return max(after, before) * 1024, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm-layers", type=int, default=32)
    ap.add_argument("--workdir", default="/tmp/fusion_bench_convert")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    cfg = config(args.llm_layers)
    wd = args.workdir
    shutil.rmtree(wd, ignore_errors=True)
    hf, orb, back = (os.path.join(wd, x) for x in ("hf", "orbax", "hf_back"))
    t = time.time()
    size = write_synthetic(hf, cfg)
    print(f"synthetic checkpoint: {size / 2**30:.2f} GiB bf16 ({args.llm_layers} LLM layers) "
          f"in {time.time() - t:.0f}s", flush=True)
    res = {"llm_layers": args.llm_layers, "checkpoint_bytes": size}
    rss, info = peak_of("imports")
    res["runtime_rss_bytes"] = rss
    for op, s, d in (("to-orbax", hf, orb), ("to-hf", orb, back)):
        rss, info = peak_of(op, s, d)
        if rss <= res["runtime_rss_bytes"]:
            print(f"warning: {op} peak not above the imports-only child")
        res[op] = {"peak_rss_bytes": rss, "ratio": rss / size, "seconds": round(info["seconds"], 1),
                   "ratio_above_runtime": (rss - res["runtime_rss_bytes"]) / size}
        print(f"{op}: peak RSS {rss / 2**30:.2f} GiB = {rss / size:.3f} x checkpoint "
              f"({(rss - res['runtime_rss_bytes']) / 2**30:.2f} GiB above the bare runtime), "
              f"{info['seconds']:.0f}s", flush=True)
    print(json.dumps(res, indent=2))
    if not args.keep:
        shutil.rmtree(wd, ignore_errors=True)


if __name__ == "__main__":
    main()
