"""Generation throughput: KV-cache decode vs a no-cache baseline (same run), prefill latency.

    python benchmarks/bench_generate.py [--size tiny|small] [--ckpt DIR] [--batch 4]
        [--prompt-words 40] [--new-tokens 64] [--query-len q] [--repeats 3]

The baseline (`fusion_jax.generate.generate_nocache`) recomputes the full sequence (decoder
and interaction layers) for every new token; both are greedy, jitted, and must emit the same
tokens (checked). Reported: prefill latency (encode + splice + decoder with interaction,
median), decode tokens/s for each (end-to-end time minus the prefill), the ratio, and the
end-to-end tokens/s. One JSON line at the end. Compile time is excluded (one warm-up call).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time


def build(args):
    import numpy as np

    from fusion_jax.config import tiny_config
    from fusion_jax.model import FusionForCausalLM
    if args.ckpt:
        from fusion_jax.generate import load_model
        return load_model(args.ckpt)
    cfg = tiny_config("phi3")
    if args.size == "small":
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, hidden_size=512, intermediate_size=1536,
                                                  num_hidden_layers=8, num_attention_heads=8,
                                                  num_key_value_heads=8, vocab_size=4096,
                                                  rope_scaling=None))
    _ = np
    return FusionForCausalLM(cfg, seed=0)


def make_batch(cfg, args):
    import jax.numpy as jnp
    import numpy as np

    from fusion_jax.constants import IMAGE_TOKEN_INDEX, LATENT_IMAGE_TOKEN_INDEX
    from fusion_jax.generate import layout_padded
    rng = np.random.default_rng(0)
    V = cfg.llm.vocab_size
    ids, ins = [], []
    for b in range(args.batch):
        n = args.prompt_words + b                       # ragged on purpose
        text = rng.integers(3, V, n)
        ids.append(np.concatenate([text[:4], [LATENT_IMAGE_TOKEN_INDEX], text[4:6], [IMAGE_TOKEN_INDEX],
                                   text[6:]]))
        ins.append(text[6:6 + 12])
    S = cfg.vision.image_size
    imgs = rng.uniform(-1, 1, (args.batch, 5, 3, S, S)).astype(np.float32)
    lay = layout_padded(cfg, ids, ins, imgs, query_len=args.query_len, seq_bucket=64)
    return {k: jnp.asarray(v) for k, v in lay.items()}


def timed(fn, repeats):
    import jax
    jax.block_until_ready(fn())                          # compile + warm up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "small"), default="tiny")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt-words", type=int, default=40)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--query-len", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    import jax
    import numpy as np
    from flax import nnx

    from fusion_jax.generate import generate, generate_nocache, prefill

    model = build(a)
    batch = make_batch(model.cfg, a)
    B, N = a.batch, a.new_tokens
    pre = nnx.jit(lambda m, b: prefill(m, b, N)[0])
    t_pre, _ = timed(lambda: pre(model, batch), a.repeats)
    t_gen, out = timed(lambda: generate(model, batch, max_new_tokens=N)["tokens"], a.repeats)
    t_nc, out_nc = timed(lambda: generate_nocache(model, batch, max_new_tokens=N), a.repeats)
    same = bool(np.array_equal(np.asarray(out), np.asarray(out_nc)))
    dec = B * (N - 1)          # tokens produced by decode steps (the first comes from the prefill)
    cached = dec / max(t_gen - t_pre, 1e-9)
    nocache = dec / max(t_nc - t_pre, 1e-9)
    res = {
        "device": str(jax.devices()[0].device_kind), "size": a.ckpt or a.size, "batch": B,
        "prompt_len": int(batch["attention_mask"].sum(-1).max()), "seq_bucket": int(batch["token_ids"].shape[1]),
        "new_tokens": N, "prefill_ms": round(1e3 * t_pre, 2),
        "decode_tok_s_cache": round(cached, 1), "decode_tok_s_nocache": round(nocache, 1),
        "speedup": round(cached / nocache, 2),
        "e2e_tok_s_cache": round(B * N / t_gen, 1), "e2e_tok_s_nocache": round(B * N / t_nc, 1),
        "tokens_match": same,
    }
    print(f"prefill {res['prefill_ms']} ms | decode {res['decode_tok_s_cache']} tok/s (KV cache) vs "
          f"{res['decode_tok_s_nocache']} tok/s (no cache): x{res['speedup']} | tokens match: {same}")
    print(json.dumps(res))
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
