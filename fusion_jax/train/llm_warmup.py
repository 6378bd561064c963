"""Decoder warm start on the synthesized captions: the tiny demo's stand-in for a pretrained LLM.

FUSION starts from a pretrained decoder (Phi-3.5, LLaMA-3.1); the tiny demo's decoder starts from
random weights. This trains it as a plain language model, text only, on the training split's
scene captions (``meta/train_scenes.jsonl``), written language-first by the synthesis engine:
each caption states where objects lie and then how pairs of them relate ("A red triangle is on
the left. ... The triangle is to the left of the circle."). The vision tower and the interaction
layers take no part; all decoder weights are kept.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fusion_jax.config import FusionConfig
from fusion_jax.train.tower_warmup import read_scenes

# the decoder's parameters; the tower, projectors and interaction layers never see text here
DECODER = ("embed_tokens", "layers", "norm")


def split_decoder(params: dict) -> tuple[dict, dict]:
    """(decoder + lm_head params, everything else) of a model's pure param dict."""
    m = params["model"]
    dec = {"model": {n: v for n, v in m.items() if n in DECODER}}
    if "lm_head" in params:
        dec["lm_head"] = params["lm_head"]
    rest = {k: v for k, v in params.items() if k not in ("model", "lm_head")}
    rest["model"] = {n: v for n, v in m.items() if n not in DECODER}
    return dec, rest


def join_decoder(dec: dict, rest: dict) -> dict:
    """The inverse of split_decoder (``rest`` may be the full dict: ``dec`` wins)."""
    return {**rest, **dec, "model": {**rest["model"], **dec["model"]}}


def caption_batches(texts: list, tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray, int]:
    """[N, seq_len] token ids (as the data pipeline encodes text, padded with 0), their 0/1 mask,
    and how many captions were longer than ``seq_len`` (cut)."""
    ids = np.zeros((len(texts), seq_len), np.int32)
    mask = np.zeros((len(texts), seq_len), np.int32)
    cut = 0
    for i, t in enumerate(texts):
        row = list(tokenizer(t))
        cut += len(row) > seq_len
        row = row[:seq_len]
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask, cut


def warm_start_llm(cfg: FusionConfig, params: dict, data_dir: str, tokenizer, *, steps: int, lr: float,
                   batch_size: int, seq_len: int, seed: int, log=print) -> tuple[dict, dict]:
    """Train the decoder of ``params`` (a model's pure param dict) on the captions: (new params, stats)."""
    from fusion_jax.train.step import abstract_model
    t0 = time.time()
    rows = read_scenes(data_dir)
    texts = [r["caption"] for r in rows if isinstance(r.get("caption"), str) and r["caption"].strip()]
    if not texts:
        raise ValueError(f"config.llm_warmup: no captions in {data_dir}/meta/train_scenes.jsonl")
    ids, mask, cut = caption_batches(texts, tokenizer, seq_len)
    graphdef, _ = nnx.split(abstract_model(cfg))
    dec, rest = split_decoder(jax.tree.map(jnp.asarray, params))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(0.03 * steps)), steps)
    tx = optax.adamw(sched, weight_decay=0.0)
    opt_state = tx.init(dec)

    def loss_fn(dec, rest, x, m):
        model = nnx.merge(graphdef, join_decoder(dec, rest))
        h = model.model.embed_tokens(x) * m[..., None].astype(jnp.float32)
        pos = jnp.maximum(jnp.cumsum(m, axis=1) - 1, 0)
        h, _, _ = model.decode(h, {"position_ids": pos, "attention_mask": m}, None)
        logits = model.logits(h)[:, :-1]
        w = (m[:, 1:] * m[:, :-1]).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, x[:, 1:])
        return (ce * w).sum() / jnp.maximum(w.sum(), 1.0)

    @jax.jit  # rest is an argument, not a closure: closed-over arrays would be baked in as constants
    def step(dec, rest, opt_state, x, m):
        loss, grads = jax.value_and_grad(loss_fn)(dec, rest, x, m)
        updates, opt_state = tx.update(grads, opt_state, dec)
        return optax.apply_updates(dec, updates), opt_state, loss

    rng = np.random.default_rng([seed, 0x11A])
    hist = []
    for _ in range(steps):
        idx = rng.integers(0, len(texts), batch_size)
        dec, opt_state, loss = step(dec, rest, opt_state, jnp.asarray(ids[idx]), jnp.asarray(mask[idx]))
        hist.append(loss)
    hist = np.asarray(jax.device_get(hist), np.float64)
    k = max(1, min(50, steps // 4))
    skipped = len(rows) - len(texts)
    stats = {"steps": steps, "captions": len(texts), "cut": cut, "skipped": skipped,
             "loss_first": float(hist[:k].mean()), "loss_last": float(hist[-k:].mean()), "seconds": time.time() - t0}
    log(f"decoder warm-up: {steps} steps on {len(texts)} captions ({cut} cut at {seq_len} tokens, "
        f"{skipped} scenes without a caption skipped); loss "
        f"{stats['loss_first']:.3f} -> {stats['loss_last']:.3f} (last {k} batches); {stats['seconds']:.1f}s")
    return join_decoder(jax.tree.map(np.asarray, dec), params), stats
