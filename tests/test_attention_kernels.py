"""The fused kernels equal the XLA attention, forward and gradients, for every mask FUSION's layers use:
the decoder's causal + padding mask (GQA), the vision tower's TUNE masks (reference mode: uniform early
instruct rows; intended mode: early vision rows see only vision keys), the unmasked tile pass and the
interaction layers' windows. Splash runs in Pallas interpret mode on CPU; cuDNN runs where a GPU is
present, and everywhere its argument mapping runs through `jax.nn.dot_product_attention`'s XLA path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.attention import KeyMask, attention, resolve_impl
from fusion_jax.attention_kernels import cudnn, fused_attention, window_attention

HAS_GPU = jax.default_backend() == "gpu"
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}
B, S, H, KV, D, P = 2, 70, 4, 2, 8, 50   # 70 tokens: padded to one 128 block; P vision rows of the tower


def _qkv(dtype, kv=KV, n=S, seed=0):
    r = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(r.normal(size=(B, n, h, D)) * 0.5, dtype) for h in (H, kv, kv))
    return q, k, v


def _masks(kind):
    """(keep, uniform, heads of kv) for one mask kind; lengths are prefixes (right padding)."""
    valid = jnp.asarray(np.arange(S)[None] < np.array([[S], [S - 17]]))
    if kind == "decoder":
        return KeyMask(valid, causal=True), None, KV
    if kind == "tower_reference":
        return KeyMask(valid), jnp.broadcast_to(jnp.arange(S) >= P, (B, S)), H
    if kind == "tower_intended":
        return KeyMask(valid, valid & (jnp.arange(S) < P)[None], first_rows=P), None, H
    return None, None, H   # tiles: no mask


def _check(run_a, run_b, args, dtype, weight=None):
    """Outputs and gradients (of a weighted sum of sin(out)) of two implementations agree."""
    w = 1.0 if weight is None else weight

    def out_and_grads(run):   # one compile per implementation
        def loss(*a):
            o = run(*a)
            return jnp.sum(jnp.sin(o.astype(jnp.float32)) * w), o
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))

    with jax.default_matmul_precision("highest"):
        ga, a = out_and_grads(run_a)(*args)
        gb, b = out_and_grads(run_b)(*args)
    for x, y in zip((a, *ga), (b, *gb), strict=True):
        x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
        # bfloat16 keeps 8 significant bits: its tolerance is relative to the tensor's scale (key
        # gradients sum over 70 queries and reach ~9, where one bf16 step is 0.03)
        scale = max(1.0, float(np.abs(y).max())) if dtype == jnp.bfloat16 else 1.0
        np.testing.assert_allclose(x, y, atol=TOL[dtype] * scale, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["decoder", "tower_reference", "tower_intended", "tiles"])
def test_splash_equals_xla(kind, dtype):
    keep, uniform, kv = _masks(kind)
    q, k, v = _qkv(dtype, kv)

    def run(impl):
        return lambda q, k, v: attention(q, k, v, keep=keep, uniform=uniform, impl=impl)

    _check(run("xla"), run("splash"), (q, k, v), dtype)


@pytest.mark.parametrize("kind", ["decoder", "tower_reference", "tower_intended", "tiles"])
def test_cudnn_argument_mapping_equals_xla(kind):
    """The cudnn path's call (lengths, causal flag, row split) through jax's own XLA attention."""
    keep, uniform, kv = _masks(kind)
    q, k, v = _qkv(jnp.float32, kv)

    def mapped(q, k, v):
        o = fused_attention("cudnn", q, k, v, keep, implementation="xla")
        if uniform is None:
            return o
        return jnp.where(uniform[:, :, None, None], jnp.mean(v, 1)[:, None], o)

    _check(lambda q, k, v: attention(q, k, v, keep=keep, uniform=uniform, impl="xla"), mapped, (q, k, v),
           jnp.float32)


@pytest.mark.skipif(not HAS_GPU, reason="cuDNN attention needs a GPU")
@pytest.mark.parametrize("kind", ["decoder", "tower_reference", "tower_intended", "tiles"])
def test_cudnn_equals_xla_on_gpu(kind):
    keep, uniform, kv = _masks(kind)
    q, k, v = _qkv(jnp.bfloat16, kv)

    def run(impl):
        return lambda q, k, v: attention(q, k, v, keep=keep, uniform=uniform, impl=impl)

    _check(run("xla"), run("cudnn"), (q, k, v), jnp.bfloat16)


def _window_inputs(dtype, n_q=3, lat=16, W=9):
    r = np.random.default_rng(1)
    q = jnp.asarray(r.normal(size=(B, n_q, lat, H, D)) * 0.5, dtype)
    k, v = (jnp.asarray(r.normal(size=(B, lat, W, H, D)) * 0.5, dtype) for _ in range(2))
    return q, k, v


def window_xla(q, k, v):
    """The interaction layer's einsum path (fusion_jax.interaction.CrossAttention)."""
    s = jnp.einsum("blqhd,bqwhd->blqhw", q, k).astype(jnp.float32) * (q.shape[-1] ** -0.5)
    return jnp.einsum("blqhw,bqwhd->blqhd", jax.nn.softmax(s, axis=-1).astype(v.dtype), v)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_window_splash_equals_xla(dtype):
    _check(window_xla, lambda q, k, v: window_attention("splash", q, k, v), _window_inputs(dtype), dtype)


def test_window_cudnn_mapping_equals_xla():
    _check(window_xla, lambda q, k, v: window_attention("cudnn", q, k, v, implementation="xla"),
           _window_inputs(jnp.float32), jnp.float32)
    if HAS_GPU:
        _check(window_xla, lambda q, k, v: window_attention("cudnn", q, k, v), _window_inputs(jnp.bfloat16),
               jnp.bfloat16)


@pytest.mark.skipif(len(jax.devices()) < 2, reason="needs 2 devices (tests/conftest.py gives 8 CPU devices)")
def test_splash_under_a_mesh_is_shard_mapped():
    """Mosaic kernels are not partitioned by XLA: under a mesh the call runs per device (shard_map)."""
    from fusion_jax.sharding import make_mesh
    mesh = make_mesh((1, 2, 1), jax.devices()[:2])
    keep, _, kv = _masks("decoder")
    q, k, v = _qkv(jnp.float32, kv)
    ref = attention(q, k, v, keep=keep, impl="xla")
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        lowered = jax.jit(lambda q, k, v, m: attention(q, k, v, keep=m, impl="splash")).lower(q, k, v, keep)
    assert "shard_map" in lowered.as_text() or "manual" in lowered.as_text().lower()
    with jax.set_mesh(mesh):
        out = jax.jit(lambda q, k, v, m: attention(q, k, v, keep=m, impl="splash"))(q, k, v, keep)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_impl_choice_per_backend(monkeypatch):
    plat = {"p": "tpu"}
    monkeypatch.setattr("fusion_jax.attention.backend_platform", lambda: plat["p"])
    assert resolve_impl("auto", 4096, jnp.bfloat16) == "splash"
    assert resolve_impl("auto", 4096, jnp.bfloat16, dense_mask=True) == "chunked"   # KV-cache calls
    assert resolve_impl("splash", 8, jnp.float32, dense_mask=True) == "xla"
    plat["p"] = "gpu"
    assert resolve_impl("auto", 4096, jnp.bfloat16) == "cudnn"
    assert resolve_impl("auto", 4096, jnp.float32) == "chunked"   # cuDNN has no float32 kernel
    plat["p"] = "cpu"
    assert [resolve_impl("auto", n, jnp.float32) for n in (8, 4096)] == ["xla", "chunked"]
    assert resolve_impl("cudnn", 8) == "cudnn" and resolve_impl("splash", 8) == "splash"


def test_cudnn_padding_is_key_lengths():
    valid = jnp.asarray(np.arange(S)[None] < np.array([[S], [20]]))
    q, k, v = _qkv(jnp.float32)
    a = cudnn(q, k, v, valid, causal=True, implementation="xla")
    b = attention(q, k, v, keep=KeyMask(valid, causal=True), impl="xla")
    np.testing.assert_allclose(np.asarray(a[1, :20]), np.asarray(b[1, :20]), atol=1e-5)
