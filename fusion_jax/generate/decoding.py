"""Decoding on the device: one jitted prefill (runs the interaction layers) plus a KV-cache loop.

Decode steps see the interaction-refined states only through the cache, as in the
reference. Samples of different lengths are right padded and each writes its new tokens
at its own cache slot (`prompts.layout_padded` strips any input padding on the host first).
"""
from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.interaction import context_windows
from fusion_jax.llm import causal_keep, init_cache

TRACES = {"generate": 0, "decode_step": 0}   # Python-side trace counts (compile-count tests)
MAX_EOS = 8


def prefill_inputs(model, batch):
    """(q, vision encodings, spliced input embeddings [B, S, D]).

    Every latent block (`latent_fill_pos`) holds the initial latents, refined or not
    (eval convention: only the first question's block is refined), as in the reference.
    """
    q = batch["latent_pos"].shape[1] // batch["instruct_pos"].shape[1]
    enc = model.encode(batch, q)
    return q, enc, model.splice(batch, enc)


def _windows(model, enc, q):
    if model.model.vision_sampler_layers is None:
        return None
    return context_windows(enc["global_ctx"], q, model.cfg.window_size)


def prefill(model, batch, max_new_tokens: int):
    """Returns (last-token logits [B, V], cache, kv_mask [B, Smax], lengths [B])."""
    q, enc, x = prefill_inputs(model, batch)
    B, S, _ = x.shape
    cache = init_cache(model.cfg.llm, B, S + max_new_tokens, model.cfg.compute_dtype)
    kv_mask = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, max_new_tokens)))
    keep = causal_keep(kv_mask, jnp.broadcast_to(jnp.arange(S), (B, S)))
    h, cache, _ = model.decode(x, batch, _windows(model, enc, q), cache=cache,
                               cache_index=jnp.zeros((B,), jnp.int32), keep=keep)
    lengths = batch["attention_mask"].sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache, kv_mask, lengths


def decode_step(model, token, cache, kv_mask, pos):
    """One token per sample at slot `pos` [B]; returns (logits [B, V], cache, kv_mask)."""
    TRACES["decode_step"] += 1
    x = model.model.embed_tokens(token[:, None])
    kv_mask = kv_mask.at[jnp.arange(token.shape[0]), pos].set(True)
    keep = causal_keep(kv_mask, pos[:, None])
    h, cache, _ = model.decode(x, {}, None, cache=cache, cache_index=pos, keep=keep,
                               position_ids=pos[:, None])
    return model.logits(h[:, 0]), cache, kv_mask


def pick_token(logits, rng, temperature, top_k, top_p):
    """Greedy when temperature <= 0, else top-k then top-p filtering and a draw from `rng`."""
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


def generate(model, batch, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_ids=(), pad_id: int = 0, rng=None,
             return_logits: bool = False):
    """Greedy / sampled generation for a laid-out inference batch (`layout_padded`).

    The batch may use either instruct convention (it only changes instruct_pos/latent_pos).
    temperature <= 0 is greedy; otherwise top_k (0 = off) then top_p (1 = off) filtering
    and sampling from `rng`. eos_ids is data (up to 8 ids), not a compile-time constant.
    Compiles once per (shapes, max_new_tokens, sampling mode); the decode loop is a
    `lax.while_loop` that stops when every sample has emitted an eos id.

    Returns dict(tokens [B, N] (pad after eos), num_tokens [B] (eos included),
    step_logits [N, B, V] when return_logits).
    """
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    eos = [int(e) for e in (eos_ids if isinstance(eos_ids, (tuple, list)) else [eos_ids])]
    if len(eos) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} eos ids, got {len(eos)}")
    eos = jnp.asarray(eos + [-1] * (MAX_EOS - len(eos)), jnp.int32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, batch, eos, rng, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     pad_id=int(pad_id), return_logits=bool(return_logits))


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "pad_id",
                                   "return_logits"))
def _generate(model, batch, eos, rng, *, max_new_tokens, temperature, top_k, top_p, pad_id,
              return_logits):
    TRACES["generate"] += 1
    logits, cache, kv_mask, lengths = prefill(model, batch, max_new_tokens)
    B, V = logits.shape
    toks = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    step_logits = jnp.zeros((max_new_tokens if return_logits else 0, B, V), jnp.float32)

    def emit(t, lg, toks, done, step_logits, rng):
        rng, sub = jax.random.split(rng)
        tok = jnp.where(done, pad_id, pick_token(lg, sub, temperature, top_k, top_p))
        toks = toks.at[:, t].set(tok)
        if return_logits:
            step_logits = step_logits.at[t].set(lg)
        return tok, toks, done | jnp.isin(tok, eos), step_logits, rng

    tok, toks, done, step_logits, rng = emit(0, logits, toks, jnp.zeros((B,), bool), step_logits, rng)

    def cond(s):
        t, done = s[0], s[4]
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(s):
        t, tok, cache, kv_mask, done, toks, step_logits, rng = s
        lg, cache, kv_mask = decode_step(model, tok, cache, kv_mask, lengths + t - 1)
        tok, toks, done, step_logits, rng = emit(t, lg, toks, done, step_logits, rng)
        return t + 1, tok, cache, kv_mask, done, toks, step_logits, rng

    state = (jnp.int32(1), tok, cache, kv_mask, done, toks, step_logits, rng)
    t, _, _, _, done, toks, step_logits, _ = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(toks, eos)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
    out = {"tokens": toks, "num_tokens": jnp.minimum(first_eos, t)}
    if return_logits:
        out["step_logits"] = step_logits
    return out


@partial(nnx.jit, static_argnames=("max_new_tokens",))
def generate_nocache(model, batch, *, max_new_tokens: int):
    """Greedy decoding that recomputes the whole sequence every step (no KV cache).

    The benchmark's baseline. Each step is a teacher-forced full forward (interaction
    layers included), which the reference shows equals cached decoding, so the tokens
    match `generate(..., temperature=0)` (no eos handling: always `max_new_tokens`).
    """
    q, enc, x = prefill_inputs(model, batch)
    B, S, _ = x.shape
    N = max_new_tokens
    x = jnp.pad(x, ((0, 0), (0, N), (0, 0)))
    mask = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, N)))
    full = dict(batch, attention_mask=mask,
                position_ids=jnp.broadcast_to(jnp.arange(S + N, dtype=jnp.int32), (B, S + N)))
    windows = _windows(model, enc, q)
    lengths = batch["attention_mask"].sum(-1).astype(jnp.int32)
    rows = jnp.arange(B)

    def body(t, s):
        x, mask, toks = s
        h, _, _ = model.decode(x, dict(full, attention_mask=mask), windows)
        tok = jnp.argmax(model.logits(h[rows, lengths + t - 1]), -1).astype(jnp.int32)
        x = x.at[rows, lengths + t].set(model.model.embed_tokens(tok).astype(x.dtype))
        mask = mask.at[rows, lengths + t].set(True)
        return x, mask, toks.at[:, t].set(tok)

    _, _, toks = jax.lax.fori_loop(0, N, body, (x, mask, jnp.zeros((B, N), jnp.int32)))
    return toks


# ----------------------------------------------------------------------------- cache extension (chat)

@partial(nnx.jit, static_argnames=("query_len",))
def encode_vision(model, batch, *, query_len: int):
    """The vision side of a prefill, kept across chat turns: image features, the initial
    latents and the interaction windows (what `prefill` computes before splicing)."""
    enc = model.encode(batch, query_len)
    return {"image_features": enc["image_features"], "init_latent": enc["init_latent"],
            "windows": _windows(model, enc, query_len)}


@nnx.jit
def extend(model, seg, vision, cache, kv_mask, start):
    """Write a segment into a KV cache: one prefill over positions start .. start + S - 1
    (the cache keeps positions < start; anything it held from `start` on is discarded).

    seg: a laid-out batch of the new positions only ([B, S] token_ids / attention_mask, and
    image_pos / latent_pos / latent_fill_pos / instruct_pos relative to the segment start,
    -1 when unused). The interaction layers refine the segment's latent blocks from its own
    instruct positions; earlier positions are read from the cache, exactly as a full prefill
    of the whole sequence would compute them (attention is causal and each latent block
    depends only on positions up to its instruct position).
    Returns (logits of the last real segment token [B, V], cache, kv_mask).
    """
    B, S = seg["token_ids"].shape
    x = model.splice(seg, vision)
    slots = jnp.arange(kv_mask.shape[1])
    n = seg["attention_mask"].sum(-1).astype(jnp.int32)
    # slots from `start` on are replaced: what the cache held there (e.g. the ids of an answer
    # that re-tokenizes differently) is dropped, then the segment's real slots become valid
    kv_mask = (kv_mask & (slots[None] < start[:, None])) | (
        (slots[None] >= start[:, None]) & (slots[None] < (start + n)[:, None]))
    pos = start[:, None] + jnp.arange(S, dtype=jnp.int32)[None]
    h, cache, _ = model.decode(x, seg, vision["windows"], cache=cache, cache_index=start,
                               keep=causal_keep(kv_mask, pos), position_ids=pos)
    last = jnp.take_along_axis(h, (n - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache, kv_mask


@partial(nnx.jit, static_argnames=("temperature", "top_k", "top_p"))
def next_token(model, logits, cache, kv_mask, pos, rng, *, temperature, top_k, top_p):
    """`generate`'s emit-then-decode for one token, for streaming from the host: picks the token
    from `logits` with the rng split as `generate` splits it, then writes it at slot `pos`.
    Returns (token [B], rng, logits of the next token, cache, kv_mask)."""
    rng, sub = jax.random.split(rng)
    tok = pick_token(logits, sub, temperature, top_k, top_p)
    logits, cache, kv_mask = decode_step(model, tok, cache, kv_mask, pos)
    return tok, rng, logits, cache, kv_mask
