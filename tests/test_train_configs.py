"""The 3B/8B stage configs build abstract params whose counts match the reference architecture;
the tiny ablation and diagnostic configs are tiny.py plus exactly their named keys."""
from __future__ import annotations

import glob
import importlib.util
import json
import os

import jax
import numpy as np
import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


def load_config(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def expected_params(vocab, D, inter, layers, heads, kv_heads, vis):
    """Independent count: LLM (untied) + SigLIP (depth-1 layers + post LN) + projectors + CARD."""
    hd = D // heads
    llm_layer = D * (heads + 2 * kv_heads) * hd + heads * hd * D + 3 * D * inter + 2 * D
    llm = 2 * vocab * D + layers * llm_layer + D
    Dv, Iv, Lv, p, n_pos = vis
    vis_layer = 4 * (Dv * Dv + Dv) + (Dv * Iv + Iv) + (Iv * Dv + Dv) + 4 * Dv
    tower = (3 * p * p * Dv + Dv) + n_pos * Dv + (Lv - 1) * vis_layer + 2 * Dv
    mm = (3 * Dv * D + D) + (D * D + D)
    aux = (D * Dv + Dv) + (Dv * Dv + Dv)
    card = 10 * (9 * D * D + 8 * D)
    return llm + tower + mm + aux + card


SO400M = (1152, 4304, 27, 14, 729)
GIANT = (1536, 6144, 40, 16, 576)
CASES = {
    "fusion_3b_phi35_stage1": expected_params(32013, 3072, 8192, 32, 32, 32, SO400M),
    "fusion_8b_llama31_stage2": expected_params(128258, 4096, 14336, 32, 32, 8, SO400M),
    "fusion_x_3b_phi35_stage1_5": expected_params(32013, 3072, 8192, 32, 32, 32, GIANT),
    "fusion_x_8b_llama31_stage1": expected_params(128258, 4096, 14336, 32, 32, 8, GIANT),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_abstract_param_count(name):
    from flax import nnx

    from fusion_jax.train import loop
    from fusion_jax.train.step import abstract_model
    tc = load_config(name)
    cfg = loop.resolve_model_config(tc, None)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_model(cfg))))
    print(f"{name}: {n:,} params (formula {CASES[name]:,})")
    assert n == CASES[name]


@pytest.mark.parametrize("name", ["fusion_3b_phi35_stage1", "fusion_3b_phi35_stage1_5", "fusion_3b_phi35_stage2",
                                  "fusion_8b_llama31_stage1", "fusion_8b_llama31_stage1_5",
                                  "fusion_8b_llama31_stage2"])
def test_recipe(name):
    tc = load_config(name)
    stage = name.rsplit("_", 1)[-1] if not name.endswith("1_5") else "1_5"
    lr, vlr, gb, L = {"stage1": (2e-5, None, 256, 2048), "1_5": (2e-5, 2e-6, 128, 4096),
                      "stage2": (1e-5, 1e-6, 128, 4096)}[stage]
    assert (tc.optim.lr, tc.optim.vision_lr, tc.global_batch_size, tc.data.max_length) == (lr, vlr, gb, L)
    assert tc.optim.weight_decay == 0.0 and tc.optim.warmup_ratio == 0.03 and tc.optim.schedule == "cosine"
    assert tc.model.compute_dtype == "bfloat16" and tc.model.param_dtype == "float32"
    for k in ("total_steps", "log_every", "checkpoint_every", "init_from", "mesh", "seed"):
        assert k in tc


def test_schedule_matches_hf():
    from fusion_jax.train.optim import make_schedule
    s = make_schedule(1.0, 100, 0.03)
    import math
    assert float(s(0)) == 0.0 and abs(float(s(3)) - 1.0) < 1e-7
    for t in (10, 50, 99):
        hf = 0.5 * (1 + math.cos(math.pi * (t - 3) / 97))
        assert abs(float(s(t)) - hf) < 1e-6


STAGE_CONFIGS = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "configs", "fusion_*.py")))


@pytest.mark.parametrize("name", STAGE_CONFIGS)
def test_stage_configs_hold_no_demo_keys(name):
    """Synthesis, warm-up and the held-out summary are the tiny demo's; a pod run never sees them."""
    flat = _flat(json.loads(load_config(name).to_json()))
    demo = [k for k in flat if k.startswith(("data.synth", "vision_warmup", "heldout_eval"))
            or k == "data.tokenizer_vocab_size"]
    assert not demo, demo
    assert {"data.synth.num", "vision_warmup.steps", "heldout_eval.batch_size"} <= set(_flat(json.loads(
        load_config("tiny").to_json())))


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
    return out


TINY_SWITCHES = {
    "tiny_no_tune": {"model.use_tune": False},
    "tiny_no_card": {"model.use_card": False},
    "tiny_no_dsm": {"model.use_dsm": False},
}


def test_tiny_configs_differ_from_tiny_only_by_their_switches():
    """Each configs/tiny_*.py is configs/tiny.py plus exactly the keys it names (docs/ablations.md)."""
    from fusion_jax.train import loop

    def flat(name):
        tc = load_config(name)
        loop.validate(tc)
        return _flat(json.loads(tc.to_json()))

    names = sorted(os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "configs", "tiny_*.py")))
    assert names == sorted(TINY_SWITCHES)
    base = flat("tiny")
    for name, diff in TINY_SWITCHES.items():
        got = flat(name)
        assert got.keys() == base.keys(), name
        assert {k: v for k, v in got.items() if base[k] != v} == diff, name
