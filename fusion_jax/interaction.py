"""CARD: interaction layers that refine latent vision tokens inside the decoder.

Reference: `fusion/model/vision_sampler.py` (VisionCrossAttentionLayer, one per
VisionTokenSampler; hence the parameter name `vision_sampler_layers`). Latent token j
of every question block cross-attends to window j of the pooled global map. Windows
are computed once per sample and broadcast over the question blocks instead of being
copied once per question.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from fusion_jax.attention import FUSED, resolve_impl
from fusion_jax.nn import LayerNorm, Linear, gelu_exact


class NormLinear(nnx.Module):
    """nn.Sequential(LayerNorm, Linear(bias=False)): reference names `.0` / `.1`."""

    def __init__(self, din, dout, *, stack, rngs, param_dtype, dtype, linear_2d):
        self.layer_norm = LayerNorm(din, stack=stack, param_dtype=param_dtype, dtype=dtype)
        self.linear = Linear(din, dout, use_bias=False, axes=("embed", "heads"), stack=stack,
                             rngs=rngs, param_dtype=param_dtype, dtype=dtype, linear_2d=linear_2d)

    def __call__(self, x):
        return self.linear(self.layer_norm(x))


class CrossAttention(nnx.Module):
    def __init__(self, dim, heads, *, attn_impl="auto", **kw):
        self.q_proj = NormLinear(dim, dim, **kw)
        self.k_proj = NormLinear(dim, dim, **kw)
        self.v_proj = NormLinear(dim, dim, **kw)
        self.o_proj = Linear(dim, dim, use_bias=False, axes=("heads", "embed"), **kw)
        self.heads, self.attn_impl = heads, attn_impl

    def __call__(self, x, ctx):
        """x [B, n_q, q, D] (one query per latent token); ctx [B, q, W, D] (its window)."""
        B, n_q, Q, D = x.shape
        H = self.heads
        hd = D // H
        q = self.q_proj(x).reshape(B, n_q, Q, H, hd)
        k = self.k_proj(ctx).reshape(B, Q, -1, H, hd)
        v = self.v_proj(ctx).reshape(B, Q, -1, H, hd)
        impl = resolve_impl(self.attn_impl, Q * n_q, q.dtype)
        if impl in FUSED:   # the window mask as a kernel mask (attention_kernels.window_attention)
            from fusion_jax.attention_kernels import window_attention
            return self.o_proj(window_attention(impl, q, k, v).reshape(B, n_q, Q, D))
        s = jnp.einsum("blqhd,bqwhd->blqhw", q, k).astype(jnp.float32) * (hd ** -0.5)
        p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
        o = jnp.einsum("blqhw,bqwhd->blqhd", p, v).reshape(B, n_q, Q, D)
        return self.o_proj(o)


class ProjOut(nnx.Module):
    """Reference `MLP`: linear_1, GELU (exact), linear_2, no biases."""

    def __init__(self, dim, **kw):
        self.linear_1 = Linear(dim, dim, axes=("embed", "mlp"), use_bias=False, **kw)
        self.linear_2 = Linear(dim, dim, axes=("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x):
        return self.linear_2(gelu_exact(self.linear_1(x)))


class InteractionLayer(nnx.Module):
    """One VisionCrossAttentionLayer (q_dim = kv_dim = hidden = D)."""

    def __init__(self, dim, heads=16, *, stack=(), rngs, param_dtype="float32", dtype="float32",
                 linear_2d=False, attn_impl="auto"):
        kw = dict(stack=stack, rngs=rngs, param_dtype=param_dtype, dtype=dtype, linear_2d=linear_2d)
        self.proj_in = Linear(2 * dim, dim, use_bias=False, axes=("mlp", "embed"), **kw)
        self.proj_out = ProjOut(dim, **kw)
        self.norm = LayerNorm(dim, stack=stack, param_dtype=param_dtype, dtype=dtype)
        self.cross_attn = CrossAttention(dim, heads, attn_impl=attn_impl, **kw)
        self.proj_context = Linear(dim, dim, use_bias=False, axes=("embed", "mlp"), **kw)

    def refine(self, queries, image_tokens, windows):
        """queries/image_tokens [B, n_q, q, D]; windows [B, q, W, D] -> refined [B, n_q, q, D]."""
        pq = self.proj_in(jnp.concatenate([queries, image_tokens], -1))
        attn = self.cross_attn(pq, self.proj_context(windows))
        return self.proj_out(self.norm(attn + pq)) + image_tokens

    def __call__(self, h, instruct_pos, latent_pos, windows):
        """Gather at the layout positions, refine, scatter back (-1 rows leave h untouched)."""
        B, S, D = h.shape
        n_q = instruct_pos.shape[1]
        q = latent_pos.shape[1] // n_q
        bidx = jnp.arange(B)[:, None]
        ins_ok = instruct_pos >= 0
        queries = h[bidx, jnp.where(ins_ok, instruct_pos, 0)] * ins_ok[..., None].astype(h.dtype)
        queries = jnp.broadcast_to(queries[:, :, None], (B, n_q, q, D))
        lat_ok = latent_pos >= 0
        tokens = h[bidx, jnp.where(lat_ok, latent_pos, 0)] * lat_ok[..., None].astype(h.dtype)
        out = self.refine(queries, tokens.reshape(B, n_q, q, D), windows).reshape(B, n_q * q, D)
        return h.at[bidx, jnp.where(lat_ok, latent_pos, S)].set(out.astype(h.dtype), mode="drop"), out


def context_windows(global_ctx, q: int, window: int):
    """Pooled map [B, (s*w)^2, D] -> non-overlapping windows [B, q, w*w, D] (row-major, like F.unfold)."""
    B, G, D = global_ctx.shape
    s = int(round(q ** 0.5))
    x = global_ctx.reshape(B, s, window, s, window, D).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(B, q, window * window, D)
