"""Checkpoint conversion: HF <-> Orbax byte-exact round trips, stage-1 init, logits vs transformers."""
import json
import os

import jax
import numpy as np
import pytest

jax.config.update("jax_default_matmul_precision", "highest")
os.environ["FUSION_NO_PROGRESS"] = "1"

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fusion_jax  # noqa: E402
from fusion_jax.convert import orbax_io as oio  # noqa: E402
from fusion_jax.convert.__main__ import main as cli  # noqa: E402
from fusion_jax.convert.hf_export import to_hf, to_orbax  # noqa: E402
from fusion_jax.convert.init_stage1 import init_stage1  # noqa: E402
from fusion_jax.convert.st_io import CheckpointError, SafeReader  # noqa: E402
from fusion_jax.param_map import VT  # noqa: E402

ATOL = 1e-5
LLM_PREFIXES = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
TINY_FUSION = {"num_of_vision_sampler_layers": 2, "stride_of_vision_sampler_layers": 1,
               "sampler_heads": 4, "query_len": "16"}


def _bits(a):
    return a.dtype.str, a.shape, a.tobytes()


def assert_same_tensors(a_dir, b_dir):
    a, b = SafeReader(a_dir), SafeReader(b_dir)
    assert sorted(a.keys()) == sorted(b.keys())
    bad = [k for k in a.keys() if _bits(a.get(k)) != _bits(b.get(k))]
    assert not bad, f"tensors differ: {bad}"


# ----------------------------------------------------------------------------- golden

@pytest.fixture(scope="module")
def golden_orbax(golden_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("golden") / "orbax"
    to_orbax(str(golden_dir / "phi3_train"), str(d))
    return d


def test_golden_round_trip_byte_identical(golden_dir, golden_orbax, tmp_path):
    src = golden_dir / "phi3_train"
    out = tmp_path / "hf"
    to_hf(str(golden_orbax), str(out), max_shard_size="700KB")
    assert (out / "model.safetensors.index.json").exists()
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 1
    assert_same_tensors(str(src), str(out))
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "vision_config.json").read_bytes() == (src / "vision_config.json").read_bytes()
    # the exported folder loads back into our model like the original
    m = fusion_jax.from_pretrained(str(out))
    assert m.cfg == fusion_jax.from_pretrained(str(golden_orbax)).cfg


def test_golden_bf16_round_trip_byte_identical(golden_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    src = tmp_path / "bf16"
    src.mkdir()
    sd = load_file(str(golden_dir / "phi3_train" / "weights.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, str(src / "model.safetensors"),
              metadata={"format": "pt"})
    for f in ("config.json", "vision_config.json"):
        (src / f).write_bytes((golden_dir / "phi3_train" / f).read_bytes())
    assert cli(["to-orbax", "--src", str(src), "--dst", str(tmp_path / "o")]) == 0
    assert cli(["to-hf", "--src", str(tmp_path / "o"), "--dst", str(tmp_path / "h")]) == 0
    assert_same_tensors(str(src), str(tmp_path / "h"))
    r = oio.ParamReader(str(tmp_path / "o"))
    assert str(r.dtype("model.layers.self_attn.qkv_proj.kernel")) == "bfloat16"
    # orbax-restored values carry the same bits (cast only on request)
    from fusion_jax.hf_io import flat_state
    m = fusion_jax.from_pretrained(str(tmp_path / "o"), dtype="bfloat16")
    got = np.asarray(flat_state(m)["model.embed_tokens.weight"].get_value())
    assert str(got.dtype) == "bfloat16"
    assert got.tobytes() == sd["model.embed_tokens.weight"].to(torch.bfloat16).view(torch.int16).numpy().tobytes()


def test_torch_bin_read_weights_only(tmp_path):
    sd = {"a": torch.randn(3, 4).to(torch.bfloat16), "b": torch.arange(5, dtype=torch.int64)}
    torch.save(sd, str(tmp_path / "pytorch_model.bin"))
    r = SafeReader(str(tmp_path))
    assert r.get("a").tobytes() == sd["a"].view(torch.int16).numpy().tobytes()
    assert str(r.dtype("a")) == "bfloat16" and r.get("b").tolist() == list(range(5))


def _our_logits(model, ids):
    import jax.numpy as jnp
    ids = jnp.asarray(ids)
    B, S = ids.shape
    batch = {"position_ids": jnp.broadcast_to(jnp.arange(S), (B, S)),
             "attention_mask": jnp.ones((B, S), bool)}
    h, _, _ = model.decode(model.model.embed_tokens(ids), batch, None)
    return np.asarray(model.logits(h))


def _hf_llm_from_export(folder, family, base_cfg: dict):
    """transformers CausalLM holding only the LLM tensors of an exported FUSION folder."""
    cls = {"phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM),
           "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[family]
    drop = {"model_type", "architectures", "transformers_version", "torch_dtype"}
    cfg = cls[0](**{k: v for k, v in base_cfg.items() if k not in drop and not k.startswith("mm_")})
    cfg._attn_implementation = "eager"
    model = cls[1](cfg).eval()
    r = SafeReader(folder)
    sd = {k: torch.from_numpy(np.array(r.get(k))) for k in r.keys() if k.startswith(LLM_PREFIXES)}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set()), missing
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def test_golden_llm_logits_in_transformers(golden_dir, golden_orbax, tmp_path):
    out = tmp_path / "hf"
    to_hf(str(golden_orbax), str(out))
    cfg = json.loads((out / "config.json").read_text())
    hf = _hf_llm_from_export(str(out), "phi3", cfg)
    ids = np.random.default_rng(0).integers(3, 128, (2, 11))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits.numpy()
    ours = _our_logits(fusion_jax.from_pretrained(str(golden_orbax)), ids)
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)


# ----------------------------------------------------------------------------- tiny public checkpoints

def _siglip(path, full=True):
    vc = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
              image_size=8, patch_size=2)
    torch.manual_seed(0)
    if full:
        cfg = transformers.SiglipConfig(
            vision_config=vc, text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                               num_hidden_layers=1, vocab_size=50,
                                               max_position_embeddings=16))
        model = transformers.SiglipModel(cfg)
    else:
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**vc))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(str(path))
    return path


def _tokenizer(path, vocab):
    import tokenizers
    from tokenizers import models, pre_tokenizers
    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(vocab - 3)]
    tok = tokenizers.Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 4096}))


def _llm(path, family, tokenizer=False):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1)
    if family == "phi3":
        rope = {"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                "long_factor": [1.0 + i for i in range(8)]}
        cfg = transformers.Phi3Config(**{**common, "num_key_value_heads": 4}, original_max_position_embeddings=64,
                                      rope_scaling=rope)
        model = transformers.Phi3ForCausalLM(cfg)
    elif family == "llama":
        cfg = transformers.LlamaConfig(**common, rope_theta=50000.0)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rope_theta=1e6)
        model = transformers.Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.save_pretrained(str(path))
    if tokenizer:
        _tokenizer(path, 96)
    return model.eval()


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    return _siglip(tmp_path_factory.mktemp("siglip"))


@pytest.mark.parametrize("family,tok", [("phi3", True), ("llama", False), ("qwen2", False)])
def test_init_then_to_hf_levanter_round_trip(family, tok, siglip_dir, tmp_path, capsys):
    llm_dir = tmp_path / "llm"
    hf_llm = _llm(llm_dir, family, tokenizer=tok)
    cfg_path = tmp_path / "fusion.json"
    cfg_path.write_text(json.dumps(TINY_FUSION))
    orb, out = tmp_path / "orbax", tmp_path / "hf"
    assert cli(["init", "--vision", str(siglip_dir), "--llm", str(llm_dir), "--dst", str(orb),
                "--config", str(cfg_path)]) == 0
    said = capsys.readouterr().out
    assert ("no tokenizer files" in said) == (not tok)
    assert cli(["to-hf", "--src", str(orb), "--dst", str(out)]) == 0

    # vision: SigLIP tensors come back unchanged, minus the last layer and the head
    sig, exp = SafeReader(str(siglip_dir)), SafeReader(str(out))
    vis = [k for k in sig.keys() if k.startswith("vision_model.") and not k.startswith(
        ("vision_model.head.", "vision_model.encoder.layers.2."))]
    for k in vis:
        assert _bits(sig.get(k)) == _bits(exp.get(f"{VT}.{k[len('vision_model.'):]}")), k
    assert not [k for k in exp.keys() if "encoder.layers.2." in k or ".head." in k]
    assert any("post_layernorm" in k for k in exp.keys())
    # LLM: unchanged, embeddings grown by two rows holding the mean of the old rows
    llm = SafeReader(str(llm_dir))
    for k in llm.keys():
        a, b = llm.get(k), exp.get(k)
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            assert b.shape == (a.shape[0] + 2, a.shape[1])
            assert b[:-2].tobytes() == a.tobytes()
            np.testing.assert_allclose(b[-2:], np.broadcast_to(a.mean(0), (2, a.shape[1])), atol=1e-7)
        else:
            assert _bits(a) == _bits(b), k
    assert ("lm_head.weight" in exp.keys()) == (family != "qwen2")
    hcfg = json.loads((out / "config.json").read_text())
    assert hcfg["vocab_size"] == 98 and hcfg["model_type"].startswith("fusion_")
    assert hcfg["num_of_vision_sampler_layers"] == 2 and hcfg["mm_hidden_size"] == 32
    assert (out / "vision_config.json").exists()
    if tok:
        import tokenizers
        t = tokenizers.Tokenizer.from_file(str(out / "tokenizer.json"))
        assert t.token_to_id("<vision_start>") == 96 and t.token_to_id("<vision_end>") == 97

    # logits: original transformers model == exported LLM in transformers == our JAX decoder
    ids = np.random.default_rng(0).integers(3, 96, (2, 9))
    with torch.no_grad():
        ref = hf_llm(torch.from_numpy(ids)).logits.numpy()
        exported = _hf_llm_from_export(str(out), family, hcfg)(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(exported[..., :96], ref, atol=ATOL, rtol=0)
    model = fusion_jax.from_pretrained(str(orb))
    ours = _our_logits(model, ids)
    np.testing.assert_allclose(ours, exported, atol=ATOL, rtol=0)
    # and a second trip through Orbax is byte-identical
    to_orbax(str(out), str(tmp_path / "orbax2"))
    to_hf(str(tmp_path / "orbax2"), str(tmp_path / "hf2"))
    assert_same_tensors(str(out), str(tmp_path / "hf2"))
    assert (out / "config.json").read_bytes() == (tmp_path / "hf2" / "config.json").read_bytes()


def test_init_accepts_siglip_vision_model(tmp_path):
    v = _siglip(tmp_path / "sv", full=False)
    _llm(tmp_path / "llm", "llama")
    init_stage1(str(v), str(tmp_path / "llm"), str(tmp_path / "o"), config=TINY_FUSION, dtype="bfloat16",
                log=lambda *a: None)
    r = oio.ParamReader(str(tmp_path / "o"))
    assert r.shape("model.vision_tower.layers.mlp.fc1.kernel") == (2, 32, 64)
    assert str(r.dtype("model.mm_projector.linear_0.kernel")) == "bfloat16"


# ----------------------------------------------------------------------------- safety / errors

def test_refuses_overwrite_and_names_every_offender(golden_dir, golden_orbax, tmp_path):
    from safetensors.numpy import save_file
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="--force"):
        to_hf(str(golden_orbax), str(dst))
    assert (dst / "keep.txt").exists()
    to_hf(str(golden_orbax), str(dst), force=True)
    assert not (dst / "keep.txt").exists() and (dst / "config.json").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]

    # broken HF folder: one missing, one extra, one mis-shaped tensor -> one error naming all three
    bad = tmp_path / "bad"
    bad.mkdir()
    r = SafeReader(str(dst))
    sd = {k: np.asarray(r.get(k)) for k in r.keys()}
    del sd["model.norm.weight"]
    sd["model.extra.weight"] = np.zeros(3, np.float32)
    sd["model.layers.1.mlp.down_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(sd, str(bad / "model.safetensors"))
    for f in ("config.json", "vision_config.json"):
        (bad / f).write_bytes((dst / f).read_bytes())
    with pytest.raises(CheckpointError) as e:
        to_orbax(str(bad), str(tmp_path / "o"))
    msg = str(e.value)
    assert "missing tensor model.norm.weight" in msg and "unexpected tensor model.extra.weight" in msg
    assert "model.layers.1.mlp.down_proj.weight has shape (2, 2)" in msg
    assert not (tmp_path / "o").exists()


def test_from_pretrained_on_mesh_and_inspect(golden_orbax, capsys):
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))

    def shard(name, var):
        shp = var.get_value().shape
        if name == "model.embed_tokens.weight" and shp[0] % 4 == 0:
            return NamedSharding(mesh, P("model", None))
        return NamedSharding(mesh, P())
    m = fusion_jax.from_pretrained(str(golden_orbax), shardings=shard)
    from fusion_jax.hf_io import flat_state
    st = flat_state(m)
    emb = st["model.embed_tokens.weight"].get_value()
    assert emb.sharding.spec == P("model", None)
    ref = oio.ParamReader(str(golden_orbax)).get("model.embed_tokens.weight")
    np.testing.assert_array_equal(np.asarray(emb), ref)
    m2 = fusion_jax.from_pretrained(str(golden_orbax), mesh=mesh)
    assert flat_state(m2)["lm_head.kernel"].get_value().sharding.mesh.shape == mesh.shape
    assert cli(["inspect", str(golden_orbax)]) == 0
    out = capsys.readouterr().out
    assert "model.layers.self_attn.qkv_proj.kernel" in out and "[4, 64, 192]" in out and "phi3" in out
