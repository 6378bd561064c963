"""Model-level behaviour: compile counts, sharding, ablations, mask modes, numerics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.config import tiny_config
from fusion_jax.model import FusionForCausalLM
from fusion_jax.sharding import make_mesh, shard_batch, shard_model
from fusion_jax.testing import random_batch


def _jnp(b):
    return {k: jnp.asarray(v) for k, v in b.items()}


def test_same_bucket_compiles_once():
    cfg = tiny_config("phi3")
    gd, st = nnx.split(FusionForCausalLM(cfg, rngs=nnx.Rngs(0)))

    @jax.jit
    def loss(st, b):
        return nnx.merge(gd, st)(b)["loss"]

    l1 = loss(st, _jnp(random_batch(cfg, seed=1, query_len=4)))
    l2 = loss(st, _jnp(random_batch(cfg, seed=2, query_len=4, text_only=(1,))))
    assert loss._cache_size() == 1 and float(l1) != float(l2)
    loss(st, _jnp(random_batch(cfg, seed=3, query_len=16)))   # another q is another bucket
    assert loss._cache_size() == 2


def test_sharded_forward_equals_unsharded():
    cfg = tiny_config("llama")
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    batch = random_batch(cfg, batch=4, seed=5)
    f = nnx.jit(lambda m, b: m(b))
    ref = jax.tree.map(np.asarray, f(model, _jnp(batch)))
    mesh = make_mesh((2, 2, 2))
    with jax.set_mesh(mesh):
        shard_model(model, mesh)
        out = jax.tree.map(np.asarray, f(model, shard_batch(batch, mesh)))
    emb = nnx.state(model)["model"]["embed_tokens"]["weight"].get_value()
    assert len(emb.sharding.device_set) == 8 and not emb.sharding.is_fully_replicated
    assert np.abs(out["logits"] - ref["logits"]).max() < 1e-5
    assert abs(float(out["loss"]) - float(ref["loss"])) < 1e-5


@pytest.mark.parametrize("switch", ["use_tune", "use_card", "use_dsm"])
def test_ablation_switches(switch):
    base = tiny_config("qwen2")
    cfg = base.replace(**{switch: False})
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, b: m(b))(model, _jnp(random_batch(cfg, seed=2)))
    assert np.isfinite(float(out["loss"]))
    if switch == "use_card":
        assert model.model.vision_sampler_layers is None and cfg.interaction_after == ()
    if switch == "use_tune":
        assert float(out["instruct_cos_loss"]) == 0.0
    if switch == "use_dsm":
        assert float(out["loss"]) == pytest.approx(float(out["ce_loss"]))
    all_off = FusionForCausalLM(base.replace(use_tune=False, use_card=False, use_dsm=False), rngs=nnx.Rngs(0))
    assert np.isfinite(float(nnx.jit(lambda m, b: m(b)["loss"])(all_off, _jnp(random_batch(base)))))


def test_intended_mask_mode_ignores_instruct_padding_width():
    """In `intended` mode extra instruct padding changes nothing; in `reference` mode it does."""
    for mode, same in (("intended", True), ("reference", False)):
        cfg = tiny_config("phi3", early_mask_mode=mode)
        model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
        f = nnx.jit(lambda m, b: m(b)["logits"])
        a = random_batch(cfg, seed=4, instruct_len=8)
        b = dict(a)
        b["instructs"] = np.pad(a["instructs"], ((0, 0), (0, 8)))
        b["instruct_mask"] = b["instructs"] != 0
        d = float(np.abs(np.asarray(f(model, _jnp(a))) - np.asarray(f(model, _jnp(b)))).max())
        assert (d < 1e-5) == same, (mode, d)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    cfg32 = tiny_config("phi3")
    m32 = FusionForCausalLM(cfg32, rngs=nnx.Rngs(0))
    m16 = FusionForCausalLM(cfg32.replace(compute_dtype="bfloat16"), rngs=nnx.Rngs(0))
    b = _jnp(random_batch(cfg32, seed=7))
    l32 = float(nnx.jit(lambda m, b: m(b)["loss"])(m32, b))
    g = nnx.jit(lambda m, b: nnx.grad(lambda m: m(b)["loss"])(m))(m16, b)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(m16)))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(g))
    l16 = float(nnx.jit(lambda m, b: m(b)["loss"])(m16, b))
    assert abs(l16 - l32) < 0.05 * abs(l32)


def test_scan_equals_unrolled_and_remat():
    # one attention implementation throughout (loop == xla is pinned in test_attention)
    cfg = tiny_config("llama", attention_impl="xla")
    b = _jnp(random_batch(cfg, seed=9))
    outs = []
    for kw in (dict(scan_layers=True), dict(scan_layers=False), dict(remat_policy="full")):
        m = FusionForCausalLM(cfg.replace(**kw), rngs=nnx.Rngs(0))
        loss, grads = nnx.jit(lambda m, b: nnx.value_and_grad(lambda m: m(b)["loss"])(m))(m, b)
        outs.append((float(loss), jax.tree.leaves(grads)))
    for loss, g in outs[1:]:
        assert abs(loss - outs[0][0]) < 1e-5
        assert max(float(jnp.abs(a - c).max()) for a, c in zip(g, outs[0][1], strict=True)) < 1e-5


def test_unrefined_latent_blocks_hold_initial_latents():
    """Eval convention: only block 0 is refined, but every block is spliced with init latents."""
    from fusion_jax.layout import build_layout
    from fusion_jax.testing import random_conversation
    cfg = tiny_config("phi3")
    model = FusionForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids, _, ins = random_conversation(np.random.default_rng(0), cfg.llm.vocab_size, 3, image=True)
    lay = build_layout([ids], None, [ins], num_image_tokens=cfg.num_image_tokens, query_len=4,
                       max_questions=1, seq_len=128, instruct_len=16)
    lay["images"] = np.random.default_rng(1).uniform(-1, 1, (1, 5, 3, 32, 32)).astype(np.float32)
    b = _jnp(lay)
    enc = model.encode(b, 4)
    x = np.asarray(model.splice(b, enc))
    fill = lay["latent_fill_pos"][0]
    assert (fill >= 0).sum() == 12 and (lay["latent_pos"][0] >= 0).sum() == 4
    init = np.broadcast_to(np.asarray(enc["init_latent"])[0], (3, 4, 64))
    np.testing.assert_allclose(x[0, fill].reshape(3, 4, -1), init, atol=1e-6)


def test_old_fusion_config_json_still_loads():
    """Retired switches (off by default) in an older fusion_config.json are dropped on load."""
    from fusion_jax.config import FusionConfig
    d = tiny_config("phi3").to_dict()
    cfg = FusionConfig.from_dict(dict(d, ce_turn_power=0.0, vision_posemb_init="normal"))
    assert cfg == tiny_config("phi3") and not cfg.linear_2d and not cfg.ce_skip_empty_chunks
