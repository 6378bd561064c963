"""Static-shape vision ops against their PyTorch definitions."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fusion_jax.interaction import context_windows
from fusion_jax.vision import adaptive_bins, adaptive_max_pool2d, resize_tokens, stitch_tiles


@pytest.mark.parametrize("size,out", [(54, 2), (54, 4), (54, 6), (54, 12), (54, 18), (48, 5), (48, 36), (16, 12)])
def test_adaptive_max_pool_matches_torch(size, out):
    x = np.random.default_rng(size * 100 + out).standard_normal((2, size, size, 3)).astype(np.float32)
    want = F.adaptive_max_pool2d(torch.as_tensor(x).permute(0, 3, 1, 2), (out, out)).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(np.asarray(adaptive_max_pool2d(jnp.asarray(x), out)), want.numpy())


def test_adaptive_bins_overlap_when_not_divisible():
    idx = adaptive_bins(54, 4)   # bins [0,14) [13,27) [27,41) [40,54)
    assert idx[0, 0] == 0 and idx[1, 0] == 13 and idx[3, -1] == 53


def test_context_windows_match_unfold():
    B, s, w, D = 2, 3, 3, 5
    g = np.random.default_rng(0).standard_normal((B, (s * w) ** 2, D)).astype(np.float32)
    t = torch.as_tensor(g).view(B, s * w, s * w, D).permute(0, 3, 1, 2)
    u = F.unfold(t, kernel_size=(w, w), stride=(w, w)).view(B, D, w * w, -1).permute(0, 3, 2, 1)
    np.testing.assert_array_equal(np.asarray(context_windows(jnp.asarray(g), s * s, w)), u.numpy())


def test_stitch_order_matches_reference_view_permute():
    B, g, D = 2, 3, 4
    x = np.random.default_rng(1).standard_normal((B, 4, g * g, D)).astype(np.float32)
    want = torch.as_tensor(x).view(B, 2, 2, g, g, D).permute(0, 1, 3, 2, 4, 5).reshape(B, 2 * g, 2 * g, D)
    np.testing.assert_array_equal(np.asarray(stitch_tiles(jnp.asarray(x), g)), want.numpy())


@pytest.mark.parametrize("src,dst", [(27, 12), (24, 12), (8, 5)])
def test_fusion_l_resize_matches_interpolate(src, dst):
    x = np.random.default_rng(2).standard_normal((2, src * src, 6)).astype(np.float32)
    t = torch.as_tensor(x).view(2, src, src, 6).permute(0, 3, 1, 2)
    want = F.interpolate(t, size=(dst, dst), mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    got = np.asarray(resize_tokens(jnp.asarray(x), src, dst))
    np.testing.assert_allclose(got, want.reshape(2, dst * dst, 6).numpy(), atol=1e-5)


def test_patch_embedding_ignores_remainder_like_valid_conv():
    """so400m: 384 px / 14 px patches -> 27x27, the last 6 rows/cols are never read."""
    from flax import nnx

    from fusion_jax.config import VisionConfig
    from fusion_jax.vision import SiglipEmbeddings
    cfg = VisionConfig(hidden_size=8, image_size=30, patch_size=7)
    emb = SiglipEmbeddings(cfg, rngs=nnx.Rngs(0), param_dtype="float32", dtype="float32")
    x = np.random.default_rng(0).standard_normal((2, 3, 30, 30)).astype(np.float32)
    w = np.asarray(emb.patch_embedding.kernel[...]).T.reshape(8, 3, 7, 7)
    bias = torch.as_tensor(np.array(emb.patch_embedding.bias[...]))
    conv = F.conv2d(torch.as_tensor(x), torch.as_tensor(w), bias, stride=7)
    want = conv.flatten(2).transpose(1, 2).numpy() + np.asarray(emb.position_embedding[...])
    np.testing.assert_allclose(np.asarray(emb(jnp.asarray(x))), want, atol=1e-5)

