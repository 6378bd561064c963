"""The `small` FUSION configuration of ../shared/perf/small_config.json, side by side with what the
official PyTorch implementation measured on a 2-core AMD EPYC (a Zen 4; this host is a Zen 3, hence
--torch-baseline, a same-machine PyTorch stand-in).

    python benchmarks/bench_small.py [--steps 5] [--warmup 2] [--json out.json] [--variants]
        [--no-train] [--no-generate] [--profile] [--torch-baseline [--torch-steps N] [--torch-after] [--smoke]]

Train step: forward (both SigLIP passes, projectors, splicing, decoder with the interaction layers,
lm_head, CE + DSM) and backward, `jax.value_and_grad` over ALL parameters, float32, no remat, no
optimizer update: batch 2 x 1024 spliced tokens (729 image + 16 latent + 279 text), 60 instruct
tokens, q = 16, 5 crops per sample -> median step time vs the reference's 16.50 s.
Generation: batch 1, 1024-token spliced prompt, 64 instruct tokens, greedy, 32 new tokens, end to
end (both tower passes + prefill + 31 decode steps) -> tokens/s vs the reference's 9.95 tok/s.
Goals: train step >= 2x faster, generation >= 3x the reference tokens/s.

--variants also times the step with other settings (unrolled layers, remat, default matmul
precision) to show where time goes; --profile times the pieces (vision tower passes, decoder, loss)
forward+backward separately.

--torch-baseline first times, in this process, a PyTorch stand-in for the reference workload
(torch_small_baseline.py: HF SigLIP + projector + Phi3, fp32, eager, torch threads = cores) and
reports our speedups against it next to those against the recorded numbers, which come from
another CPU. It omits FUSION's interaction layers and DSM loss: a LOWER BOUND on the reference's
time, so speedups against it understate the real ones. --no-train / --no-generate skip only the
JAX timings; --smoke shrinks the torch workload (2 layers per tower, 1 global crop per sample) to
check that it runs, its numbers are meaningless.

Images are 384 px like the reference (the patch embedding crops to 378 px like its VALID conv).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
REF_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "perf",
                        "small_config.json")


def load_reference(path=REF_JSON) -> dict:
    with open(path) as f:
        return json.load(f)


def small_config(ref: dict, **over):
    from fusion_jax.config import FusionConfig, LLMConfig, VisionConfig
    c = ref["configuration"]
    fj, vt = c["full_config_json"], c["vision_tower"]["config"]
    llm = LLMConfig(family="phi3", vocab_size=fj["vocab_size"], hidden_size=fj["hidden_size"],
                    intermediate_size=fj["intermediate_size"], num_hidden_layers=fj["num_hidden_layers"],
                    num_attention_heads=fj["num_attention_heads"],
                    num_key_value_heads=fj["num_key_value_heads"], rms_norm_eps=fj["rms_norm_eps"],
                    rope_theta=fj["rope_theta"], rope_scaling=fj["rope_scaling"],
                    max_position_embeddings=fj["max_position_embeddings"],
                    original_max_position_embeddings=fj["original_max_position_embeddings"],
                    tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=32000)
    vision = VisionConfig(hidden_size=vt["hidden_size"], intermediate_size=vt["intermediate_size"],
                          num_attention_heads=vt["num_attention_heads"],
                          num_hidden_layers=vt["num_hidden_layers"], image_size=vt["image_size"],
                          patch_size=vt["patch_size"], num_channels=vt["num_channels"],
                          layer_norm_eps=vt["layer_norm_eps"], hidden_act=vt["hidden_act"])
    kw = dict(llm=llm, vision=vision, mm_projector_type=fj["mm_projector_type"],
              num_sampler_layers=fj["num_of_vision_sampler_layers"],
              sampler_start=fj["start_of_vision_sampler_layers"],
              sampler_stride=fj["stride_of_vision_sampler_layers"], sampler_heads=16,
              window_size=fj["window_size"], query_len=(16,), max_length=fj["tokenizer_model_max_length"],
              mm_vision_tower="small-siglip", compute_dtype="float32", param_dtype="float32",
              scan_layers=True, remat_policy="none",
              linear_2d=True, ce_skip_empty_chunks=True, attention_impl="loop")   # one CPU device
    kw.update(over)
    return FusionConfig(**kw)


def _pixels(cfg) -> int:
    return cfg.vision.image_size


def train_batch(cfg, seed=0) -> dict:
    """2 samples shaped like the reference's: sys 40 / question 60 / answer 163 text tokens,
    1 question, 1024 spliced tokens, 60 instruct tokens, q = 16."""
    from fusion_jax.constants import (
        IGNORE_INDEX,
        IMAGE_TOKEN_INDEX,
        INSTRUCT_INDEX,
        LATENT_IMAGE_TOKEN_INDEX,
        NUM_CROPS,
    )
    from fusion_jax.layout import build_layout
    rng = np.random.default_rng(seed)
    V = cfg.llm.vocab_size
    ids, labs, ins = [], [], []
    for _ in range(2):
        sys_t = np.concatenate([[1], rng.integers(3, V, 39)])
        q = rng.integers(3, V, 60)
        ans = rng.integers(3, V, 164)                       # 163 answer tokens + end token
        seq = np.concatenate([sys_t, [LATENT_IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX], q, ans[:-1]])
        lab = np.concatenate([np.full(40 + 2, IGNORE_INDEX), np.full(60, IGNORE_INDEX), ans[:-1]])
        lab[40 + 2 + 59] = INSTRUCT_INDEX
        ids.append(seq), labs.append(lab), ins.append(q)
    lay = build_layout(ids, labs, ins, num_image_tokens=cfg.num_image_tokens, query_len=16, max_questions=1,
                       seq_len=1024, instruct_len=60, max_length=cfg.max_length)
    px = _pixels(cfg)
    lay["images"] = rng.uniform(-1, 1, (2, NUM_CROPS, 3, px, px)).astype(np.float32)
    return lay


def gen_batch(cfg, seed=1) -> dict:
    """1 sample: 281 prompt ids (sys 200 / question 64 + template) -> 1024 spliced, 64 instructs."""
    from fusion_jax.constants import IMAGE_TOKEN_INDEX, LATENT_IMAGE_TOKEN_INDEX, NUM_CROPS
    from fusion_jax.generate import layout_padded
    rng = np.random.default_rng(seed)
    V = cfg.llm.vocab_size
    q = rng.integers(3, V, 64)
    ids = np.concatenate([[1], rng.integers(3, V, 199), [LATENT_IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX],
                          q, rng.integers(3, V, 15)])
    px = _pixels(cfg)
    imgs = rng.uniform(-1, 1, (1, NUM_CROPS, 3, px, px)).astype(np.float32)
    return layout_padded(cfg, [ids], [q], imgs, query_len=16)


def device_name():
    import jax
    d = jax.devices()[0]
    name = d.device_kind
    if d.platform == "cpu":
        name = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        try:
            with open("/proc/cpuinfo") as f:
                for line in f:
                    if line.startswith("model name"):
                        name = f"cpu ({line.split(':', 1)[1].strip()}, {os.cpu_count()} cores)"
                        break
        except OSError:
            pass
    return d.platform, name


def _time(fn, warmup, steps, before=None):
    """`before` (if given) runs untimed ahead of every call (the torch baseline's zero_grad)."""
    import jax
    before = before or (lambda: None)
    ts = []
    before()
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        before()
        jax.block_until_ready(fn())
    for _ in range(steps):
        before()
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return {"first_call_s": first, "median_s": statistics.median(ts), "all_s": ts}


def bench_train(cfg, warmup, steps, forward_only=False):
    import jax
    from flax import nnx

    from fusion_jax.model import FusionForCausalLM
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    batch = {k: jax.numpy.asarray(v) for k, v in train_batch(cfg).items()}

    def loss_fn(p, b):  # what the train step computes (loss only, no full logits)
        out = nnx.merge(graphdef, p)(b, return_logits=False)
        return out["loss"], out["num_targets"]

    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    fwd = jax.jit(loss_fn)
    res = {"n_params": n_params}
    r = _time(lambda: step(params, batch), warmup, steps)
    (loss, n), _ = step(params, batch)
    res.update(train_step=r, loss=float(loss), num_targets=int(n))
    if forward_only:
        res["forward"] = _time(lambda: fwd(params, batch), warmup, steps)
    return res


def bench_generate(cfg, warmup, steps, new_tokens=32):
    import jax
    from flax import nnx

    from fusion_jax.generate import generate
    from fusion_jax.model import FusionForCausalLM
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    b = {k: jax.numpy.asarray(v) for k, v in gen_batch(cfg).items()}
    r = _time(lambda: generate(model, b, max_new_tokens=new_tokens, eos_ids=())["tokens"], warmup, steps)
    r["tokens_per_s"] = new_tokens / r["median_s"]
    r["prompt_len"] = int(b["token_ids"].shape[1])
    return r


def profile_parts(cfg, warmup=1, steps=3):
    """Forward+backward time of the pieces, to see what dominates."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from fusion_jax.constants import MAIN_VIEW, NUM_TILES
    from fusion_jax.model import FusionForCausalLM
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    batch = {k: jnp.asarray(v) for k, v in train_batch(cfg).items()}
    out = {}

    def g(f):
        return jax.jit(jax.grad(lambda p: jnp.sum(f(nnx.merge(graphdef, p))).astype(jnp.float32)))

    imgs = batch["images"]
    B = imgs.shape[0]

    def tower_main(m):
        st = m.model.aux_projector(m.model.embed_tokens(batch["instructs"]))
        return m.model.vision_tower(imgs[:, MAIN_VIEW], st, batch["instruct_mask"])[0]

    def tower_tiles(m):
        return m.model.vision_tower(imgs[:, :NUM_TILES].reshape((B * NUM_TILES,) + imgs.shape[2:]))[0]

    def full_encode(m):
        e = m.encode(batch, 16)
        return jnp.sum(e["image_features"]) + jnp.sum(e["global_ctx"])

    def llm_only(m):
        x = jax.lax.stop_gradient(m.model.embed_tokens(batch["token_ids"]))
        h, _, _ = m.decode(x, batch, None)
        return m.logits(h)

    def head_only(m):
        h = jnp.ones((B, 1024, cfg.llm.hidden_size), jnp.float32)
        return m.logits(h)

    for name, f in [("vision_main_view (1 pass, 2 x 789 tok)", tower_main),
                    ("vision_global_tiles (8 x 729 tok)", tower_tiles),
                    ("encode total (both passes + projectors + pooling)", full_encode),
                    ("decoder + lm_head, no CARD (2 x 1024 tok)", llm_only),
                    ("lm_head only (2 x 1024 x 32064)", head_only)]:
        out[name] = _time(partial(g(f), params), warmup, steps)["median_s"]
        print(f"  {name:55s} fwd+bwd {out[name]:.3f} s", flush=True)
    return out


def matmul_rate(n_iter=10) -> float:
    """fp32 FLOP/s of a large plain matmul in this process (the machine's practical peak)."""
    import jax
    import jax.numpy as jnp
    a, b = jnp.ones((2048, 512), jnp.float32), jnp.ones((512, 1536), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)
    jax.block_until_ready(f(a, b))
    t0 = time.perf_counter()
    for _ in range(n_iter):
        jax.block_until_ready(f(a, b))
    return 2 * 2048 * 512 * 1536 * n_iter / (time.perf_counter() - t0)


def flop_floor(cfg, rate: float) -> dict:
    """Seconds the step / generation would take if every model FLOP ran at `rate` (a floor)."""
    from fusion_jax.train.flops import forward_flops_per_sample
    tr = forward_flops_per_sample(cfg, seq_len=1024, query_len=16, instruct_len=60, max_questions=1)
    # the train step's head only needs target rows (328 of 2048): count what must be computed
    head = 2 * 1024 * cfg.llm.hidden_size * cfg.llm.vocab_size
    train = 3 * (2 * (tr["total"] - head) + 2 * 164 * cfg.llm.hidden_size * cfg.llm.vocab_size)
    ge = forward_flops_per_sample(cfg, seq_len=1024, query_len=16, instruct_len=64, max_questions=1)
    gen = ge["total"] - head + 2 * cfg.llm.hidden_size * cfg.llm.vocab_size * 32
    return {"matmul_flops_per_s": rate, "train_step_flops": train, "generate_flops": gen,
            "train_step_floor_s": train / rate, "generate_floor_s": gen / rate}


def compare_with_torch(res: dict, tb: dict):
    """Speedups against the same-machine torch stand-in (a lower bound on the reference's time)."""
    if "train_step" in tb and "train" in res:
        r = res["train"]
        r["speedup_vs_torch_baseline"] = tb["train_step"]["median_s"] / r["train_step"]["median_s"]
        print(f"train step vs same-machine torch baseline {tb['train_step']['median_s']:.3f} s (lower bound) -> "
              f"{r['speedup_vs_torch_baseline']:.2f}x (recorded reference: {r['speedup_vs_reference']:.2f}x)",
              flush=True)
    if "generate" in tb and "generate" in res:
        g = res["generate"]
        g["speedup_vs_torch_baseline"] = g["tokens_per_s"] / tb["generate"]["tokens_per_s"]
        print(f"generation vs same-machine torch baseline {tb['generate']['tokens_per_s']:.1f} tok/s (lower "
              f"bound) -> {g['speedup_vs_torch_baseline']:.2f}x (recorded reference: "
              f"{g['speedup_vs_reference']:.2f}x)", flush=True)


def run_torch_baseline(ref: dict, res: dict, a) -> dict:
    """Times the same-machine torch stand-in (torch_small_baseline.py) against the recorded reference."""
    from torch_small_baseline import bench as torch_bench
    rt, rg = ref["reference_pytorch_cpu"]["training_step"], ref["reference_pytorch_cpu"]["generation"]
    tb = torch_bench(ref, _time, a.warmup, a.torch_steps or a.steps, a.gen_runs,
                     log=lambda m: print(m, flush=True), smoke=a.smoke)
    res["torch_baseline"] = tb
    if a.smoke:
        print("  (--smoke: 2-layer towers, 1 crop per sample; the ratios below mean nothing)", flush=True)
    # > 1: this machine + the stand-in beat the recorded run on the other CPU
    if "train_step" in tb:
        x = rt["train_step_seconds_median"] / tb["train_step"]["median_s"]
        print(f"  (this baseline runs at {x:.2f}x the speed of the recorded reference, "
              f"{rt['train_step_seconds_median']:.2f} s on the other CPU)", flush=True)
    if "generate" in tb:
        x = tb["generate"]["tokens_per_s"] / rg["tokens_per_second_end_to_end"]
        print(f"  (this baseline runs at {x:.2f}x the speed of the recorded reference, "
              f"{rg['tokens_per_second_end_to_end']:.2f} tok/s on the other CPU)", flush=True)
    return tb


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--gen-runs", type=int, default=5)
    p.add_argument("--no-train", action="store_true")
    p.add_argument("--no-generate", action="store_true")
    p.add_argument("--forward", action="store_true", help="also time the forward alone")
    p.add_argument("--variants", action="store_true")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--profile-steps", type=int, default=2)
    p.add_argument("--precision", default="highest", choices=("default", "high", "highest"),
                   help="jax_default_matmul_precision (float32 parity with the reference: highest)")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-baseline", action="store_true",
                   help="also time the same-machine PyTorch stand-in (torch_small_baseline.py)")
    p.add_argument("--torch-steps", type=int, default=None, help="torch train steps (default --steps)")
    p.add_argument("--smoke", action="store_true", help="tiny torch workload, only to see it run")
    p.add_argument("--torch-after", action="store_true", help="time the torch baseline after the JAX runs")
    a = p.parse_args(argv)
    if a.torch_after and not a.torch_baseline:
        p.error("--torch-after needs --torch-baseline")
    return a


def main(argv=None):
    a = parse_args(argv)
    import jax
    jax.config.update("jax_default_matmul_precision", a.precision)
    ref = load_reference()
    rt, rg = ref["reference_pytorch_cpu"]["training_step"], ref["reference_pytorch_cpu"]["generation"]
    cfg = small_config(ref)
    plat, dev = device_name()
    res = {"device": dev, "platform": plat, "jax": jax.__version__, "precision": a.precision,
           "reference": {"train_step_s": rt["train_step_seconds_median"],
                         "generate_tokens_per_s": rg["tokens_per_second_end_to_end"],
                         "machine": ref["reference_pytorch_cpu"]["machine"]}}
    print(f"device: {dev} | jax {jax.__version__} | matmul precision {a.precision}", flush=True)
    fl = flop_floor(cfg, matmul_rate())
    res["floor"] = fl
    print(f"in-process fp32 matmul rate {fl['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s -> FLOP floor: train step "
          f"{fl['train_step_flops'] / 1e12:.2f} TFLOP = {fl['train_step_floor_s']:.2f} s (goal needs <= "
          f"{rt['train_step_seconds_median'] / 2:.2f} s), generation {fl['generate_flops'] / 1e9:.0f} GFLOP = "
          f"{fl['generate_floor_s']:.2f} s (goal needs <= {32 / (3 * rg['tokens_per_second_end_to_end']):.2f} s)",
          flush=True)
    torch_part = partial(run_torch_baseline, ref, res, a)

    # default: before the JAX runs, so its models are freed before theirs are built;
    # --torch-after checks that the order does not favour either side
    tb = torch_part() if a.torch_baseline and not a.torch_after else None
    if not a.no_train:
        r = bench_train(cfg, a.warmup, a.steps, forward_only=a.forward)
        t = r["train_step"]["median_s"]
        r["speedup_vs_reference"] = rt["train_step_seconds_median"] / t
        r["llm_tokens_per_s"] = 2 * 1024 / t
        res["train"] = r
        print(f"train step (fwd+bwd, fp32, {r['n_params']:,} params): median {t:.3f} s over {a.steps} "
              f"(first call incl. compile {r['train_step']['first_call_s']:.1f} s) | loss {r['loss']:.4f} | "
              f"reference {rt['train_step_seconds_median']:.2f} s -> {r['speedup_vs_reference']:.2f}x "
              f"(goal >= 2x)", flush=True)
        if a.forward:
            print(f"forward only: median {r['forward']['median_s']:.3f} s (reference "
                  f"{rt['forward_seconds_median']:.2f} s)", flush=True)
    if not a.no_generate:
        g = bench_generate(cfg, 1, a.gen_runs)
        g["speedup_vs_reference"] = g["tokens_per_s"] / rg["tokens_per_second_end_to_end"]
        res["generate"] = g
        print(f"generate 32 tokens (greedy, end to end, prompt {g['prompt_len']} spliced): median "
              f"{g['median_s']:.3f} s = {g['tokens_per_s']:.1f} tok/s (first call incl. compile "
              f"{g['first_call_s']:.1f} s) | reference {rg['tokens_per_second_end_to_end']:.2f} tok/s -> "
              f"{g['speedup_vs_reference']:.2f}x (goal >= 3x)", flush=True)
    if a.torch_baseline and a.torch_after:
        tb = torch_part()
    if tb:
        compare_with_torch(res, tb)
    if a.variants:
        res["variants"] = {}
        for name, over in [("unrolled layers (scan_layers=False)", dict(scan_layers=False)),
                           ("remat full", dict(remat_policy="full"))]:
            r = bench_train(small_config(ref, **over), 1, max(2, a.steps // 2))
            res["variants"][name] = r["train_step"]["median_s"]
            print(f"  variant {name:40s} step {r['train_step']['median_s']:.3f} s", flush=True)
    if a.profile:
        res["profile_fwd_bwd_s"] = profile_parts(cfg, warmup=1, steps=a.profile_steps)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
