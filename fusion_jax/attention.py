"""Scaled dot-product attention: three XLA implementations and two fused kernels.

`xla`: einsums over the whole batch (what accelerators want; SPMD shards the batch).
`loop` (the CPU choice, one device): `lax.map` over (sample, kv-head) with a rematerialised
body from `LOOP_MIN_QUERIES` queries on, `xla` below. On a CPU the [Q, K] scores of one head
stay in cache and the backward recomputes them instead of streaming B*H*Q*K probabilities
through memory: ~2.5x faster fwd+bwd on 2 cores.
`chunked`: the `xla` math over query chunks of `CHUNK` rows under remat, so a layer holds
[B, H, CHUNK, K] scores instead of [B, H, Q, K] (long sequences on accelerators).
`splash` (TPU): Pallas splash attention (`fusion_jax.attention_kernels`), interpret mode elsewhere.
`cudnn` (GPU): `jax.nn.dot_product_attention(implementation="cudnn")`, bf16/fp16 only.
`auto`: `splash` on TPU, `cudnn` on GPU in bf16/fp16; else (CPU: today's path, bit for bit)
`chunked` above `CHUNK` queries, `xla` below.

The fused kernels take structured masks only (`KeyMask`: causal and/or per-key validity, optionally
a different key validity for the first rows, plus `uniform` rows). A call with a dense [B, Q, K]
`keep` (the KV-cache prefill/decode) runs the XLA path whatever the setting (docs/pod_readiness.md).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

NEG = float(np.finfo(np.float32).min)
LOOP_MIN_QUERIES = 256  # short sequences (decode, tiny test models): the batched form compiles faster
CHUNK = 512
IMPLS = ("auto", "xla", "loop", "chunked", "splash", "cudnn")
FUSED = ("splash", "cudnn")
HALF = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KeyMask:
    """A mask the fused kernels can express: query i sees key j iff key_valid[b, j] (and j <= i if
    `causal`). Rows i < `first_rows` use `first_key_valid` instead (TUNE's intended early mask)."""
    key_valid: jax.Array | None = None                   # [B, K] bool; None: every key
    first_key_valid: jax.Array | None = None             # [B, K] bool for rows < first_rows
    causal: bool = dataclasses.field(default=False, metadata=dict(static=True))
    first_rows: int = dataclasses.field(default=0, metadata=dict(static=True))

    def dense(self, B: int, Q: int, K: int):
        """[B, Q, K] bool, the same booleans the XLA path always used."""
        kv = jnp.ones((B, 1, K), bool) if self.key_valid is None else self.key_valid.astype(bool)[:, None, :]
        if self.first_rows:
            kv = jnp.where((jnp.arange(Q) < self.first_rows)[None, :, None],
                           self.first_key_valid.astype(bool)[:, None, :], kv)
        if self.causal:
            kidx = jnp.arange(K)
            kv = (kidx[None, None, :] <= jnp.broadcast_to(kidx[:Q], (B, Q))[:, :, None]) & kv
        return jnp.broadcast_to(kv, (B, Q, K))


def backend_platform() -> str:
    """The platform the traced program is for: the mesh's devices (AOT for a TPU from a CPU host
    included), else the default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh is None or mesh.empty else getattr(mesh, "abstract_device", None)
    plat = getattr(dev, "platform", None) or jax.default_backend()
    return "gpu" if plat in ("cuda", "rocm") else plat


def resolve_impl(impl: str, num_queries: int, dtype=None, dense_mask: bool = False) -> str:
    """The implementation one call runs. `dense_mask`: the call has a [B, Q, K] mask no kernel takes."""
    if impl not in IMPLS:
        raise ValueError(f"attention_impl={impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "auto" and not dense_mask:
        plat = backend_platform()
        if plat == "tpu":
            return "splash"
        if plat == "gpu" and dtype is not None and jnp.dtype(dtype) in HALF:
            return "cudnn"
    if impl in FUSED:
        if not dense_mask:
            return impl
        impl = "auto"
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

    keep: a `KeyMask`, or [B, Q, K] bool (False: masked with float32 min, like HF eager; XLA
    only); uniform [B, Q] bool rows whose scores are all set to 0 after masking (the reference's
    early-layer quirk: those rows average every value). Scores are scaled by d**-0.5 in the
    compute dtype, softmax runs in float32.
    """
    B, Q, H, d = q.shape
    K, KV = k.shape[1], k.shape[2]
    G = H // KV
    scale = d ** -0.5
    impl = resolve_impl(impl, Q, q.dtype, dense_mask=keep is not None and not isinstance(keep, KeyMask))
    if impl in FUSED:
        from fusion_jax.attention_kernels import fused_attention
        o = fused_attention(impl, q, k, v, keep)
        if uniform is None:
            return o
        mean_v = jnp.repeat(jnp.mean(v.astype(jnp.float32), axis=1), G, axis=1).astype(o.dtype)  # [B, H, d]
        return jnp.where(uniform[:, :, None, None], mean_v[:, None], o)
    if isinstance(keep, KeyMask):
        keep = keep.dense(B, Q, K)

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
