"""Tiny checkpoints for tests, the notebook and offline demos: a random tiny FUSION model
saved as a reference-style HF folder (weights.safetensors + config.json + vision_config.json)
with a small BPE tokenizer beside it."""
from __future__ import annotations

import dataclasses
import json
import os

import numpy as np


def tiny_model_and_tokenizer(folder: str, *, family: str = "phi3", seed: int = 0, **overrides):
    """Write a tokenizer folder at `folder` and return (model, tokenizer) sized to fit it."""
    from fusion_jax.config import tiny_config
    from fusion_jax.data.testing import make_tokenizer_folder
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.model import FusionForCausalLM
    make_tokenizer_folder(folder)
    tok = load_tokenizer(folder)
    cfg = tiny_config(family, **overrides)
    vocab = -(-tok.vocab_size // 64) * 64
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=vocab, eos_token_id=tok.eos_id,
                                              bos_token_id=tok.bos_id, pad_token_id=tok.pad_id))
    return FusionForCausalLM(cfg, seed=seed), tok


def state_dict(model) -> dict:
    """Our parameters in the reference's names and PyTorch layouts (numpy)."""
    from fusion_jax.hf_io import flat_state
    from fusion_jax.param_map import hf_shape, param_table, to_hf
    cfg = model.cfg
    ours = flat_state(model)
    out = {}
    for r in param_table(cfg):
        a = np.asarray(ours[r.ours].get_value())
        parts = list(a) if r.stack else [a]
        for name, p in zip(r.hf_names(), parts, strict=True):
            out[name] = np.ascontiguousarray(to_hf(p, r.transform, hf_shape(r, p.shape, cfg)))
    return out


def save_hf(model, folder: str) -> str:
    """Write `model` as a reference-style HF folder readable by `fusion_jax.from_pretrained`."""
    from safetensors.numpy import save_file

    from fusion_jax.convert.hf_export import synth_hf_config, vision_hf_config
    os.makedirs(folder, exist_ok=True)
    save_file(state_dict(model), os.path.join(folder, "weights.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(synth_hf_config(model.cfg), f, indent=2, sort_keys=True)
    with open(os.path.join(folder, "vision_config.json"), "w") as f:
        json.dump(vision_hf_config(model.cfg), f, indent=2, sort_keys=True)
    return folder


def write_tiny_checkpoint(folder: str, *, family: str = "phi3", seed: int = 0, **overrides):
    """Tokenizer + random tiny model as one HF folder; returns (folder, model, tokenizer)."""
    model, tok = tiny_model_and_tokenizer(folder, family=family, seed=seed, **overrides)
    save_hf(model, folder)
    return folder, model, tok
