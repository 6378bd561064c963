"""The train step's chunked CE equals the full-logits CE (value and gradients)."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax import loss as L
from fusion_jax.config import tiny_config
from fusion_jax.model import FusionForCausalLM
from fusion_jax.testing import random_batch


def test_chunked_ce_equals_full():
    r = np.random.default_rng(0)
    B, S, D, V = 3, 50, 16, 40
    h = jnp.asarray(r.normal(size=(B, S, D)), jnp.float32)
    W = jnp.asarray(r.normal(size=(D, V)), jnp.float32)
    lab = np.where(r.random((B, S)) < 0.3, r.integers(0, V, (B, S)), -100)
    lab[2] = -100                                   # a sample without targets
    lab = jnp.asarray(lab)
    full = lambda h, W: L.cross_entropy(h @ W, lab)[0]
    with jax.default_matmul_precision("highest"):
        for chunk in (1, 8, 64):
            part = lambda h, W: L.chunked_cross_entropy(h, lab, lambda x: x @ W, chunk)[0]
            np.testing.assert_allclose(float(jax.jit(part)(h, W)), float(full(h, W)), atol=1e-5)
            for a, b in zip(jax.grad(full, (0, 1))(h, W), jax.jit(jax.grad(part, (0, 1)))(h, W)):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    none = jnp.full((B, S), -100)
    loss, n = L.chunked_cross_entropy(h, none, lambda x: x @ W, 8)
    assert float(loss) == 0.0 and int(n) == 0


def test_model_loss_without_logits_matches():
    cfg = tiny_config("phi3").replace(loss_chunk=16)
    gd, st = nnx.split(FusionForCausalLM(cfg, rngs=nnx.Rngs(0)))
    b = {k: jnp.asarray(v) for k, v in random_batch(cfg, seed=1, query_len=4).items()}

    def f(st, full):
        out = nnx.merge(gd, st)(b, return_logits=full)
        return out["loss"], out

    with jax.default_matmul_precision("highest"):
        # jitted, as the train step runs it (the test is compile-bound either way, ~35 s on 2 cores)
        (l1, o1), g1 = jax.jit(jax.value_and_grad(lambda s: f(s, True), has_aux=True))(st)
        (l2, o2), g2 = jax.jit(jax.value_and_grad(lambda s: f(s, False), has_aux=True))(st)
    assert "logits" not in o2 and int(o1["num_targets"]) == int(o2["num_targets"]) > 0
    np.testing.assert_allclose(float(l1), float(l2), atol=1e-5)
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)
