"""Training: mesh agreement, gradient accumulation, freezing, NaN guard, exact resume, configs."""
from __future__ import annotations

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.config import tiny_config
from fusion_jax.layout import build_layout
from fusion_jax.sharding import make_mesh
from fusion_jax.train import loop, presets

# No persistent compilation cache: XLA:CPU aborted executing a cached sharded step after
# another test compiled for a different device subset (seen with jax 0.10.2).


def _tc(**kw):
    tc = presets.tiny_train_config()
    with tc.unlocked():
        tc.total_steps = 10
        tc.global_batch_size = 8
        tc.optim.lr = 1e-2
        tc.optim.warmup_ratio = 0.1
        tc.model.query_len = "4"
        for k, v in kw.items():
            node = tc
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return tc


def _cfg():
    """Smaller than tiny_config (compile time dominates on 2 cores): 2 decoder, 2 vision layers."""
    import dataclasses
    c = tiny_config("phi3", query_len=(4,), max_length=96, num_sampler_layers=1)
    return c.replace(llm=dataclasses.replace(c.llm, num_hidden_layers=2),
                     vision=dataclasses.replace(c.vision, num_hidden_layers=3, image_size=16))


def _batch(B=8, S=96, seed=0):
    rng = np.random.default_rng(seed)
    ids, lab, ins = [], [], []
    for b in range(B):
        n1, n2 = 5 + b % 4, 10 + 2 * (b % 3)
        x = np.concatenate([[1], rng.integers(3, 250, n1), [-200], rng.integers(3, 250, n2)])
        y = np.where(np.arange(len(x)) > n1 + 4, x, -100)
        y[n1 + 3] = -400
        ids.append(x), lab.append(y), ins.append(rng.integers(3, 250, 3 + b % 5))
    out = build_layout(ids, lab, ins, num_image_tokens=16, query_len=4, max_questions=2, seq_len=S,
                       instruct_len=16)
    out["images"] = rng.standard_normal((B, 5, 3, 16, 16)).astype(np.float32)
    return out


def _run(setup, batches):
    from fusion_jax.train.data import to_device_batch
    state = setup.init_state()
    losses = []
    for b in batches:
        state, m = setup.train_step(state, to_device_batch(b, setup.mesh))
        losses.append(float(m["loss"]))
    return state, losses


@pytest.fixture(scope="module")
def single():
    return loop.Setup(_tc(mesh=(1, 1, 1)), None, mesh=make_mesh((1, 1, 1), jax.devices()[:1]), model_cfg=_cfg())


def test_mesh_2x2x2_matches_single_device(single):
    batches = [_batch(seed=i) for i in range(3)]
    s1, l1 = _run(single, batches)
    s8 = loop.Setup(_tc(mesh=(2, 2, 2)), None, model_cfg=_cfg())
    assert dict(s8.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    sharded = [x for x in jax.tree.leaves(s8.param_sharding) if any(a is not None for a in x.spec)]
    assert sharded, "no parameter is sharded on the 2x2x2 mesh"
    s2, l2 = _run(s8, batches)
    np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        # Adam's normalised update magnifies 1e-7 gradient differences on near-zero gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_grad_accumulation_equals_big_batch(single):
    b = _batch(seed=3)
    s1, l1 = _run(single, [b])
    acc = loop.Setup(_tc(mesh=(1, 1, 1), grad_accum=4), None, mesh=single.mesh, model_cfg=_cfg())
    s4, l4 = _run(acc, [b])
    np.testing.assert_allclose(l1, l4, rtol=1e-6, atol=1e-6)
    for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s4)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


def test_frozen_parameters_bit_identical():
    pat = "^model/vision_tower/,^model/aux_projector/"
    s = loop.Setup(_tc(mesh=(1, 1, 1), **{"optim.freeze": pat}), None,
                   mesh=make_mesh((1, 1, 1), jax.devices()[:1]), model_cfg=_cfg())
    init = jax.tree.map(np.asarray, s.init_params())
    state, _ = _run(s, [_batch(seed=i) for i in range(2)])
    flat0 = jax.tree_util.tree_flatten_with_path(init)[0]
    flat1 = jax.tree.leaves(state["params"])
    n_frozen = n_moved = 0
    for (path, a), b in zip(flat0, flat1):
        name = "/".join(k.key for k in path)
        if name.startswith(("model/vision_tower/", "model/aux_projector/")):
            assert np.array_equal(a, np.asarray(b)), name
            n_frozen += 1
        elif not np.array_equal(a, np.asarray(b)):
            n_moved += 1
    assert n_frozen > 10 and n_moved > 10
    with pytest.raises(ValueError, match="config.freeze"):
        loop.Setup(_tc(**{"optim.freeze": "^nothing_matches$"}), None, mesh=s.mesh, model_cfg=_cfg())


def test_nonfinite_loss_keeps_state(single):
    from fusion_jax.train.data import to_device_batch
    state = single.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    b = _batch(seed=5)
    b["images"][0, 4, 0, 0, 0] = np.nan
    state, m = single.train_step(state, to_device_batch(b, single.mesh))
    assert not bool(m["finite"])
    for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"])):
        assert np.array_equal(a, np.asarray(c))


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config\.log_every"):
        loop.validate(_tc(log_every=0))
    with pytest.raises(ValueError, match=r"config\.model\.remat_policy"):
        loop.validate(_tc(**{"model.remat_policy": "sometimes"}))
    with pytest.raises(ValueError, match=r"config\.model\.tiny\.embed_init_std"):
        loop.validate(_tc(**{"model.tiny.embed_init_std": 0.0}))
    with pytest.raises(ValueError, match=r"config\.model\.tiny\.embed_init_std"):
        loop.validate(_tc(**{"model.tiny.embed_init_std": None}))
    with pytest.raises(ValueError, match=r"config\.model\.image_token_grid"):
        loop.validate(_tc(**{"model.image_token_grid": -1}))
    for bad in (-0.5, float("nan")):
        with pytest.raises(ValueError, match=r"config\.model\.ce_turn_power"):
            loop.validate(_tc(**{"model.ce_turn_power": bad}))
    assert loop.model_overrides(_tc(**{"model.ce_turn_power": 1}))["ce_turn_power"] == 1.0
    with pytest.raises(ValueError, match=r"config\.global_batch_size"):
        loop.Setup(_tc(global_batch_size=6, grad_accum=4), None, mesh=make_mesh((1, 1, 1), jax.devices()[:1]),
                   model_cfg=_cfg())


def test_stopper_catches_sigterm():
    with loop._Stopper() as s:
        os.kill(os.getpid(), signal.SIGTERM)
        assert s.signum == signal.SIGTERM


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_exact_resume_and_load_params(tmp_path):
    kw = {"total_steps": 6, "checkpoint_every": 3, "log_every": 1, "keep_checkpoints": 2,
          "data.synth_num": 80, "data.synth_workers": 1, "data.synth_image_size": 32,
          "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 128, "model.tiny.num_hidden_layers": 2,
          "model.tiny.vision_hidden_size": 32, "model.tiny.vision_intermediate_size": 64,
          "model.tiny.vision_layers": 3, "model.tiny.num_sampler_layers": 1, "model.tiny.image_size": 16,
          "data.max_length": 128, "data.seq_buckets": (128,), "data.max_questions": 2,
          "vision_warmup.steps": 3}   # the resumed run must not warm up again
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    loop.train(_tc(**kw), full)
    r = loop.train(_tc(stop_after=4, **kw), part)   # interrupted after step 4 (checkpoint at 4)
    assert r["stopped"] == "stop_after" and r["step"] == 4
    loop.train(_tc(**kw), part)                      # same command again: resumes at 4
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for k in a:
        for key in ("loss", "ce_loss", "dsm_loss", "grad_norm", "lr"):
            assert abs(a[k][key] - b[k][key]) <= 1e-6, (k, key, a[k][key], b[k][key])
        assert {"step", "loss", "ce_loss", "dsm_loss", "lr", "grad_norm", "tokens_per_s"} <= set(a[k])
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(full, "tensorboard"))
    # the evaluation entry point
    from fusion_jax.train.checkpoint import load_params
    model, cfg, tok = load_params(full)
    assert cfg.llm.hidden_size == 64 and os.path.isfile(os.path.join(tok, "tokenizer.json"))
    # the step dir is also a converted Orbax folder for fusion_jax.from_pretrained
    import fusion_jax
    from fusion_jax.train.checkpoint import restore_params_tree  # noqa: F401
    m2 = fusion_jax.from_pretrained(os.path.join(full, "checkpoints", "6"))
    np.testing.assert_array_equal(np.asarray(m2.lm_head.kernel[...]), np.asarray(model.lm_head.kernel[...]))


def test_image_token_grid_reaches_the_model():
    tc = presets.tiny_train_config()
    assert loop.resolve_model_config(tc, 384).num_image_tokens == 64      # 0: the tower's 8 x 8
    tc.model.image_token_grid = 4
    cfg = loop.resolve_model_config(tc, 384)
    assert (cfg.image_token_grid, cfg.num_image_tokens) == (4, 16)


def test_embed_init_std_reaches_the_model():
    """Tiny recipe starts word embeddings at std 1 (the scale of image features); HF's 0.02 stays
    the default everywhere else. Weights loaded from a checkpoint are unaffected (init only)."""
    from fusion_jax.config import FusionConfig
    from fusion_jax.model import FusionForCausalLM
    assert FusionConfig().embed_init_std == 0.02
    tc = presets.tiny_train_config()
    assert presets.tiny_model_config(tc, 384).embed_init_std == 1.0
    for std in (0.02, 1.0):
        w = FusionForCausalLM(_cfg().replace(embed_init_std=std)).model.embed_tokens.weight[...]
        assert abs(float(jnp.std(w)) / std - 1) < 0.05
    # a saved config without the field (older runs) loads with the default
    d = _cfg().to_dict()
    d.pop("embed_init_std")
    assert FusionConfig.from_dict(d).embed_init_std == 0.02
    with pytest.raises(ValueError, match="embed_init_std"):
        _cfg().replace(embed_init_std=0.0)


def test_synth_tokenizer_learns_the_template_system_message(tmp_path):
    """Every sample starts with the template's system message: the BPE is trained on it too, so it
    costs whole-word tokens (not ~24 byte-level pieces of a 184-token prompt budget)."""
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.train.data import train_tokenizer
    os.makedirs(tmp_path / "data" / "train")
    recs = [{"id": str(i), "image": "x.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat color is the circle?"}, {"from": "gpt", "value": c}]}
        for i, c in enumerate(["yellow", "blue", "red", "green"] * 20)]
    (tmp_path / "data" / "train" / "synth_color.json").write_text(json.dumps(recs))
    system = "You are a helpful AI assistant."
    n = {}
    for tmpl in (None, "phi_3"):
        out = train_tokenizer(str(tmp_path / "data"), str(tmp_path / f"tok_{tmpl}"), 512, tmpl)
        tok = load_tokenizer(out)
        n[tmpl] = len(tok(system)) - 1  # without <s>
        assert len(tok("yellow")) - 1 == 1
    assert n["phi_3"] <= 7 < 15 < n[None], n



def test_llm_warmup_trains_the_decoder_on_captions_only(tmp_path):
    """The tiny recipe's decoder warm start: caption LM loss falls, the vision tower and the
    interaction layers come back unchanged, deterministic; misuse is a config error naming the key."""
    from flax import nnx

    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.synth import generate_dataset
    from fusion_jax.train.data import train_tokenizer
    from fusion_jax.train.llm_warmup import caption_batches, warm_start_llm
    from fusion_jax.train.step import build_model
    data = str(tmp_path / "data")
    generate_dataset(data, 40, seed=2, image_size=32, difficulty="easy", heldout_fraction=0.1)
    tok = load_tokenizer(train_tokenizer(data, str(tmp_path / "tok"), vocab_size=400))
    ids, mask, cut = caption_batches(["a red circle is on the left.", "x " * 50], tok, 16)
    assert ids.shape == mask.shape == (2, 16) and mask[1].all() and 0 < mask[0].sum() < 16 and cut == 1
    assert list(ids[0, :mask[0].sum()]) == list(tok("a red circle is on the left."))
    import dataclasses
    cfg = _cfg()
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=tok.vocab_size))
    p0 = jax.tree.map(np.asarray, nnx.split(build_model(cfg, 0))[1].to_pure_dict())
    kw = dict(steps=30, lr=3e-3, batch_size=4, seq_len=48, seed=0, log=lambda m: None)
    a, st = warm_start_llm(cfg, p0, data, tok, **kw)
    b, _ = warm_start_llm(cfg, p0, data, tok, **kw)
    assert st["loss_last"] < 0.8 * st["loss_first"] and st["captions"] == 36 and st["skipped"] == 0, st
    assert jax.tree.structure(a) == jax.tree.structure(p0)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    for name in ("vision_tower", "vision_sampler_layers", "mm_projector"):
        for x, z in zip(jax.tree.leaves(a["model"][name]), jax.tree.leaves(p0["model"][name])):
            np.testing.assert_array_equal(x, z)
    for name in ("embed_tokens", "layers"):
        assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a["model"][name]),
                                                            jax.tree.leaves(p0["model"][name])))
    with pytest.raises(ValueError, match=r"config\.llm_warmup\.steps"):
        loop.validate(_tc(**{"llm_warmup.steps": 5, "vision_warmup.steps": 0, "data.source": "path",
                             "data.path": data, "data.tokenizer": data}))
    with pytest.raises(ValueError, match=r"config\.llm_warmup\.seq_len"):
        loop.validate(_tc(**{"llm_warmup.steps": 5, "llm_warmup.seq_len": 2, "data.source": "synth"}))

def test_vision_warmup_learns_object_tags_and_touches_only_the_tower(tmp_path):
    """The tiny recipe's tower warm start: labels from the synthesized descriptions, loss falls,
    same tree back, deterministic; misuse is a config error naming the key."""
    from fusion_jax.synth import generate_dataset
    from fusion_jax.train.tower_warmup import read_scenes, tag_targets, warm_start_tower
    data = str(tmp_path / "data")
    generate_dataset(data, 60, seed=1, image_size=32, difficulty="easy", heldout_fraction=0.1)
    rows = read_scenes(data)
    tg = tag_targets(rows, 4)
    assert tg["shapes"] == ["circle", "square", "triangle"]
    assert tg["patch"].shape == tg["shape"].shape == tg["word"].shape
    i = next(i for i, r in enumerate(rows) if r["scene"]["objects"])
    o = rows[i]["scene"]["objects"][0]
    assert tg["patch"][i, 0] == min(int(o["y"] * 4), 3) * 4 + min(int(o["x"] * 4), 3)
    # every object is one slot with shape and colour, every text item one slot with its word
    obj = tg["shape"] >= 0
    assert (obj == (tg["color"] >= 0)).all() and not (obj & (tg["word"] >= 0)).any()
    assert obj.sum() == sum(len(r["scene"]["objects"]) for r in rows)
    i = next(i for i, r in enumerate(rows) if r["scene"]["texts"])
    t = rows[i]["scene"]["texts"][0]
    j = len(rows[i]["scene"]["objects"])
    assert tg["words"][tg["word"][i, j]] == t["text"]
    assert tg["patch"][i, j] == min(int((t["y0"] + t["y1"]) / 2 * 4), 3) * 4 + min(int((t["x0"] + t["x1"]) / 2 * 4), 3)

    from flax import nnx

    from fusion_jax.model import FusionForCausalLM
    cfg = _cfg()
    tower0 = jax.tree.map(np.asarray, nnx.state(FusionForCausalLM(cfg).model.vision_tower, nnx.Param).to_pure_dict())
    kw = dict(steps=60, lr=3e-3, batch_size=8, seed=0, text_images=24, image_size=32, difficulty="easy",
              log=lambda m: None)
    a, st = warm_start_tower(cfg, data, tower0, **kw)
    b, _ = warm_start_tower(cfg, data, tower0, **kw)
    assert st["loss_last"] < 0.8 * st["loss_first"], st
    assert st["text_images"] == 24 and st["images"] == len(rows) and len(st["words"]) > 3, st
    assert jax.tree.structure(a) == jax.tree.structure(tower0)
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(tower0)):
        assert x.shape == z.shape
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(tower0)))
    # region targets (vision_warmup.region_bands): per shape then colour, column bands then row bands
    from fusion_jax.train.tower_warmup import region_targets
    one = [{"scene": {"objects": [{"shape": "square", "color": "red", "x": 0.9, "y": 0.1}]}}]
    r = region_targets(one, ["circle", "square"], ["blue", "red"], 3).reshape(4, 2, 3)
    assert r.sum() == 4 and r[1, 0, 2] == r[1, 1, 0] == r[3, 0, 2] == r[3, 1, 0] == 1
    c, st2 = warm_start_tower(cfg, data, tower0, **{**kw, "region_bands": 2, "region_weight": 3.0})
    assert st2["region_bands"] == 2 and st2["region_weight"] == 3.0 and 0.0 <= st2["region_acc_last"] <= 1.0
    assert st2["loss_last"] < 0.8 * st2["loss_first"], st2
    assert jax.tree.structure(c) == jax.tree.structure(tower0)

    # side tags (vision_warmup.side_tags): each object's half on both axes, background patches "none"
    from fusion_jax.train.tower_warmup import BACKGROUND_SLOTS
    scene = {"objects": [{"shape": "circle", "color": "red", "x": 0.2, "y": 0.8, "r": 0.1},
                         {"shape": "square", "color": "blue", "x": 0.52, "y": 0.3, "r": 0.1}],
             "texts": [{"text": "cat", "x0": 0.6, "x1": 0.9, "y0": 0.6, "y1": 0.7}]}
    ts = tag_targets([{"scene": scene}], 8, side_tags=True)
    assert ts["patch"].shape == (1, 3 + BACKGROUND_SLOTS)
    assert ts["side_x"][0, :3].tolist() == [0, -1, 2] and ts["side_y"][0, :3].tolist() == [1, 0, 2]
    bg = ts["patch"][0, 3:]
    assert (ts["side_x"][0, 3:] == 2).all() and (ts["shape"][0, 3:] == -1).all() and len(set(bg.tolist())) == 4
    for p in bg.tolist():  # clear of both discs and of the text box
        cy, cx = (p // 8 + 0.5) / 8, (p % 8 + 0.5) / 8
        assert all(np.hypot(cx - o["x"], cy - o["y"]) > o["r"] for o in scene["objects"])
        assert not (0.6 - 1 / 16 < cx < 0.9 + 1 / 16 and 0.6 - 1 / 16 < cy < 0.7 + 1 / 16)
    assert "side_x" not in tag_targets([{"scene": scene}], 8)  # off: the recipe's targets, unchanged
    d, st3 = warm_start_tower(cfg, data, tower0, **{**kw, "side_tags": True})
    assert st3["side_tags"] and 0.0 <= st3["side_acc_last"] <= 1.0 and st3["loss_last"] < 0.8 * st3["loss_first"], st3
    assert jax.tree.structure(d) == jax.tree.structure(tower0)
    bad_tc = _tc(**{"vision_warmup.steps": 5, "data.source": "synth"})
    with bad_tc.unlocked():  # ml_collections refuses a non-bool; a hand-built config may not
        del bad_tc.vision_warmup["side_tags"]
        bad_tc.vision_warmup.side_tags = "yes"
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.side_tags"):
        loop.validate(bad_tc)
    # dense tags (vision_warmup.dense_tags): every patch inside a disc, the topmost object where they overlap
    over = {"objects": [{"shape": "circle", "color": "red", "x": 0.3, "y": 0.3, "r": 0.2},
                        {"shape": "square", "color": "blue", "x": 0.45, "y": 0.3, "r": 0.1},
                        {"shape": "triangle", "color": "red", "x": 0.8, "y": 0.8, "r": 0.01}], "texts": []}
    dn = tag_targets([{"scene": over}], 8, side_tags=True, dense=True)
    owner = {}
    for p, s_, sx in zip(dn["patch"][0], dn["shape"][0], dn["side_x"][0]):
        if s_ >= 0:
            assert p not in owner and sx == (0 if dn["shapes"][s_] != "triangle" else 1)
            owner[int(p)] = dn["shapes"][s_]
    for p in range(64):
        cy, cx = (p // 8 + 0.5) / 8, (p % 8 + 0.5) / 8
        want = "square" if np.hypot(cx - 0.45, cy - 0.3) <= 0.1 else "circle" if np.hypot(cx - 0.3, cy - 0.3) <= 0.2 else None
        assert owner.get(p) == (want or ("triangle" if p == 6 * 8 + 6 else None)), p  # a tiny object keeps its centre patch
    assert tag_targets([{"scene": over}], 8, side_tags=True)["patch"][0, :3].tolist() == [2 * 8 + 2, 2 * 8 + 3, 6 * 8 + 6]
    with bad_tc.unlocked():
        del bad_tc.vision_warmup["side_tags"]
        bad_tc.vision_warmup.side_tags = True
        del bad_tc.vision_warmup["dense_tags"]
        bad_tc.vision_warmup.dense_tags = 1
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.dense_tags"):
        loop.validate(bad_tc)

    with pytest.raises(ValueError, match=r"train_scenes\.jsonl"):
        read_scenes(str(tmp_path))
    bad = tmp_path / "bad"
    (bad / "meta").mkdir(parents=True)
    for text, want in (('{"image": "a.png", "scene": {"objects": []}}\n', r"train_scenes\.jsonl:1 is not a scene record"),
                       ('\n{"image": "a.png"\n', r"train_scenes\.jsonl:2 is not JSON")):
        (bad / "meta" / "train_scenes.jsonl").write_text(text)
        with pytest.raises(ValueError, match=want):
            read_scenes(str(bad))
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.region_bands"):
        loop.validate(_tc(**{"vision_warmup.steps": 5, "vision_warmup.region_bands": -1, "data.source": "synth"}))
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.region_weight"):
        loop.validate(_tc(**{"vision_warmup.steps": 5, "vision_warmup.region_weight": 0.0, "data.source": "synth"}))
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.steps"):
        loop.validate(_tc(**{"vision_warmup.steps": 5, "data.source": "path", "data.path": data,
                             "data.tokenizer": data}))
