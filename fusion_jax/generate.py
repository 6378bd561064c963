"""Generation: one jitted prefill (runs the interaction layers) plus a KV-cache decode loop.

Decode steps see the interaction-refined states only through the cache, as in the
reference. Samples of different lengths are right padded; each writes its new
tokens at its own cache slot, so no left padding is needed.
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.interaction import context_windows
from fusion_jax.llm import causal_keep, init_cache


def prefill(model, batch, max_new_tokens: int):
    """Returns (last-token logits [B, V], cache, kv_mask [B, Smax], lengths [B])."""
    cfg = model.cfg
    q = batch["latent_pos"].shape[1] // batch["instruct_pos"].shape[1]
    enc = model.encode(batch, q)
    x = model.splice(batch, enc)
    B, S, _ = x.shape
    smax = S + max_new_tokens
    cache = init_cache(cfg.llm, B, smax, cfg.compute_dtype)
    kv_mask = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, max_new_tokens)))
    keep = causal_keep(kv_mask, jnp.broadcast_to(jnp.arange(S), (B, S)))
    windows = (context_windows(enc["global_ctx"], q, cfg.window_size)
               if model.model.vision_sampler_layers is not None else None)
    h, cache, _ = model.decode(x, batch, windows, cache=cache,
                               cache_index=jnp.zeros((B,), jnp.int32), keep=keep)
    lengths = batch["attention_mask"].sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache, kv_mask, lengths


def decode_step(model, token, cache, kv_mask, pos):
    """One token per sample at slot `pos` [B]; returns (logits [B, V], cache, kv_mask)."""
    B = token.shape[0]
    x = model.model.embed_tokens(token[:, None])
    kv_mask = kv_mask.at[jnp.arange(B), pos].set(True)
    keep = causal_keep(kv_mask, pos[:, None])
    h, cache, _ = model.decode(x, {}, None, cache=cache, cache_index=pos, keep=keep,
                               position_ids=pos[:, None])
    return model.logits(h[:, 0]), cache, kv_mask


def _pick(logits, rng, temperature, top_k, top_p):
    if temperature <= 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    lg = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(lg, top_k)[0][:, -1:]
        lg = jnp.where(lg < kth, -jnp.inf, lg)
    if top_p < 1.0:
        srt = jnp.sort(lg, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, -1), -1)
        # smallest set whose mass reaches top_p; always keeps the best token
        cutoff_idx = jnp.sum(cum < top_p, -1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, cutoff_idx, -1)
        lg = jnp.where(lg < cutoff, -jnp.inf, lg)
    return jax.random.categorical(rng, lg, -1).astype(jnp.int32)


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "eos_ids",
                                   "pad_id", "return_logits"))
def generate(model, batch, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_ids: tuple = (), pad_id: int = 0, rng=None,
             return_logits: bool = False):
    """Greedy / sampled generation for a laid-out inference batch (labels=None layout).

    Returns dict(tokens [B, N] (pad after eos), num_tokens [B], step_logits [N, B, V]).
    """
    rng = jax.random.PRNGKey(0) if rng is None else rng
    logits, cache, kv_mask, lengths = prefill(model, batch, max_new_tokens)
    B, V = logits.shape
    eos = jnp.asarray(eos_ids if eos_ids else (-1,), jnp.int32)
    toks = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    step_logits = jnp.zeros((max_new_tokens if return_logits else 0, B, V), jnp.float32)

    def emit(t, lg, toks, done, step_logits, rng):
        rng, sub = jax.random.split(rng)
        tok = _pick(lg, sub, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        toks = toks.at[:, t].set(tok)
        if return_logits:
            step_logits = step_logits.at[t].set(lg)
        done = done | jnp.isin(tok, eos)
        return tok, toks, done, step_logits, rng

    done0 = jnp.zeros((B,), bool)
    tok, toks, done, step_logits, rng = emit(0, logits, toks, done0, step_logits, rng)

    def cond(s):
        t, _, _, _, done, _, _, _ = s
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(s):
        t, tok, cache, kv_mask, done, toks, step_logits, rng = s
        pos = lengths + t - 1
        lg, cache, kv_mask = decode_step(model, tok, cache, kv_mask, pos)
        tok, toks, done2, step_logits, rng = emit(t, lg, toks, done, step_logits, rng)
        return t + 1, tok, cache, kv_mask, done2, toks, step_logits, rng

    state = (jnp.int32(1), tok, cache, kv_mask, done, toks, step_logits, rng)
    t, _, _, _, done, toks, step_logits, _ = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(toks, eos)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
    out = {"tokens": toks, "num_tokens": jnp.minimum(first_eos, t)}
    if return_logits:
        out["step_logits"] = step_logits
    return out
