"""Scaled dot-product attention with three equivalent implementations.

`xla`: einsums over the whole batch (what accelerators want; SPMD shards the batch).
`loop` (the CPU choice, one device): `lax.map` over (sample, kv-head) with a rematerialised
body from `LOOP_MIN_QUERIES` queries on, `xla` below. On a CPU the [Q, K] scores of one head
stay in cache and the backward recomputes them instead of streaming B*H*Q*K probabilities
through memory: ~2.5x faster fwd+bwd on 2 cores.
`chunked`: the `xla` math over query chunks of `CHUNK` rows under remat, so a layer holds
[B, H, CHUNK, K] scores instead of [B, H, Q, K] (long sequences on accelerators).
`auto`: `chunked` above `CHUNK` queries, else `xla`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(np.finfo(np.float32).min)
LOOP_MIN_QUERIES = 256  # short sequences (decode, tiny test models): the batched form compiles faster
CHUNK = 512
IMPLS = ("auto", "xla", "loop", "chunked")


def resolve_impl(impl: str, num_queries: int) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "loop":
        return "loop" if num_queries >= LOOP_MIN_QUERIES else "xla"
    if impl == "chunked" or (impl == "auto" and num_queries > CHUNK):
        return "chunked"
    return "xla"


def _masked(s, keep, uniform):
    """s [..., Q, K] float32; keep [Q, K]-broadcastable; uniform [Q] rows -> all-equal scores."""
    if keep is not None:
        s = jnp.where(keep, s, NEG)
    if uniform is not None:
        s = jnp.where(uniform[..., None], 0.0, s)
    return s


def attention(q, k, v, *, keep=None, uniform=None, impl: str = "auto"):
    """q [B, Q, H, d], k/v [B, K, KV, d] (H a multiple of KV) -> [B, Q, H, d].

    keep [B, Q, K] bool (False: masked with float32 min, like HF eager); uniform [B, Q]
    bool rows whose scores are all set to 0 after masking (the reference's early-layer
    quirk). Scores are scaled by d**-0.5 in the compute dtype, softmax runs in float32.
    """
    B, Q, H, d = q.shape
    K, KV = k.shape[1], k.shape[2]
    G = H // KV
    scale = d ** -0.5
    impl = resolve_impl(impl, Q)

    def dense(q, keep, uniform):
        n = q.shape[1]
        ex = (slice(None),) + (None,) * (1 if G == 1 else 2)  # masks over the head dims

        def probs(s):
            s = _masked((s * scale).astype(jnp.float32), None if keep is None else keep[ex],
                        None if uniform is None else uniform[ex])
            return jax.nn.softmax(s, axis=-1).astype(v.dtype)

        if G == 1:
            # Head-major 4-D batched matmuls: XLA:CPU runs these fwd+bwd ~2x faster than the
            # 5-D einsums below (decoder, 16 x 192 tokens: 20 vs 47 ms).
            p = probs(jnp.einsum("bhqd,bhsd->bhqs", q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)))
            return jnp.einsum("bhqs,bhsd->bhqd", p, v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
        # GQA: the G query heads of a kv head share k/v without materialising repeated copies
        # (a decode step would otherwise copy the cache G times per layer).
        p = probs(jnp.einsum("bqkgd,bskd->bkgqs", q.reshape(B, n, KV, G, d), k))
        return jnp.einsum("bkgqs,bskd->bqkgd", p, v).reshape(B, n, H, d)

    if impl == "xla" or (impl == "chunked" and Q <= CHUNK):
        return dense(q, keep, uniform)
    if impl == "chunked":
        n = -(-Q // CHUNK)
        pad = n * CHUNK - Q

        def split(x, fill):
            if x is None:
                return None
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
            return jnp.moveaxis(x.reshape((B, n, CHUNK) + x.shape[2:]), 1, 0)

        xs = (split(q, 0), split(keep, True), split(uniform, False))
        o = jax.lax.map(jax.checkpoint(lambda a: dense(*a), prevent_cse=False), xs)
        return jnp.moveaxis(o, 0, 1).reshape(B, n * CHUNK, H, d)[:, :Q]

    qt = q.reshape(B, Q, KV, G, d).transpose(0, 2, 3, 1, 4).reshape(B * KV, G * Q, d)
    kt = k.transpose(0, 2, 1, 3).reshape(B * KV, K, d)
    vt = v.transpose(0, 2, 1, 3).reshape(B * KV, K, d)
    sample = jnp.repeat(jnp.arange(B), KV)

    def one(xs):
        qi, ki, vi, b = xs
        s = (jnp.matmul(qi, ki.T) * scale).astype(jnp.float32).reshape(G, Q, K)
        s = _masked(s, None if keep is None else keep[b][None],
                    None if uniform is None else uniform[b][None])
        p = jax.nn.softmax(s, axis=-1).astype(vi.dtype).reshape(G * Q, K)
        return jnp.matmul(p, vi)

    o = jax.lax.map(jax.checkpoint(one, prevent_cse=False), (qt, kt, vt, sample))
    return o.reshape(B, KV, G, Q, d).transpose(0, 3, 1, 2, 4).reshape(B, Q, H, d)
