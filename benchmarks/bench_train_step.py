"""Train-step throughput and MFU on whatever backend is present (CPU, GPU, TPU), plus greedy
generation tokens/s, on synthetic laid-out batches (no data pipeline: see bench_data.py).

    python benchmarks/bench_train_step.py                                   # tiny, CPU-sized
    python benchmarks/bench_train_step.py --config configs/fusion_3b_phi35_stage1.py \
        --batch 4 --seq 2048 --query-len 144 --remat dots_no_batch --llm-layers 16   # one GPU
    python benchmarks/bench_train_step.py --config configs/fusion_8b_llama31_stage2.py \
        --batch 64 --seq 4096 --mesh 1,-1,1                                 # a TPU slice

The step is the real one (fusion_jax.train.loop.Setup: AdamW update, clipping, sharding), with the
config's compute dtype (bf16 for the 3B/8B configs) and the chosen remat policies. MFU = analytic
model FLOPs (fusion_jax.train.flops, remat not counted) / (step time x devices x bf16 peak of the
device, or of `--chip NAME`); the device is named in the output. `--attention cudnn|splash|xla` picks
the attention kernel, `--profile DIR` writes a jax.profiler trace of 3 more steps.
`--llm-layers N` shortens the decoder (e.g. a 3B-class model whose
fp32 Adam state fits one 80 GB GPU); FLOPs are counted for the model actually run.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def synthetic_batch(cfg, B, S, q, n_q=2, T=64, seed=0):
    from fusion_jax.constants import IMAGE_TOKEN_INDEX, INSTRUCT_INDEX, LATENT_IMAGE_TOKEN_INDEX, NUM_CROPS
    from fusion_jax.layout import build_layout
    rng = np.random.default_rng(seed)
    V = cfg.llm.vocab_size
    ids, lab, ins = [], [], []
    n_txt = max(16, S - cfg.num_image_tokens - n_q * q - 2)
    for _ in range(B):
        parts, labs = [[1]], [[-100]]
        per = (n_txt - 1) // n_q
        for k in range(n_q):
            ph = [LATENT_IMAGE_TOKEN_INDEX] + ([IMAGE_TOKEN_INDEX] if k == 0 else [])
            qn, an = per // 3, per - per // 3
            qq, aa = rng.integers(3, V, qn), rng.integers(3, V, an)
            parts += [ph, qq, aa]
            q_lab = np.full(len(ph) + qn, -100)
            q_lab[-1] = INSTRUCT_INDEX
            labs += [q_lab, aa]
            if k == 0:
                ins.append(qq[:T])
        ids.append(np.concatenate(parts)), lab.append(np.concatenate(labs))
    b = build_layout(ids, lab, ins, num_image_tokens=cfg.num_image_tokens, query_len=q, max_questions=n_q,
                     seq_len=S, instruct_len=T, max_length=S)
    v = cfg.vision
    px = (v.image_size // v.patch_size) * v.patch_size   # the pixels a VALID patch conv reads
    b["images"] = rng.uniform(-1, 1, (B, NUM_CROPS, 3, px, px)).astype(np.float32)
    return b


def device_name():
    import jax
    d = jax.devices()[0]
    if d.platform == "cpu":
        try:
            for line in open("/proc/cpuinfo"):
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
        except OSError:
            pass
    return f"{d.platform}: {d.device_kind}"


def time_generate(s, state, cfg, S, q, instruct_len, new_tokens) -> dict:
    """Greedy generation of `new_tokens` tokens, batch 1, end to end (median of 3 after a first call)."""
    import jax
    from flax import nnx

    from fusion_jax.generate import generate
    model = nnx.merge(s.graphdef, state["params"])
    gb = synthetic_batch(cfg, 1, min(S, cfg.num_image_tokens + q + 128), q, n_q=1, T=instruct_len, seed=1)
    gb.pop("labels")
    gb = {k: jax.numpy.asarray(v) for k, v in gb.items()}

    def run():
        return jax.block_until_ready(generate(model, gb, max_new_tokens=new_tokens, eos_ids=())["tokens"])

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    gt = []
    for _ in range(3):
        t0 = time.perf_counter()
        run()
        gt.append(time.perf_counter() - t0)
    r = {"new_tokens": new_tokens, "prompt_len": int(gb["token_ids"].shape[1]), "first_call_s": first,
         "median_s": statistics.median(gt), "tokens_per_s": new_tokens / statistics.median(gt)}
    print(f"generate: batch 1, prompt {r['prompt_len']} spliced, {new_tokens} greedy tokens "
          f"end to end: {r['tokens_per_s']:.1f} tok/s (first call {first:.1f}s)", flush=True)
    return r


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py"))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=None, help="default: data.max_length")
    p.add_argument("--query-len", type=int, default=None, help="default: largest of model.query_len")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--instruct-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--mesh", default="-1,1,1")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--remat", default=None)
    p.add_argument("--vision-remat", default=None)
    p.add_argument("--compute-dtype", default=None)
    p.add_argument("--llm-layers", type=int, default=None, help="shorten the decoder (3B-class on one GPU)")
    p.add_argument("--vocab", type=int, default=392, help="tiny model vocab")
    p.add_argument("--generate", type=int, default=32, help="also time greedy generation of N tokens (0: off)")
    p.add_argument("--attention", default=None, help="attention_impl (default: the config's; auto)")
    p.add_argument("--chip", default=None, help="name the chip whose bf16 peak MFU is against (h100, v5e, ...; "
                   "default: the device's kind)")
    p.add_argument("--profile", default=None, help="write a jax.profiler trace of 3 steps to this directory")
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def chip_peak(chip: str | None):
    """(name, bf16 peak FLOP/s per device) of --chip, else of the local device (None on CPU)."""
    import jax

    from fusion_jax.train import flops
    if chip is None:
        return jax.devices()[0].device_kind, flops.peak_flops()
    peak = next((v for k, v in flops.PEAK_FLOPS if k in chip.lower()), None)
    if peak is None:
        raise SystemExit(f"--chip {chip}: no bf16 peak known (fusion_jax.train.flops.PEAK_FLOPS)")
    return chip, peak


def profile_steps(compiled, state, batch, logdir: str, n: int = 3):
    """A trace of n steps (TensorBoard / Perfetto: `tensorboard --logdir DIR`)."""
    import jax
    with jax.profiler.trace(logdir):
        for _ in range(n):
            state, m = compiled(state, batch)
        jax.block_until_ready(m)
    print(f"profile: {n} steps traced to {logdir}", flush=True)
    return state


def main(argv=None):
    a = parse_args(argv)
    import jax

    from fusion_jax.sharding import shard_batch
    from fusion_jax.tools.aot_compile import load_train_config, parse_mesh
    from fusion_jax.train import flops, loop
    from fusion_jax.train.step import model_batch
    tc = load_train_config(a.config)
    with tc.unlocked():
        tc.global_batch_size, tc.grad_accum, tc.mesh = a.batch, a.grad_accum, parse_mesh(a.mesh)
        tc.data.source, tc.init_from = "synth", ""
        if a.remat:
            tc.model.remat_policy = a.remat
        if a.vision_remat:
            tc.model.vision_remat_policy = a.vision_remat
        if a.compute_dtype:
            tc.model.compute_dtype = a.compute_dtype
        if a.seq:
            tc.data.max_length = a.seq
        if a.attention:
            tc.model.attention_impl = a.attention
    cfg = loop.resolve_model_config(tc, a.vocab)
    if a.llm_layers:
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=a.llm_layers))
    S = int(tc.data.max_length)
    q = a.query_len or max(cfg.query_len)
    t0 = time.perf_counter()
    s = loop.Setup(tc, None, model_cfg=cfg)
    state = s.init_state()
    raw = synthetic_batch(cfg, a.batch, S, q, n_q=a.questions, T=a.instruct_len)
    batch = shard_batch(model_batch(raw), s.mesh)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(s.abstract_params))
    t_setup = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = s.train_step.lower(state, batch).compile()
    t_compile = time.perf_counter() - t0
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    ts = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        ts.append(time.perf_counter() - t0)
    dt = statistics.median(ts)
    n_dev = jax.device_count()
    tokens = int(np.asarray(raw["attention_mask"]).sum())
    fl = flops.train_flops_per_step(cfg, {k: v.shape for k, v in batch.items()})
    chip, peak = chip_peak(a.chip)
    res = {"device": device_name(), "num_devices": n_dev, "config": a.config, "n_params": n_params,
           "chip": chip, "peak_flops_per_device": peak, "attention_impl": cfg.attention_impl,
           "batch": a.batch, "seq": S, "query_len": q, "mesh": dict(s.mesh.shape),
           "remat": tc.model.remat_policy, "vision_remat": tc.model.vision_remat_policy,
           "compute_dtype": cfg.compute_dtype, "llm_layers": cfg.llm.num_hidden_layers,
           "setup_s": t_setup, "compile_s": t_compile, "step_s_median": dt, "step_s_all": ts,
           "tokens_per_s": tokens / dt, "tokens_per_s_per_device": tokens / dt / n_dev,
           "model_tflops_per_s_per_device": fl / dt / n_dev / 1e12, "loss": float(m["loss"]),
           "mfu": (fl / dt / (n_dev * peak)) if peak else None,
           "mfu_note": None if peak else "no bf16 peak known for this device (CPU): MFU not defined"}
    mfu = f"{100 * res['mfu']:.1f}%" if res["mfu"] is not None else "n/a (CPU)"
    print(f"{res['device']} x {n_dev} | {n_params / 1e9:.3f}B params, {cfg.compute_dtype}, remat "
          f"{res['remat']}/{res['vision_remat']} | batch {a.batch} x {S} (q {q}) | compile {t_compile:.1f}s | "
          f"step {dt * 1e3:.1f} ms | {res['tokens_per_s_per_device']:,.0f} tok/s/device | "
          f"{res['model_tflops_per_s_per_device']:.2f} TFLOP/s/device | MFU {mfu}", flush=True)
    if a.profile:
        state = profile_steps(compiled, state, batch, a.profile)
        res["profile_dir"] = a.profile
    if a.generate:
        res["generate"] = time_generate(s, state, cfg, S, q, a.instruct_len, a.generate)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
