"""TUNE: the text-guided SigLIP tower, its feature connector and the global context.

The main view is encoded together with the projected question tokens; the four
global tiles are encoded without text. Early layers (index < split) treat the
instruct rows differently, per `early_mask_mode`:
  reference: instruct *queries* attend uniformly to every key, padding included
             (the reference's `attn_weights[:, :729, 729:] = min` hits the head axis);
  intended:  vision queries cannot see instruct keys.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.attention import KeyMask, attention
from fusion_jax.config import VisionConfig
from fusion_jax.nn import ACT, LayerNorm, Linear, _param, dtype_of, remat, scan_layers, scanned
from fusion_jax.sharding import constrain


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, attn_impl="auto", **kw):
        """kw: Linear's options (stack, rngs, param_dtype, dtype, linear_2d)."""
        D = cfg.hidden_size
        self.q_proj = Linear(D, D, axes=("vision_embed", "vision_heads"), **kw)
        self.k_proj = Linear(D, D, axes=("vision_embed", "vision_heads"), **kw)
        self.v_proj = Linear(D, D, axes=("vision_embed", "vision_heads"), **kw)
        self.out_proj = Linear(D, D, axes=("vision_heads", "vision_embed"), **kw)
        self.num_heads, self.attn_impl = cfg.num_attention_heads, attn_impl

    def __call__(self, x, keep, uniform):
        """keep: a KeyMask or None; uniform: [B, Q] bool rows forced uniform, or None."""
        B, N, D = x.shape
        H = self.num_heads
        hd = D // H
        q = self.q_proj(x).reshape(B, N, H, hd)
        k = self.k_proj(x).reshape(B, N, H, hd)
        v = self.v_proj(x).reshape(B, N, H, hd)
        o = attention(q, k, v, keep=keep, uniform=uniform, impl=self.attn_impl)
        return self.out_proj(o.reshape(B, N, D))


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: VisionConfig, **kw):
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, axes=("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, axes=("vision_mlp", "vision_embed"), **kw)
        self.act = cfg.hidden_act

    def __call__(self, x):
        return self.fc2(ACT[self.act](self.fc1(x)))


class SiglipEncoderLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, stack=(), rngs, param_dtype="float32", dtype="float32",
                 attn_impl="auto", linear_2d=False):
        kw = dict(stack=stack, param_dtype=param_dtype, dtype=dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.self_attn = SiglipAttention(cfg, rngs=rngs, attn_impl=attn_impl, linear_2d=linear_2d, **kw)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(cfg, rngs=rngs, linear_2d=linear_2d, **kw)

    def __call__(self, x, keep, uniform):
        x = x + self.self_attn(self.layer_norm1(x), keep, uniform)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEmbeddings(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype, dtype, linear_2d=False):
        p, C, D = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        # Conv2d(k=p, stride=p) as a matmul over flattened (C, p, p) patches.
        self.patch_embedding = Linear(C * p * p, D, axes=("patch", "vision_embed"), rngs=rngs,
                                      param_dtype=param_dtype, dtype=dtype, linear_2d=linear_2d)
        e = jax.random.normal(rngs.params(), (cfg.num_patches, D), jnp.float32) * 0.02
        self.position_embedding = _param(e.astype(param_dtype), ("patch_pos", "vision_embed"))
        self.patch_size, self.dtype = p, dtype

    def __call__(self, pixels):
        """pixels [N, C, H, W] (NCHW like the reference) -> [N, P, D]."""
        p = self.patch_size
        # a VALID conv ignores the remainder rows/cols (384 px with 14 px patches)
        pixels = pixels[:, :, : pixels.shape[2] // p * p, : pixels.shape[3] // p * p]
        N, C, H, W = pixels.shape
        x = pixels.reshape(N, C, H // p, p, W // p, p).transpose(0, 2, 4, 1, 3, 5)
        x = x.reshape(N, (H // p) * (W // p), C * p * p)
        return self.patch_embedding(x) + self.position_embedding[...].astype(dtype_of(self.dtype))


class SiglipVisionTower(nnx.Module):
    """SigLIP without its last layer and head; `post_layernorm` kept (unused, as in the reference)."""

    def __init__(self, cfg: VisionConfig, *, rngs, param_dtype="float32", dtype="float32",
                 early_mask_mode="reference", remat_policy="none", scan=True, attn_impl="auto",
                 linear_2d=False):
        self.cfg = cfg
        self.embeddings = SiglipEmbeddings(cfg, rngs=rngs, param_dtype=param_dtype, dtype=dtype,
                                           linear_2d=linear_2d)
        self.layers = scanned(SiglipEncoderLayer(cfg, stack=(cfg.num_layers,), rngs=rngs, param_dtype=param_dtype,
                                                 dtype=dtype, attn_impl=attn_impl, linear_2d=linear_2d))
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps,
                                        param_dtype=param_dtype, dtype=dtype)
        self.early_mask_mode, self.remat_policy, self.scan = early_mask_mode, remat_policy, scan

    def masks(self, B, P, instruct_mask):
        """(key_ok [B, K], uniform_early [B, Q] or None) for the text-guided pass."""
        T = instruct_mask.shape[1]
        key_ok = jnp.concatenate([jnp.ones((B, P), bool), instruct_mask.astype(bool)], 1)  # [B, K]
        if self.early_mask_mode == "reference":
            return key_ok, jnp.broadcast_to(jnp.arange(P + T) >= P, (B, P + T))
        return key_ok, None

    @staticmethod
    def layer_mask(key_ok, uniform, is_early, P):
        """(KeyMask, uniform rows) of one layer. reference: late mask everywhere, instruct rows
        uniform in early layers; intended: early vision queries see only the vision keys."""
        if uniform is not None:
            return KeyMask(key_ok), uniform & is_early
        vis_only = key_ok & (jnp.arange(key_ok.shape[1]) < P)[None]
        return KeyMask(key_ok, jnp.where(is_early, vis_only, key_ok), first_rows=P), None

    def __call__(self, pixels, instruct_states=None, instruct_mask=None, *, return_hidden=False):
        """Returns (connector features [N, P(+T), 3D], hs0 [N, P(+T), D], hidden states or None)."""
        cfg = self.cfg
        x = self.embeddings(pixels)
        N, P, D = x.shape
        if instruct_states is not None:
            x = jnp.concatenate([x, instruct_states.astype(x.dtype)], axis=1)
            key_ok, uni_e = self.masks(N, P, instruct_mask)
        else:
            key_ok = uni_e = None
        k = cfg.split
        early = np.arange(cfg.num_layers) < k
        group = np.where(early, 0, np.where(np.arange(cfg.num_layers) < 2 * k, 1, 2))

        def run(st, h, is_early):
            layer = nnx.merge(layer_def, st)
            if key_ok is None:
                return layer(h, None, None)
            return layer(h, *self.layer_mask(key_ok, uni_e, is_early, P))

        # remat the layer only: the running sums are linear and must not be saved per layer
        run = remat(run, self.remat_policy)
        layer_def = nnx.graphdef(self.layers)

        def body(layer, carry, xs):
            h, s1, s2 = carry
            is_early, g = xs
            s1 = s1 + jnp.where(g == 0, h, 0).astype(jnp.float32)
            s2 = s2 + jnp.where(g == 1, h, 0).astype(jnp.float32)
            out = constrain(run(nnx.state(layer), h, is_early), "batch", None, None)
            return (out, s1, s2), (h if return_hidden else None)

        zeros = jnp.zeros(x.shape, jnp.float32)
        (h, s1, s2), hs = scan_layers(self.layers, body, (x, zeros, zeros),
                                      (jnp.asarray(early), jnp.asarray(group)),
                                      unroll=not self.scan)
        feats = jnp.concatenate([h.astype(jnp.float32), s1 / k, s2 / k], -1).astype(h.dtype)
        if return_hidden:
            hs = jnp.concatenate([hs, h[None]], 0)
        return feats, x, hs


# ----------------------------------------------------------------------------- global context

def adaptive_bins(size: int, out: int) -> np.ndarray:
    """PyTorch adaptive pooling bins as a padded index table [out, kmax].

    Bin i covers [floor(i*size/out), ceil((i+1)*size/out)); shorter bins repeat
    their first index, which leaves a max unchanged.
    """
    starts = [(i * size) // out for i in range(out)]
    ends = [-(-((i + 1) * size) // out) for i in range(out)]
    kmax = max(e - s for s, e in zip(starts, ends, strict=True))
    idx = np.zeros((out, kmax), np.int32)
    for i, (s, e) in enumerate(zip(starts, ends, strict=True)):
        row = list(range(s, e))
        idx[i] = row + [s] * (kmax - len(row))
    return idx


def adaptive_max_pool2d(x, out: int):
    """x [B, H, W, D] -> [B, out, out, D], PyTorch-exact (overlapping bins included)."""
    B, H, W, D = x.shape
    rows = adaptive_bins(H, out)
    x = jnp.max(x[:, rows], axis=2)            # [B, out, W, D]
    cols = adaptive_bins(W, out)
    return jnp.max(x[:, :, cols], axis=3)      # [B, out, out, D]


def stitch_tiles(tiles, grid: int):
    """[B, 4, grid*grid, D] (TL, TR, BL, BR) -> [B, 2*grid, 2*grid, D]."""
    B, _, _, D = tiles.shape
    t = tiles.reshape(B, 2, 2, grid, grid, D).transpose(0, 1, 3, 2, 4, 5)
    return t.reshape(B, 2 * grid, 2 * grid, D)


def bilinear_matrix(src: int, dst: int) -> np.ndarray:
    """Interpolation matrix of F.interpolate(mode='bilinear', align_corners=False) along one axis."""
    m = np.zeros((dst, src), np.float64)
    scale = src / dst
    for i in range(dst):
        x = max((i + 0.5) * scale - 0.5, 0.0)
        x0 = min(int(math.floor(x)), src - 1)
        x1 = min(x0 + 1, src - 1)
        w1 = x - x0
        m[i, x0] += 1 - w1
        m[i, x1] += w1
    return m.astype(np.float32)


def resize_tokens(feats, grid: int, out: int):
    """FUSION-L: [B, grid*grid, D] -> [B, out*out, D] by bilinear resize."""
    B, _, D = feats.shape
    m = jnp.asarray(bilinear_matrix(grid, out))
    x = feats.reshape(B, grid, grid, D)
    x = jnp.einsum("ih,bhwd->biwd", m, x)
    x = jnp.einsum("jw,biwd->bijd", m, x)
    return x.reshape(B, out * out, D)
