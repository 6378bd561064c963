"""The train step's chunked CE equals the full-logits CE (value and gradients); turn weights."""
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
    with jax.default_matmul_precision("highest"):
        for chunk, power in ((1, 0.0), (8, 0.0), (64, 0.0), (8, 1.0), (64, 0.5)):
            full = lambda h, W: L.cross_entropy(h @ W, lab, power)[0]
            part = lambda h, W: L.chunked_cross_entropy(h, lab, lambda x: x @ W, chunk, power)[0]
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


def test_turn_weights_count_each_answer_turn():
    I = -100
    tg = jnp.asarray([[I, 5, 6, 7, I, I, 8, 9, I, 4], [I] * 10])
    w1 = np.asarray(L.target_weights(tg, 1.0))
    np.testing.assert_allclose(w1[0], [0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0.5, 0.5, 0, 1], rtol=1e-6)
    assert not w1[1].any()
    np.testing.assert_allclose(np.asarray(L.target_weights(tg, 0.5))[0, 6], 2 ** -0.5, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(L.target_weights(tg, 0.0)), np.asarray(tg != I, np.float32))

    # power 1: the loss is the mean over answer turns of each turn's mean NLL
    r = np.random.default_rng(1)
    logits = jnp.asarray(r.normal(size=(2, 11, 13)), jnp.float32)
    labels = jnp.concatenate([jnp.zeros((2, 1), jnp.int32), tg], 1)
    nll = -jax.nn.log_softmax(logits[:, :-1], -1)
    turns = [[(0, 1), (0, 2), (0, 3)], [(0, 6), (0, 7)], [(0, 9)]]
    want = np.mean([np.mean([float(nll[b, t, int(tg[b, t])]) for b, t in turn]) for turn in turns])
    got, n = L.cross_entropy(logits, labels, 1.0)
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    assert int(n) == 6                              # num_targets still counts tokens

    # the train step's micro-batch shares (step.loss_weights) add up to the big-batch weighted loss
    from fusion_jax.train.step import loss_weights
    cfg = tiny_config("phi3").replace(ce_turn_power=1.0)
    lab = jnp.asarray(np.where(r.random((4, 30)) < 0.5, r.integers(0, 13, (4, 30)), -100))
    lg = jnp.asarray(r.normal(size=(4, 30, 13)), jnp.float32)
    ce_weight = lambda s: loss_weights(cfg, {"labels": lab[s], "instruct_mask": jnp.ones((1, 1)),
                                             "images": jnp.zeros((1, 1))})["ce"]  # only labels count here
    acc = sum(L.cross_entropy(lg[s], lab[s], 1.0)[0] * ce_weight(s) / ce_weight(slice(0, 4))
              for s in (slice(0, 2), slice(2, 4)))
    np.testing.assert_allclose(float(acc), float(L.cross_entropy(lg, lab, 1.0)[0]), rtol=1e-5)
