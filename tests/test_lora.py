"""LoRA / QLoRA: adapters at init leave the base's logits, merging is exact, only adapters and
full_train parameters train (and resume exactly), QLoRA nf4 / int8 learn, and the `to-peft` folder
loads with `peft` onto the transformers LLM with our logits."""
from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import _batch, _cfg, _shard, _tc

from fusion_jax import lora
from fusion_jax.config import LoraConfig, tiny_config
from fusion_jax.convert.lora_export import write_orbax_folder
from fusion_jax.model import FusionForCausalLM
from fusion_jax.sharding import make_mesh
from fusion_jax.testing import random_batch
from fusion_jax.train import loop
from fusion_jax.train.optim import path_str


def _flat(params: dict) -> dict:
    return {path_str(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _randomize_adapters(model, seed=3, scale=0.2):
    for i, (_, m) in enumerate(lora.adapted_linears(model, model.cfg.lora)):
        b = m.lora_b.get_value()
        m.lora_b.set_value(jax.random.normal(jax.random.PRNGKey(seed + i), b.shape, b.dtype) * scale)


def _write_folder(folder, cfg, params: dict):
    os.makedirs(folder)
    write_orbax_folder(folder, cfg, {k.replace("/", "."): v for k, v in _flat(params).items()})
    return str(folder)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, batch):
    return nnx.merge(graphdef, state)(batch)["logits"]


def _logits(model, batch):
    """Jitted logits (one compile per model structure: eager runs op by op, slowly)."""
    graphdef, state = nnx.split(model)
    return np.asarray(_forward(graphdef, state, {k: jnp.asarray(v) for k, v in batch.items()}))


def _small(family="llama"):
    cfg = tiny_config(family, num_sampler_layers=1)
    return cfg.replace(llm=dataclasses.replace(cfg.llm, num_hidden_layers=2))


def test_adapters_start_at_the_base():
    """B = 0 at init: exactly the base's logits; LoRA dropout only where the train step attaches keys.
    (Merging: test_merge_lora_and_loading_adapters_with_base.)"""
    cfg = _small()
    base = FusionForCausalLM(cfg, seed=0)
    batch = random_batch(cfg, seq_len=96)
    want = _logits(base, batch)
    lc = LoraConfig(rank=4, alpha=8.0, base_dtype="float32")
    model = lora.build_model(cfg.replace(lora=lc), 1, nnx.split(base)[1].to_pure_dict())
    np.testing.assert_array_equal(_logits(model, batch), want)
    q = model.model.layers.self_attn.q_proj
    assert q.lora_a.get_metadata()["logical_axes"] == ("layers", "embed", "lora_rank")
    assert q.lora_b.get_metadata()["logical_axes"] == ("layers", "lora_rank", "heads")
    assert q.lora_a.get_value().shape == (cfg.llm.num_hidden_layers, cfg.llm.hidden_size, 4)
    assert np.abs(q.lora_a.get_value()).max() > 0 and not np.any(q.lora_b.get_value())
    _randomize_adapters(model)
    trained = _logits(model, batch)
    assert np.abs(trained - want).max() > 1e-2   # same program, trained adapters: they act
    # lora.dropout configured: the model as eval / generate / chat / merge use it (no keys) runs undropped
    drop = lora.build_model(cfg.replace(lora=dataclasses.replace(lc, dropout=0.05)), 1)
    nnx.update(drop, nnx.state(model))
    np.testing.assert_array_equal(_logits(drop, batch), trained)
    # the train step's keys (lora.attach_dropout_keys): one per adapted layer and stacked layer
    lora.attach_dropout_keys(drop, jax.random.PRNGKey(0))
    keys = np.stack([m.lora_dropout_key.get_value() for _, m in lora.adapted_linears(drop, lc)])
    assert keys.shape[:2] == (7, cfg.llm.num_hidden_layers)   # q, k, v, o, gate, up, down
    assert len(np.unique(keys.reshape(-1, keys.shape[-1]), axis=0)) == keys.shape[0] * keys.shape[1]


def test_lora_dropout_is_inverted_dropout_on_the_adapter_input():
    """peft's order: y = x @ W + scale * (dropout(x) @ A) @ B, with torch's inverted dropout (kept
    inputs scaled by 1 / (1 - p)); only while keys are attached (the train step), per scanned layer."""
    import torch

    from fusion_jax.nn import Linear, LoraDropoutKey, scan_layers
    p, d, n = 0.05, 64, 2
    eye = jnp.broadcast_to(jnp.eye(d), (n, d, d))
    lin = Linear(d, d, use_bias=False, stack=(n,), rngs=nnx.Rngs(0))
    lin.add_lora(d, 1.0, jax.random.PRNGKey(1), init_a=lambda k, shape, dt: eye, dropout=p)
    lin.lora_b.set_value(eye)                       # A = B = I, scale 1: the branch is dropout(x)
    x = jax.random.normal(jax.random.PRNGKey(2), (n, 512, d))
    run = jax.jit(lambda g, st: scan_layers(nnx.merge(g, st), lambda layer, c, xi: (c, layer(xi)), 0, x)[1],
                  static_argnums=0)
    lin.kernel.set_value(jnp.zeros_like(eye))
    np.testing.assert_array_equal(run(*nnx.split(lin)), x)   # no keys: no dropout
    lin.lora_dropout_key = LoraDropoutKey(jax.random.split(jax.random.PRNGKey(3), n))
    drop = np.asarray(run(*nnx.split(lin)))
    kept = drop != 0
    torch.manual_seed(0)
    scale = torch.nn.functional.dropout(torch.ones(64), p, training=True).max().item()   # 1 / (1 - p)
    np.testing.assert_allclose(drop[kept], np.asarray(x)[kept] * scale, rtol=1e-6)
    assert abs(kept.mean() - (1 - p)) < 0.01
    assert not np.array_equal(kept[0], kept[1])   # each layer its own mask
    lin.kernel.set_value(eye)
    np.testing.assert_allclose(run(*nnx.split(lin)), x + drop, rtol=1e-5, atol=1e-6)   # base path: x undropped


class _DataState:
    """The data iterator's part in a checkpoint (this test feeds fixed batches)."""

    def get_state(self):
        return {"pos": 0}

    def set_state(self, state):
        assert state == {"pos": 0}


def _setup(tmp_path, base_dtype, base_params, dropout=0.0, **tc_kw):
    base = _write_folder(tmp_path / "base", _cfg(), base_params)
    cfg = _cfg().replace(lora=LoraConfig(rank=4, alpha=8.0, dropout=dropout, base_dtype=base_dtype, base=base))
    mesh = make_mesh((1, 1, 1), jax.devices()[:1])
    return loop.Setup(_tc(mesh=(1, 1, 1), **tc_kw), None, mesh=mesh, model_cfg=cfg)


def _steps(s, state, batches):
    losses = []
    for b in batches:
        state, m = s.train_step(state, _shard(b, s.mesh))
        losses.append(float(m["loss"]))
    return state, losses


def test_only_adapters_and_full_train_change_and_resume_is_exact(tmp_path):
    """On a QLoRA (nf4) base read from a folder, with the reference's LoRA dropout (0.05): the real train
    step (2 accumulated micro-batches) learns, checkpoint and resume. Dropout's keys come from the
    state's rng: a step is a function of the state (resume: same losses), another rng gives others."""
    from fusion_jax.train import checkpoint as ckpt_lib
    base_params = nnx.split(FusionForCausalLM(_cfg(), seed=5))[1].to_pure_dict()
    s = _setup(tmp_path, "nf4", base_params, dropout=0.05, grad_accum=2)
    lc = s.cfg.lora
    batches = [_batch(seed=i) for i in range(4)]
    state = s.init_state()
    p0 = _flat(jax.device_get(state["params"]))
    for k, v in _flat(base_params).items():   # the base is what the folder held (in bfloat16 / nf4)
        if k in p0:
            np.testing.assert_array_equal(p0[k], v.astype(p0[k].dtype))
        else:
            assert p0[k.replace("kernel", "kernel_qvalue")].dtype == jnp.dtype("uint4"), k
    # optimizer state only for adapters + full_train
    n_train = sum(v.size for k, v in p0.items() if lora.is_trainable(k, lc))
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt_state"]))
    assert 0 <= n_opt - 2 * n_train < 8 and n_train < sum(v.size for v in p0.values()) / 2

    ck = ckpt_lib.Checkpointer(str(tmp_path / "run"), keep=2, every=2, async_save=False,
                               model_config_json=s.cfg.to_json(), params_part=s.trainable_part)
    state, first = _steps(s, state, batches[:2])
    ck.save(2, state, {"pos": 0}, {}, force=True)
    ck.wait()
    state, rest = _steps(s, state, batches[2:])
    p4 = _flat(jax.device_get(state["params"]))
    moved = {k for k in p0 if np.abs(p4[k] - p0[k]).max() > 0}
    for k in p0:
        if not lora.is_trainable(k, lc):
            np.testing.assert_array_equal(p4[k], p0[k])   # frozen: bit-identical
        elif "vision_sampler_layers" not in k:   # (these batches have no latent tokens: no gradient)
            assert k in moved, k
    stored = set(os.listdir(tmp_path / "run" / "checkpoints" / "2" / "params"))
    names = {k.replace("/", ".") for k in p0}
    assert {n for n in names if n in stored} == {k.replace("/", ".") for k in p0 if lora.is_trainable(k, lc)}
    # resume: the checkpoint's adapters + full_train on the base re-read from lora.base
    restored, step = loop.init_or_resume(s, ck, _DataState(), str(tmp_path / "run"))
    ck.close()
    assert step == 2
    other = {**jax.tree.map(jnp.copy, restored), "rng": jax.device_put(jax.random.PRNGKey(9), restored["rng"].sharding)}
    assert _steps(s, other, batches[2:3])[1][0] != rest[0]
    restored, again = _steps(s, restored, batches[2:])
    assert again == rest and first[0] > rest[-1]
    for k, v in _flat(jax.device_get(restored["params"])).items():
        np.testing.assert_array_equal(v, p4[k])


@pytest.mark.parametrize("qtype,storage", [("nf4", "uint4"), ("int8", "int8")])
def test_qlora_runs_and_learns(qtype, storage):
    """Adapters on a quantized LLM learn a token sequence (AdamW on the trainable part only)."""
    import optax
    cfg = _small()
    model = lora.build_model(cfg.replace(lora=LoraConfig(rank=4, alpha=8.0, base_dtype=qtype)), 0)
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    q = params["model"]["layers"]["mlp"]["gate_proj"]
    assert "kernel" not in q and q["kernel_qvalue"].dtype == jnp.dtype(storage)
    train = lora.trainable_part(params, model.cfg.lora)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, cfg.llm.vocab_size, (2, 16)))
    mask = jnp.ones(ids.shape, bool)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)

    def loss(t):
        m = nnx.merge(graphdef, lora.merge_parts(params, t))
        h, _, _ = m.decode(m.model.embed_tokens(ids), {"position_ids": pos, "attention_mask": mask}, None)
        logp = jax.nn.log_softmax(m.logits(h)[:, :-1].astype(jnp.float32))
        return -jnp.take_along_axis(logp, ids[:, 1:, None], -1).mean()

    tx = optax.adamw(1e-2)

    @jax.jit
    def step(t, o):
        val, g = jax.value_and_grad(loss)(t)
        u, o = tx.update(g, o, t)
        return optax.apply_updates(t, u), o, val

    opt = tx.init(train)
    losses = []
    for _ in range(12):
        train, opt, val = step(train, opt)
        losses.append(float(val))
    assert losses[-1] < 0.7 * losses[0], losses


# ----------------------------------------------------------------------------- PyTorch / peft


def _hf_llm(family):
    import torch
    import transformers
    from test_backbones import LLM_CASES, _randomize
    _, cfg_cls, model_cls, extra = LLM_CASES["phi3_longrope" if family == "phi3" else "llama3_gqa"]
    hf_cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, attn_implementation="eager", **extra)
    torch.manual_seed(0)
    hf = model_cls(hf_cfg).eval()
    _randomize(hf)
    assert isinstance(hf, transformers.PreTrainedModel)
    return hf, hf_cfg


@pytest.mark.parametrize("family", ["phi3", "llama"])
def test_to_peft_loads_with_peft_and_matches(tmp_path, family):
    import peft
    import torch
    from safetensors.numpy import load_file
    from test_backbones import _llm_logits, _state

    from fusion_jax.config import llm_config_from_hf
    from fusion_jax.convert.__main__ import main
    from fusion_jax.hf_io import DictReader, load_weights
    hf, hf_cfg = _hf_llm(family)
    cfg = dataclasses.replace(tiny_config(family), llm=llm_config_from_hf(hf_cfg.to_dict(), family))
    base = FusionForCausalLM(cfg, rngs=nnx.Rngs(1))
    load_weights(base, DictReader(_state(hf)), select=lambda r: not r.hf.startswith(
        ("model.vision_tower", "model.mm_projector", "model.aux_projector", "model.vision_sampler")))
    base_dir = _write_folder(tmp_path / "base", cfg, nnx.split(base)[1].to_pure_dict())
    lc = LoraConfig(rank=4, alpha=12.0, base_dtype="float32", base=base_dir)
    model = lora.build_model(cfg.replace(lora=lc), 2, nnx.split(base)[1].to_pure_dict())
    _randomize_adapters(model)
    params = nnx.split(model)[1].to_pure_dict()
    adapters = _write_folder(tmp_path / "adapters", model.cfg, lora.trainable_part(params, lc))
    assert main(["to-peft", "--adapters", adapters, "--dst", str(tmp_path / "peft")]) == 0

    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "peft")).eval()
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 24))
    with torch.no_grad():
        want = peft_model(torch.as_tensor(ids)).logits.numpy()
    got = _llm_logits(model, ids)
    assert np.abs(got - want).max() <= 1e-4
    assert np.abs(got - _llm_logits(base, ids)).max() > 1e-2   # the adapters matter
    # non_lora_trainables: the reference's key layout, the .bin (torch.load) equal to the safetensors twin
    twin = load_file(str(tmp_path / "peft" / "non_lora_trainables.safetensors"))
    binf = torch.load(str(tmp_path / "peft" / "non_lora_trainables.bin"), weights_only=True)
    assert sorted(twin) == sorted(binf) and "base_model.model.model.mm_projector.0.weight" in twin
    for k, v in twin.items():
        np.testing.assert_array_equal(binf[k].numpy(), v)
    np.testing.assert_array_equal(twin["base_model.model.model.mm_projector.0.weight"],
                                  np.asarray(base.model.mm_projector.linear_0.kernel[...]).T)


def test_merge_lora_and_loading_adapters_with_base(tmp_path):
    import fusion_jax
    from fusion_jax.convert.__main__ import main
    from fusion_jax.generate.cli import add_generation_args
    from fusion_jax.generate.loading import load_model
    cfg = _small("phi3")
    base = FusionForCausalLM(cfg, seed=0)
    base_params = nnx.split(base)[1].to_pure_dict()
    base_dir = _write_folder(tmp_path / "base", cfg, base_params)
    lc = LoraConfig(rank=4, alpha=8.0, base_dtype="float32", base=str(tmp_path / "moved"))
    model = lora.build_model(cfg.replace(lora=lc), 0, base_params)
    _randomize_adapters(model)
    adapters = _write_folder(tmp_path / "adapters", model.cfg,
                             lora.trainable_part(nnx.split(model)[1].to_pure_dict(), lc))
    batch = random_batch(cfg, seq_len=96)
    want = _logits(model, batch)
    with pytest.raises(FileNotFoundError, match="--base"):   # the recorded base has moved
        fusion_jax.from_pretrained(adapters)
    got = fusion_jax.from_pretrained(adapters, base=base_dir)
    np.testing.assert_array_equal(_logits(got, batch), want)
    assert main(["merge-lora", "--base", base_dir, "--adapters", adapters, "--dst", str(tmp_path / "merged")]) == 0
    merged = fusion_jax.from_pretrained(str(tmp_path / "merged"))
    assert merged.cfg.lora is None
    assert not any("lora" in k for k in _flat(nnx.split(merged)[1].to_pure_dict()))
    assert np.abs(_logits(merged, batch) - want).max() <= 1e-5   # merged == adapters (float32)
    assert np.abs(_logits(merged, batch) - _logits(base, batch)).max() > 1e-2
    assert main(["to-hf", "--src", str(tmp_path / "merged"), "--dst", str(tmp_path / "hf")]) == 0
    assert os.path.isfile(tmp_path / "hf" / "model.safetensors")
    import argparse
    ap = argparse.ArgumentParser()
    add_generation_args(ap)
    a = ap.parse_args(["--ckpt", adapters, "--base", base_dir])
    np.testing.assert_array_equal(_logits(load_model(a.ckpt, base=a.base), batch), want)
