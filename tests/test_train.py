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


def _shard(b, mesh):
    from fusion_jax.train.step import BATCH_KEYS
    return loop.shard_batch({k: b[k] for k in BATCH_KEYS}, mesh)


def _run(setup, batches):
    state = setup.init_state()
    losses = []
    for b in batches:
        state, m = setup.train_step(state, _shard(b, setup.mesh))
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
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"]), strict=True):
        # Adam's normalised update magnifies 1e-7 gradient differences on near-zero gradients
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-4)


def test_grad_accumulation_equals_big_batch(single):
    b = _batch(seed=3)
    s1, l1 = _run(single, [b])
    acc = loop.Setup(_tc(mesh=(1, 1, 1), grad_accum=4), None, mesh=single.mesh, model_cfg=_cfg())
    s4, l4 = _run(acc, [b])
    np.testing.assert_allclose(l1, l4, rtol=1e-6, atol=1e-6)
    for a, c in zip(jax.tree.leaves(s1), jax.tree.leaves(s4), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unroll,passes", [(False, 1), (True, 1), (False, 2)])
def test_grad_sinks_equal_summed_micro_batch_grads(unroll, passes):
    """Gradient accumulation through `grad_sinks` (train/step.py for grad_accum > 1): a scanned stack under
    remat, with one frozen leaf, gets the sum of the micro-batches' own gradients, with no second copy of
    the stack's gradients. Run once per forward (the decoder) the sums are bit-identical; run twice (the
    vision tower) each pass adds into the sum on its own, a float32 reassociation."""
    from flax import nnx

    from fusion_jax import nn

    class Net(nnx.Module):
        def __init__(self):
            self.layers = nn.scanned(nn.Linear(64, 64, stack=(3,), rngs=nnx.Rngs(0)))

        def __call__(self, x):
            def body(layer, h, _):
                return jnp.tanh(layer(h)), None
            for _ in range(passes):
                x, _ = nn.scan_layers(self.layers, body, x, unroll=unroll, remat_policy="full")
            return jnp.sum(x ** 2)

    net = Net()
    graphdef, params = nnx.split(net)
    params = nnx.to_pure_dict(params)
    kernel, bias = params["layers"]["kernel"], params["layers"]["bias"]   # bias: frozen
    xs = jax.random.normal(jax.random.PRNGKey(1), (4, 2, 64))
    assert list(nn.scanned_modules(net)) == [("layers",)]

    def loss(k, x):
        return nnx.merge(graphdef, {"layers": {"kernel": k, "bias": bias}})(x)

    want, grad = np.zeros(kernel.shape, np.float32), jax.jit(jax.grad(loss))
    for x in xs:   # float32 sums in the same order
        want = want + np.asarray(grad(kernel, x))

    @jax.jit
    def sunk(acc0):
        def micro(acc, x):
            def f(acc):
                model = nnx.merge(graphdef, {"layers": {"kernel": kernel, "bias": bias}})
                with nn.grad_sinks({id(model.layers): {"kernel": acc, "bias": None}}) as final:
                    out = model(x)
                return out, final[id(model.layers)]["kernel"]
            _, vjp = jax.vjp(f, acc)
            return vjp((jnp.float32(1.0), acc))[0], None
        return jax.lax.scan(micro, acc0, xs)[0]

    got = sunk(jnp.zeros_like(kernel))
    if passes == 1:
        np.testing.assert_array_equal(np.asarray(got), want)
    else:
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=1e-6)
    mem = sunk.lower(jnp.zeros_like(kernel)).compile().memory_analysis()
    assert mem.temp_size_in_bytes < kernel.nbytes, "the stack's gradient was materialised beside the sum"


def test_frozen_parameters_bit_identical():
    pat = "^model/vision_tower/,^model/aux_projector/"
    s = loop.Setup(_tc(mesh=(1, 1, 1), **{"optim.freeze": pat}), None,
                   mesh=make_mesh((1, 1, 1), jax.devices()[:1]), model_cfg=_cfg())
    init = jax.tree.map(np.asarray, s.init_params())
    state, _ = _run(s, [_batch(seed=i) for i in range(2)])
    flat0 = jax.tree_util.tree_flatten_with_path(init)[0]
    flat1 = jax.tree.leaves(state["params"])
    n_frozen = n_moved = 0
    for (path, a), b in zip(flat0, flat1, strict=True):
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
    state = single.init_state()
    before = jax.tree.map(np.asarray, state["params"])
    b = _batch(seed=5)
    b["images"][0, 4, 0, 0, 0] = np.nan
    state, m = single.train_step(state, _shard(b, single.mesh))
    assert not bool(m["finite"])
    for a, c in zip(jax.tree.leaves(before), jax.tree.leaves(state["params"]), strict=True):
        assert np.array_equal(a, np.asarray(c))


def test_host_offloaded_update_equals_the_update_in_device_memory():
    """optim.host_offload on: the update streamed one parameter at a time (train.streamed) gives the
    parameters and optimizer state of the whole-tree update, bit for bit, through frozen parameters,
    gradient accumulation and a non-finite step (kept state). The arithmetic is the same; XLA:CPU's
    code for a fused elementwise update can round an element 1 ulp apart from one program to another
    (on one device here, as eager against jitted optax does), so the mesh is the 2-device one."""
    batches = [_batch(seed=i) for i in range(3)]
    batches[1]["images"][0, 4, 0, 0, 0] = np.nan
    out = []
    for offload in ("off", "on"):
        s = loop.Setup(_tc(mesh=(1, 2, 1), grad_accum=2, **{"optim.host_offload": offload,
                                                            "optim.freeze": "^model/aux_projector/"}),
                       None, mesh=make_mesh((1, 2, 1), jax.devices()[:2]), model_cfg=_cfg())
        kinds = {x.memory_kind for x in jax.tree.leaves(s.state_sharding["opt_state"])}
        assert s.host_offload == (offload == "on") and kinds == {"pinned_host" if s.host_offload else "device"}
        state, losses = _run(s, batches)
        out.append((jax.tree_util.tree_flatten_with_path(jax.tree.map(np.asarray, state))[0], losses))
    (ref, l_ref), (got, l_got) = out
    assert np.isnan(l_got[1]) and l_got[0] == l_ref[0] and l_got[2] == l_ref[2]
    for (path, a), (_, b) in zip(ref, got, strict=True):
        assert np.array_equal(a, b), jax.tree_util.keystr(path)


def test_streamed_update_names_state_it_cannot_split():
    """An optimizer whose state has an array that mirrors no parameter cannot be streamed: a clear error."""
    import optax

    from fusion_jax.train.streamed import streamed_update
    params = {"w": jnp.ones((2, 3))}
    tx = optax.GradientTransformation(lambda p: {"ema": jnp.zeros((4,))}, lambda g, s, p=None: (g, s))
    rep = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"optim\.host_offload.*\['ema'\]"):
        streamed_update(tx, params, tx.init(params), params, {"w": False}, jnp.bool_(True), {"ema": rep})


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match=r"config\.log_every"):
        loop.validate(_tc(log_every=0))
    with pytest.raises(ValueError, match=r"config\.model\.remat_policy"):
        loop.validate(_tc(**{"model.remat_policy": "sometimes"}))
    with pytest.raises(ValueError, match=r"config\.model\.embed_init_std"):
        loop.validate(_tc(**{"model.embed_init_std": 0.0}))
    with pytest.raises(ValueError, match=r"config\.model\.embed_init_std"):
        loop.validate(_tc(**{"model.embed_init_std": None}))
    for bad in (-1, 0):
        with pytest.raises(ValueError, match=r"config\.model\.image_token_grid"):
            loop.validate(_tc(**{"model.image_token_grid": bad}))
    with pytest.raises(ValueError, match=r"config\.model\.linear_2d"):
        loop.Setup(_tc(), None, mesh=make_mesh((2, 1, 1), jax.devices()[:2]), model_cfg=_cfg().replace(linear_2d=True))
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
          "data.synth.num": 80, "data.synth.workers": 1, "data.synth.image_size": 32,
          "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 128, "model.tiny.num_hidden_layers": 2,
          "model.tiny.vision_hidden_size": 32, "model.tiny.vision_intermediate_size": 64,
          "model.tiny.vision_layers": 3, "model.num_sampler_layers": 1, "model.tiny.image_size": 16,
          "data.max_length": 128, "data.seq_buckets": (128,), "data.max_questions": 2,
          "vision_warmup.steps": 3, "vision_warmup.text_images": 16,   # the resumed run must not warm up again
          "model.linear_2d": False, "model.ce_skip_empty_chunks": False}   # 8 devices: the mesh forms
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    r = loop.train(_tc(**kw), full)   # with the tiny preset's held-out evaluation at the end
    assert r["heldout"]["overall"]["n"] == 8 and "chance" in r["heldout"]["per_category"]["color"]
    with open(os.path.join(full, "heldout_summary.json")) as f:
        assert json.load(f)["overall"] == r["heldout"]["overall"]
    assert len(open(os.path.join(full, "heldout_answers.jsonl")).readlines()) == 8
    r = loop.train(_tc(stop_after=4, **kw), part)   # interrupted after step 4 (checkpoint at 4)
    assert r["stopped"] == "stop_after" and r["step"] == 4 and "heldout" not in r
    loop.train(_tc(**kw), part)                      # same command again: resumes at 4
    a, b = _losses(full), _losses(part)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    for k in a:
        for key in ("loss", "ce_loss", "dsm_loss", "grad_norm", "lr"):
            assert abs(a[k][key] - b[k][key]) <= 1e-6, (k, key, a[k][key], b[k][key])
        assert {"step", "loss", "ce_loss", "dsm_loss", "lr", "grad_norm", "tokens_per_s"} <= set(a[k])
    assert sorted(os.listdir(os.path.join(full, "checkpoints"))) == ["3", "6"]
    with open(os.path.join(full, "fusion_config.json")) as f:
        assert json.load(f)["vision_remat_policy"] == "none"
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
    assert loop.resolve_model_config(tc, 384).num_image_tokens == 64      # None: the tower's 8 x 8
    tc.model.image_token_grid = 4
    cfg = loop.resolve_model_config(tc, 384)
    assert (cfg.image_token_grid, cfg.num_image_tokens) == (4, 16)


def test_model_keys_reach_the_model_config():
    """One route: every config.model key naming a FusionConfig field arrives as is (plus max_length)."""
    import dataclasses

    from fusion_jax.config import FusionConfig, parse_query_len
    tc = _tc(**{"model.vision_remat_policy": "full", "model.early_mask_mode": "intended"})
    cfg = loop.resolve_model_config(tc, 384)
    fields = {f.name for f in dataclasses.fields(FusionConfig)}
    for k in tc.model.keys():
        if k in fields:
            want = parse_query_len(tc.model[k]) if k == "query_len" else tc.model[k]
            assert getattr(cfg, k) == want, k
    assert (cfg.vision_remat_policy, cfg.early_mask_mode, cfg.max_length) == ("full", "intended", 192)
    assert (cfg.llm.hidden_size, cfg.vision.num_hidden_layers) == (128, 5)   # the sizes of model.tiny


def test_embed_init_std_reaches_the_model():
    """Tiny recipe starts word embeddings at std 1 (the scale of image features); HF's 0.02 stays
    the default everywhere else. Weights loaded from a checkpoint are unaffected (init only)."""
    from fusion_jax.config import FusionConfig
    from fusion_jax.model import FusionForCausalLM
    assert FusionConfig().embed_init_std == 0.02
    tc = presets.tiny_train_config()
    assert loop.resolve_model_config(tc, 384).embed_init_std == 1.0
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



def test_vision_warmup_learns_object_tags_and_touches_only_the_tower(tmp_path):
    """The tiny recipe's tower warm start: labels from the synthesized descriptions, loss falls,
    same tree back, deterministic; misuse is a config error naming the key."""
    from fusion_jax.train.tower_warmup import read_scenes, tag_targets, warm_start_tower
    synth = loop.SynthConfig(num=60, seed=1, image_size=32, difficulty="easy", heldout_fraction=0.1)
    _, data, _ = loop.prepare_synth(str(tmp_path), synth, template="phi_3", tokenizer_vocab_size=400,
                                    log=lambda m: None)
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
    for x, y, z in zip(jax.tree.leaves(a), jax.tree.leaves(b), jax.tree.leaves(tower0), strict=True):
        assert x.shape == z.shape
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(tower0), strict=True))

    with pytest.raises(ValueError, match=r"train_scenes\.jsonl"):
        read_scenes(str(tmp_path))
    bad = tmp_path / "bad"
    (bad / "meta").mkdir(parents=True)
    cases = (('{"image": "a.png", "scene": {"objects": []}}\n', r"train_scenes\.jsonl:1 is not a scene record"),
             ('\n{"image": "a.png"\n', r"train_scenes\.jsonl:2 is not JSON"))
    for text, want in cases:
        (bad / "meta" / "train_scenes.jsonl").write_text(text)
        with pytest.raises(ValueError, match=want):
            read_scenes(str(bad))
    with pytest.raises(ValueError, match=r"config\.vision_warmup\.steps"):
        loop.validate(_tc(**{"vision_warmup.steps": 5, "data.source": "path", "data.path": data,
                             "data.tokenizer": data}))
