"""The train step's chunked CE equals the full-logits CE (value and gradients); micro-batch shares."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.config import tiny_config
from fusion_jax.loss import chunked_cross_entropy, cross_entropy
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

    def full(h, W):
        return cross_entropy(h @ W, lab)[0]

    with jax.default_matmul_precision("highest"):
        for chunk, skip in ((1, False), (8, False), (64, False), (8, True)):
            def part(h, W, chunk=chunk, skip=skip):
                return chunked_cross_entropy(h, lab, lambda x: x @ W, chunk, skip)[0]

            np.testing.assert_allclose(float(jax.jit(part)(h, W)), float(full(h, W)), atol=1e-5)
            for a, b in zip(jax.grad(full, (0, 1))(h, W), jax.jit(jax.grad(part, (0, 1)))(h, W), strict=True):
                np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    none = jnp.full((B, S), -100)
    loss, n = chunked_cross_entropy(h, none, lambda x: x @ W, 8)
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
    for a, c in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5)


def test_micro_batch_shares_add_up_to_the_batch_loss():
    """The train step weighs each micro-batch's CE by its share of the targets (step.loss_counts)."""
    from fusion_jax.train.step import loss_counts
    r = np.random.default_rng(1)
    lab = jnp.asarray(np.where(r.random((4, 30)) < 0.5, r.integers(0, 13, (4, 30)), -100))
    lg = jnp.asarray(r.normal(size=(4, 30, 13)), jnp.float32)

    def n_targets(s):  # only labels feed the CE count
        return loss_counts({"labels": lab[s], "instruct_mask": jnp.ones((1, 1)), "images": jnp.zeros((1, 1))})["ce"]

    acc = sum(cross_entropy(lg[s], lab[s])[0] * n_targets(s) / n_targets(slice(0, 4))
              for s in (slice(0, 2), slice(2, 4)))
    np.testing.assert_allclose(float(acc), float(cross_entropy(lg, lab)[0]), rtol=1e-5)
