"""Decoder layers of the three LLM families (HF Phi3, Llama, Qwen2), RoPE and KV cache.

Parameter names follow `transformers`: Phi-3 keeps its fused `qkv_proj` ([q; k; v]
rows) and `gate_up_proj` ([gate; up]); Llama/Qwen2 have separate projections
(Qwen2 with q/k/v bias).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from fusion_jax.attention import KeyMask, attention
from fusion_jax.config import LLMConfig
from fusion_jax.nn import ACT, LAYER_INPUT_NAME, Linear, RMSNorm, dtype_of

# ----------------------------------------------------------------------------- RoPE

def rope_params(cfg: LLMConfig):
    """(short_inv_freq, long_inv_freq or None, switch_len, attention_scaling).

    `long_inv_freq` applies when max(position)+1 > switch_len (Phi-3 longrope).
    """
    dim = int(cfg.dim_per_head * cfg.partial_rotary_factor)
    base = cfg.rope_theta
    rs = cfg.rope or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    exps = np.arange(0, dim, 2).astype(np.float32) / np.float32(dim)
    pow_ = (np.float64(base) ** exps.astype(np.float64)).astype(np.float32)
    if kind == "default":
        return 1.0 / pow_, None, None, 1.0
    if kind == "linear":
        return (1.0 / pow_) / np.float32(rs["factor"]), None, None, 1.0
    if kind == "longrope":
        omax = rs.get("original_max_position_embeddings") or cfg.original_max_position_embeddings
        if omax is None:
            omax = cfg.max_position_embeddings
        factor = rs.get("factor") or cfg.max_position_embeddings / omax
        att = rs.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(omax))
        short = 1.0 / (np.asarray(rs["short_factor"], np.float32) * pow_)
        long = 1.0 / (np.asarray(rs["long_factor"], np.float32) * pow_)
        return short.astype(np.float32), long.astype(np.float32), int(omax), float(att)
    if kind == "llama3":
        inv = (1.0 / pow_).astype(np.float32)
        factor = np.float32(rs["factor"])
        lo, hi = np.float32(rs["low_freq_factor"]), np.float32(rs["high_freq_factor"])
        old = np.float32(rs["original_max_position_embeddings"])
        lo_wl, hi_wl = old / lo, old / hi
        wl = np.float32(2 * math.pi) / inv
        inv_l = np.where(wl > lo_wl, inv / factor, inv)
        smooth = (old / wl - lo) / (hi - lo)
        smoothed = (1 - smooth) * inv_l / factor + smooth * inv_l
        medium = ~(wl < hi_wl) & ~(wl > lo_wl)
        return np.where(medium, smoothed, inv_l).astype(np.float32), None, None, 1.0
    raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, longrope, llama3)")


def rope_cos_sin(cfg: LLMConfig, position_ids, dtype, valid=None):
    """cos/sin [B, S, rot_dim] as HF computes them (float32 products, then scaling).

    Longrope switches to the long factors when the longest valid position + 1
    exceeds the original context (HF's dynamic longrope update).
    """
    short, long, switch, att = rope_params(cfg)
    pos = position_ids.astype(jnp.float32)[..., None]
    freqs = pos * jnp.asarray(short)
    if long is not None:
        p = position_ids if valid is None else jnp.where(valid, position_ids, 0)
        use_long = (jnp.max(p) + 1) > switch
        freqs = jnp.where(use_long, pos * jnp.asarray(long), freqs)
    emb = jnp.concatenate([freqs, freqs], -1)
    return (jnp.cos(emb) * att).astype(dtype), (jnp.sin(emb) * att).astype(dtype)


def apply_rope(x, cos, sin):
    """x [B, S, H, hd]; rotates the first cos.shape[-1] dims (partial rotary)."""
    r = cos.shape[-1]
    xr, xp = x[..., :r], x[..., r:]
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    x1, x2 = xr[..., : r // 2], xr[..., r // 2:]
    rot = jnp.concatenate([-x2, x1], -1)
    out = xr * c + rot * s
    return jnp.concatenate([out, xp], -1) if xp.shape[-1] else out


# ----------------------------------------------------------------------------- layers

class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, attn_impl="auto", **kw):
        """kw: Linear's options (stack, rngs, param_dtype, dtype, linear_2d)."""
        D, H, KV, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.dim_per_head
        self.fused = cfg.family == "phi3"
        if self.fused:
            self.qkv_proj = Linear(D, (H + 2 * KV) * hd, use_bias=False, axes=("embed", "heads"), **kw)
        else:
            b = cfg.attention_bias
            self.q_proj = Linear(D, H * hd, use_bias=b, axes=("embed", "heads"), **kw)
            self.k_proj = Linear(D, KV * hd, use_bias=b, axes=("embed", "kv_heads"), **kw)
            self.v_proj = Linear(D, KV * hd, use_bias=b, axes=("embed", "kv_heads"), **kw)
        self.o_proj = Linear(H * hd, D, use_bias=False, axes=("heads", "embed"), **kw)
        self.H, self.KV, self.hd, self.attn_impl = H, KV, hd, attn_impl

    def __call__(self, x, cos, sin, keep, cache=None, cache_index=None):
        B, S, _ = x.shape
        H, KV, hd = self.H, self.KV, self.hd
        if self.fused:
            qkv = self.qkv_proj(x)
            q, k, v = jnp.split(qkv, [H * hd, (H + KV) * hd], axis=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = apply_rope(q.reshape(B, S, H, hd), cos, sin)
        k = apply_rope(k.reshape(B, S, KV, hd), cos, sin)
        v = v.reshape(B, S, KV, hd)
        new_cache = None
        if cache is not None:
            kc, vc = cache  # [B, Smax, KV, hd]; sample b writes at slots cache_index[b] + 0..S-1
            slots = cache_index[:, None] + jnp.arange(S)
            bidx = jnp.arange(B)[:, None]
            kc = kc.at[bidx, slots].set(k.astype(kc.dtype), mode="drop")
            vc = vc.at[bidx, slots].set(v.astype(vc.dtype), mode="drop")
            new_cache = (kc, vc)
            k, v = kc.astype(q.dtype), vc.astype(q.dtype)
        o = attention(q, k, v, keep=keep, impl=self.attn_impl).reshape(B, S, H * hd)
        return self.o_proj(o), new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: LLMConfig, **kw):
        D, F = cfg.hidden_size, cfg.intermediate_size
        kw["use_bias"] = False
        self.fused = cfg.family == "phi3"
        if self.fused:
            self.gate_up_proj = Linear(D, 2 * F, axes=("embed", "mlp"), **kw)
        else:
            self.gate_proj = Linear(D, F, axes=("embed", "mlp"), **kw)
            self.up_proj = Linear(D, F, axes=("embed", "mlp"), **kw)
        self.down_proj = Linear(F, D, axes=("mlp", "embed"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        if self.fused:
            gate, up = jnp.split(self.gate_up_proj(x), 2, axis=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(ACT[self.act](gate) * up)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, stack=(), rngs, param_dtype="float32", dtype="float32",
                 attn_impl="auto", linear_2d=False):
        kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.self_attn = Attention(cfg, rngs=rngs, attn_impl=attn_impl, linear_2d=linear_2d, **kw)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rngs=rngs, linear_2d=linear_2d, **kw)

    def __call__(self, x, cos, sin, keep, cache=None, cache_index=None):
        x = checkpoint_name(x, LAYER_INPUT_NAME)   # remat_policy offload_dot keeps it in host memory
        a, cache = self.self_attn(self.input_layernorm(x), cos, sin, keep, cache, cache_index)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), cache


def causal_keep(attention_mask, q_positions=None):
    """Key valid and not in the future.

    Without a cache (Q = K = S, position = index): a `KeyMask` (causal + padding), which the fused
    kernels take. With a cache (attention_mask over its K slots), `q_positions` [B, Q] are the
    absolute slot indices of the queries and the mask is [B, Q, K] bool (the XLA path).
    """
    if q_positions is None:
        return KeyMask(attention_mask.astype(bool), causal=True)
    kidx = jnp.arange(attention_mask.shape[1])
    return (kidx[None, None, :] <= q_positions[:, :, None]) & attention_mask[:, None, :].astype(bool)


def init_cache(cfg: LLMConfig, batch: int, max_len: int, dtype="float32"):
    shape = (cfg.num_hidden_layers, batch, max_len, cfg.num_key_value_heads, cfg.dim_per_head)
    return jnp.zeros(shape, dtype_of(dtype)), jnp.zeros(shape, dtype_of(dtype))
