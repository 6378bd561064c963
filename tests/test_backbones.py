"""Backbone parity against `transformers` PyTorch models built from tiny random configs (1e-5)."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from fusion_jax.config import llm_config_from_hf, tiny_config, vision_config_from_hf
from fusion_jax.hf_io import DictReader, load_weights
from fusion_jax.model import FusionForCausalLM

transformers = pytest.importorskip("transformers")
TOL = 1e-5


def _state(module):
    return {k: v.detach().numpy().copy() for k, v in module.state_dict().items()}


def _randomize(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / max(p.shape[-1], 1) ** 0.5)


def _llm_logits(model, ids):
    B, S = ids.shape
    m = model.model
    batch = {"position_ids": jnp.broadcast_to(jnp.arange(S), (B, S)),
             "attention_mask": jnp.ones((B, S), bool)}
    x = m.embed_tokens(jnp.asarray(ids))
    h, _, _ = model.decode(x, batch, None)
    return np.asarray(model.logits(h))


LLM_CASES = {
    "phi3_longrope": ("phi3", transformers.Phi3Config, transformers.Phi3ForCausalLM, dict(
        num_key_value_heads=4, max_position_embeddings=131072, original_max_position_embeddings=4096,
        rope_scaling={"type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0],
                      "long_factor": [1.0, 1.2, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0]})),
    "llama3_gqa": ("llama", transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        num_key_value_heads=2, max_position_embeddings=2048,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2": ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_tied": ("qwen2", transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        num_key_value_heads=2, tie_word_embeddings=True)),
}


@pytest.mark.parametrize("case", sorted(LLM_CASES))
def test_llm_matches_transformers(case):
    family, cfg_cls, model_cls, extra = LLM_CASES[case]
    hf_cfg = cfg_cls(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                     num_attention_heads=4, rms_norm_eps=1e-5, pad_token_id=0, bos_token_id=1,
                     eos_token_id=2, attn_implementation="eager", **extra)
    torch.manual_seed(0)
    hf = model_cls(hf_cfg).eval()
    _randomize(hf)
    llm = llm_config_from_hf(hf_cfg.to_dict(), family)
    cfg = dataclasses.replace(tiny_config(family), llm=llm)
    ours = FusionForCausalLM(cfg, rngs=nnx.Rngs(1))
    load_weights(ours, DictReader(_state(hf)), select=lambda r: not r.hf.startswith(
        ("model.vision_tower", "model.mm_projector", "model.aux_projector", "model.vision_sampler")))
    ids = np.random.default_rng(0).integers(3, 96, size=(2, 40))
    with torch.no_grad():
        want = hf(torch.as_tensor(ids)).logits.numpy()
    got = _llm_logits(ours, ids)
    assert np.abs(got - want).max() < TOL


def test_phi3_longrope_switches_to_long_factors():
    """Past original_max_position_embeddings the long factors apply, as in HF's dynamic longrope."""
    from fusion_jax.llm import rope_cos_sin, rope_params
    llm = llm_config_from_hf(transformers.Phi3Config(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
        original_max_position_embeddings=32,
        rope_scaling={"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [4.0] * 8},
    ).to_dict(), "phi3")
    short, long, switch, _ = rope_params(llm)
    assert switch == 32
    cos_s, _ = rope_cos_sin(llm, jnp.arange(16)[None], jnp.float32)
    cos_l, _ = rope_cos_sin(llm, jnp.arange(40)[None], jnp.float32)
    assert np.abs(np.asarray(cos_s) - np.asarray(cos_l)[:, :16]).max() > 1e-3


def test_siglip_hidden_states_match_transformers():
    vcfg = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                           num_hidden_layers=5, image_size=32, patch_size=4,
                                           vision_use_head=False, attn_implementation="eager")
    hf = transformers.SiglipVisionModel(vcfg).eval()
    _randomize(hf, seed=3)
    cfg = tiny_config("phi3", vision=vision_config_from_hf(vcfg.to_dict()))
    ours = FusionForCausalLM(cfg, rngs=nnx.Rngs(1))
    # transformers 5 drops the `vision_model.` prefix in the module tree; checkpoints keep it
    tensors = {"model.vision_tower.vision_tower.vision_model." + k.removeprefix("vision_model."): v
               for k, v in _state(hf).items()}
    load_weights(ours, DictReader(tensors), select=lambda r: r.hf.startswith("model.vision_tower"))
    px = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = hf(torch.as_tensor(px), output_hidden_states=True).hidden_states
    _, _, hs = ours.model.vision_tower(jnp.asarray(px), return_hidden=True)
    hs = np.asarray(hs)
    assert hs.shape[0] == len(want) - 1  # the reference drops the last layer
    for i in range(hs.shape[0]):
        assert np.abs(hs[i] - want[i].numpy()).max() < TOL, i
