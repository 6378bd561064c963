"""Fused attention kernels behind `fusion_jax.attention`: Pallas splash attention (TPU) and cuDNN
flash attention (GPU), for the masks FUSION's layers use.

Splash (`jax.experimental.pallas.ops.tpu.splash_attention`) runs one sample at a time ([H, S, d],
GQA native); Mosaic kernels are not partitioned by XLA, so the call runs under `jax.shard_map`
over the mesh's batch axes (and `tensor` over heads where it divides both head counts). Sequences
are padded to the block size; padded keys get segment id 0, so they are masked like padding. Off
TPU the same kernel runs in Pallas interpret mode (the CPU tests). A query row that sees no key at
all (a fully padded sample) differs between implementations; no loss reads such rows.

cuDNN takes padding as per-sample lengths (`key_value_seq_lengths`): the key mask must be a prefix,
which FUSION's layouts guarantee (right-padded token rows, left-aligned instruct tokens).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import PartitionSpec as P

from fusion_jax.attention import KeyMask, backend_platform
from fusion_jax.nn import ATTENTION_NAME

BLOCKS = (512, 256, 128)   # splash block sizes tried, largest first (no more padding than 128 needs)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _block(n: int) -> int:
    return next(b for b in BLOCKS if _round_up(n, b) == _round_up(n, BLOCKS[-1]))


@functools.lru_cache(maxsize=64)
def splash_kernel(heads: int, q_len: int, kv_len: int, causal: bool, window: tuple | None, interpret: bool):
    """A splash kernel for padded lengths; `window` = (n_q, q, W, Q, K): the interaction layers'
    block-diagonal mask (query row j*n_q + l sees keys j*W .. j*W + W - 1)."""
    from jax.experimental.pallas.ops.tpu import splash_attention as sa
    bq, bkv = _block(q_len), _block(kv_len)
    if window is not None:
        n_q, _, W, Q, K = window
        rows, cols = np.arange(q_len)[:, None], np.arange(kv_len)[None, :]
        m = (rows // n_q == cols // W) & (rows < Q) & (cols < K)
        m |= (rows >= Q) & (cols == 0)                  # padded rows see one key: no empty rows
        mask = sa.NumpyMask(m)
    else:
        mask = sa.CausalMask((q_len, kv_len)) if causal else sa.FullMask((q_len, kv_len))
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    with jax.ensure_compile_time_eval():   # concrete mask tables: the cached kernel outlives this trace
        return sa.make_splash_mha(sa.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret, residual_checkpoint_name=ATTENTION_NAME)


def _shard_mapped(fn, q, k, v, *per_sample):
    """fn(q, k, v, *per_sample) per device: batch over the mesh's batch axes, heads over `tensor`."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return fn(q, k, v, *per_sample)
    from fusion_jax.sharding import spec_for
    b = spec_for(("batch",), q.shape[:1], mesh)[0]
    t = mesh.shape.get("tensor", 1)
    h = "tensor" if t > 1 and q.shape[2] % t == 0 and k.shape[2] % t == 0 else None
    qkv = P(b, None, h, None)
    specs = (qkv, qkv, qkv) + tuple(P(b, *([None] * (x.ndim - 1))) for x in per_sample)
    return jax.shard_map(fn, in_specs=specs, out_specs=qkv, check_vma=False)(q, k, v, *per_sample)


def splash(q, k, v, key_valid=None, *, causal=False, window=None):
    """q [B, Q, H, d], k/v [B, K, KV, d] -> [B, Q, H, d]; key_valid [B, K] bool or None."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds
    B, Q, H, d = q.shape
    K = k.shape[1]
    Qp, Kp = _round_up(Q, _block(Q)), _round_up(K, _block(K))
    kernel = splash_kernel(H, Qp, Kp, causal, window, backend_platform() != "tpu")
    q = (q * jnp.asarray(d ** -0.5, q.dtype))
    q = jnp.pad(q, ((0, 0), (0, Qp - Q), (0, 0), (0, 0)))
    k, v = (jnp.pad(x, ((0, 0), (0, Kp - K), (0, 0), (0, 0))) for x in (k, v))
    if key_valid is None and Kp > K and window is None:
        key_valid = jnp.ones((B, K), bool)
    extra = () if key_valid is None or window is not None else (
        jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, Kp - K))),)

    def one(qi, ki, vi, *seg):   # one sample: [S, H, d] -> heads first
        ids = SegmentIds(q=jnp.ones((Qp,), jnp.int32), kv=seg[0]) if seg else None
        o = kernel(qi.transpose(1, 0, 2), ki.transpose(1, 0, 2), vi.transpose(1, 0, 2), segment_ids=ids)
        return o.transpose(1, 0, 2)

    def per_device(q, k, v, *seg):
        return jax.vmap(one)(q, k, v, *seg)

    return checkpoint_name(_shard_mapped(per_device, q, k, v, *extra)[:, :Q], ATTENTION_NAME)


def cudnn(q, k, v, key_valid=None, *, causal=False, implementation="cudnn"):
    """jax.nn.dot_product_attention; padding as key lengths (a prefix mask). `implementation="xla"`
    runs the same call through XLA (what the CPU tests check the argument mapping with)."""
    lengths = None if key_valid is None else jnp.sum(key_valid.astype(jnp.int32), axis=-1)
    o = jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                     implementation=implementation)
    return checkpoint_name(o, ATTENTION_NAME)


def fused_attention(impl: str, q, k, v, mask: KeyMask | None, **kw):
    """`splash` or `cudnn` under a `KeyMask` (rows < first_rows run as their own call)."""
    mask = mask or KeyMask()
    fn = splash if impl == "splash" else cudnn
    if mask.first_rows:
        if mask.causal:
            raise ValueError("KeyMask: first_rows with causal is not supported")
        r = mask.first_rows
        head = fn(q[:, :r], k, v, mask.first_key_valid, **kw)
        return jnp.concatenate([head, fn(q[:, r:], k, v, mask.key_valid, **kw)], axis=1)
    return fn(q, k, v, mask.key_valid, causal=mask.causal, **kw)


def window_attention(impl: str, q, k, v, **kw):
    """CARD's window cross-attention: q [B, n_q, Q, H, d] (latent j of every question), k/v
    [B, Q, W, H, d] (window j) -> [B, n_q, Q, H, d]; latent j sees only window j."""
    B, n_q, Q, H, d = q.shape
    W = k.shape[2]
    if impl == "cudnn":   # one window per (sample, latent): a batch of unmasked attentions
        qb = q.transpose(0, 2, 1, 3, 4).reshape(B * Q, n_q, H, d)
        o = cudnn(qb, k.reshape(B * Q, W, H, d), v.reshape(B * Q, W, H, d), **kw)
        return o.reshape(B, Q, n_q, H, d).transpose(0, 2, 1, 3, 4)
    qs = q.transpose(0, 2, 1, 3, 4).reshape(B, Q * n_q, H, d)          # rows ordered (latent, question)
    o = splash(qs, k.reshape(B, Q * W, H, d), v.reshape(B, Q * W, H, d), window=(n_q, Q, W, Q * n_q, Q * W))
    return o.reshape(B, Q, n_q, H, d).transpose(0, 2, 1, 3, 4)
