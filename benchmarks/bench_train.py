"""Train-step benchmark: compile time, step time, tokens/s, model TFLOP/s and MFU on synthetic
laid-out batches (no data pipeline), for any train config.

    python benchmarks/bench_train.py                       # configs/tiny.py model, batch 16
    python benchmarks/bench_train.py --config configs/fusion_3b_phi35_stage1.py --batch 8 \
        --seq 2048 --query-len 144 --mesh=-1,1,1 --steps 10
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def synthetic_batch(cfg, B, S, q, L=2, T=64, seed=0):
    from fusion_jax.layout import build_layout
    rng = np.random.default_rng(seed)
    V = cfg.llm.vocab_size
    ids, lab, ins = [], [], []
    n_txt = max(8, S - cfg.num_image_tokens - L * q - 4)
    for _ in range(B):
        x = np.concatenate([[1], rng.integers(3, V - 3, 4), [-200], rng.integers(3, V - 3, n_txt - 6)])
        y = np.where(np.arange(len(x)) > 8, x, -100)
        y[6] = -400
        ids.append(x), lab.append(y), ins.append(rng.integers(3, V - 3, T // 2))
    b = build_layout(ids, lab, ins, num_image_tokens=cfg.num_image_tokens, query_len=q, max_questions=L,
                     seq_len=S, instruct_len=T)
    s = cfg.vision.image_size
    b["images"] = rng.standard_normal((B, 5, 3, s, s)).astype(np.float32)
    return b


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=192)
    p.add_argument("--query-len", type=int, default=4)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mesh", default="-1,1,1")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--vocab", type=int, default=392, help="tiny model vocab")
    a = p.parse_args(argv)
    import jax

    from fusion_jax.sharding import shard_batch
    from fusion_jax.train import flops, loop
    from fusion_jax.train.step import model_batch
    spec = importlib.util.spec_from_file_location("cfg", a.config)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    tc = mod.get_config()
    with tc.unlocked():
        tc.global_batch_size, tc.grad_accum = a.batch, a.grad_accum
        tc.mesh = tuple(int(x) for x in a.mesh.split(","))
        tc.model.query_len = str(a.query_len)
        tc.data.source, tc.total_steps = "synth", 1000
    s = loop.Setup(tc, None, vocab_size=a.vocab)
    b = synthetic_batch(s.cfg, a.batch, a.seq, a.query_len)
    db = shard_batch(model_batch(b), s.mesh)
    state = s.init_state()
    t = time.time()
    state, m = s.train_step(state, db)
    jax.block_until_ready(m)
    compile_s = time.time() - t
    t = time.time()
    for _ in range(a.steps):
        state, m = s.train_step(state, db)
    jax.block_until_ready(m)
    dt = (time.time() - t) / a.steps
    f = flops.train_flops_per_step(s.cfg, {k: v.shape for k, v in db.items()})
    peak = flops.peak_flops()
    out = {"config": os.path.basename(a.config), "device": jax.devices()[0].device_kind,
           "n_devices": jax.device_count(), "batch": a.batch, "seq": a.seq, "query_len": a.query_len,
           "compile_s": round(compile_s, 2), "step_s": round(dt, 4),
           "tokens_per_s": round(float(b["attention_mask"].sum()) / dt, 1),
           "model_tflops_per_step": f / 1e12, "tflops_per_s": f / dt / 1e12,
           "mfu": (f / dt / (peak * jax.device_count())) if peak else None, "loss": float(m["loss"])}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
