"""The CPU `loop` and the `chunked` attention equal the batched `xla` one (values and gradients), masks and
GQA included; the implementation is the config's choice alone."""
import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.attention import attention, resolve_impl


def _inputs(B=2, Q=70, K=70, H=4, KV=2, d=8, seed=0):
    r = np.random.default_rng(seed)
    q = jnp.asarray(r.normal(size=(B, Q, H, d)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, K, KV, d)), jnp.float32)
    v = jnp.asarray(r.normal(size=(B, K, KV, d)), jnp.float32)
    keep = jnp.asarray(r.random((B, Q, K)) > 0.3)
    uniform = jnp.asarray(r.random((B, Q)) > 0.8)
    return q, k, v, keep, uniform


@pytest.mark.parametrize("kv,masked,impl", [(4, False, "loop"), (2, True, "loop"), (1, True, "loop"),
                                             (2, True, "chunked"), (4, False, "chunked")])
def test_other_impls_equal_xla(kv, masked, impl, monkeypatch):
    monkeypatch.setattr("fusion_jax.attention.CHUNK", 32)   # 70 queries -> 3 chunks, padded
    monkeypatch.setattr("fusion_jax.attention.LOOP_MIN_QUERIES", 64)   # 70 queries -> the loop
    q, k, v, keep, uniform = _inputs(KV=kv)
    kw = dict(keep=keep, uniform=uniform) if masked else {}

    def f(impl):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, impl=impl, **kw)))

    with jax.default_matmul_precision("highest"):
        a = jax.jit(attention, static_argnames="impl")(q, k, v, impl="xla", **kw)
        b = jax.jit(attention, static_argnames="impl")(q, k, v, impl=impl, **kw)
        ga = jax.jit(jax.grad(f("xla"), argnums=(0, 1, 2)))(q, k, v)
        gb = jax.jit(jax.grad(f(impl), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    for x, y in zip(ga, gb, strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5)


def test_uniform_rows_average_all_values(monkeypatch):
    monkeypatch.setattr("fusion_jax.attention.LOOP_MIN_QUERIES", 64)
    q, k, v, keep, _ = _inputs(KV=4)
    uniform = jnp.zeros((2, 70), bool).at[:, 5].set(True)
    o = attention(q, k, v, keep=keep, uniform=uniform, impl="loop")
    np.testing.assert_allclose(np.asarray(o[:, 5]), np.asarray(v.mean(1)), atol=1e-5)


def test_impl_choice_ignores_the_mesh():
    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    for ctx in (contextlib.nullcontext(), jax.sharding.use_abstract_mesh(mesh.abstract_mesh)):
        with ctx:
            assert [resolve_impl("auto", n) for n in (1, 300, 4096)] == ["xla", "xla", "chunked"]
            assert [resolve_impl("loop", n) for n in (1, 255, 256, 4096)] == ["xla", "xla", "loop", "loop"]
            assert resolve_impl("chunked", 8) == "chunked" and resolve_impl("xla", 4096) == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_impl("flash", 128)
