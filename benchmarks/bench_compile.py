"""Compile time of the real 8B (or any config's) train step, ahead of time, without weights.

    python benchmarks/bench_compile.py                                  # 8B stage 2, v5p:2x2x4 if libtpu, else CPU
    python benchmarks/bench_compile.py --topology cpu:1 --batch 1 --seq 1024
    python benchmarks/bench_compile.py --unrolled                       # also scan_layers=False

The decoder (32 layers) and vision tower (26) are stacked modules run under lax.scan, so the
compiled program holds one copy of each layer body and compile time stays flat in depth;
--unrolled compiles the same step with scan_layers=False to show the difference.
Runs fusion_jax.tools.aot_compile (one subprocess per variant, so each gets a clean libtpu).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def run(args):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "fusion_jax.tools.aot_compile", *args, "--json"], cwd=REPO,
                       env=env, capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit(f"aot_compile failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    return json.loads(lines[-1])


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="configs/fusion_8b_llama31_stage2.py")
    p.add_argument("--topology", default=None, help="default: v5p:2x2x4 with libtpu, else cpu:1")
    p.add_argument("--mesh", default="1,-1,1")
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--unrolled", action="store_true")
    a = p.parse_args(argv)
    topo = a.topology
    if topo is None:
        try:
            import libtpu  # noqa: F401
            topo = "v5p:2x2x4"
        except ImportError:
            topo = "cpu:1"
    base = ["--config", a.config, "--topology", topo, f"--mesh={a.mesh}"]
    if a.batch:
        base += ["--batch", str(a.batch)]
    elif topo.startswith("cpu"):
        base += ["--batch", "1"]
    if a.seq:
        base += ["--seq", str(a.seq)]
    out = {}
    variants = [("scan", [])] + ([("unrolled", ["--unrolled"])] if a.unrolled else [])
    for name, extra in variants:
        r = run(base + extra)
        out[name] = {k: r.get(k) for k in ("lower_s", "compile_s", "fits", "bytes_per_device", "status",
                                            "num_devices", "device_kind", "n_params", "global_batch", "seq_len")}
        print(f"{name:9s} {r.get('device_kind')} x {r.get('num_devices')} | {r.get('n_params', 0) / 1e9:.2f}B "
              f"params | lower {r.get('lower_s')} s, compile {r.get('compile_s')} s | status {r.get('status')}",
              flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
