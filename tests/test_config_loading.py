"""Config derivations and checkpoint-folder loading errors."""
import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from fusion_jax.config import KNOWN_TOWERS, FusionConfig, from_hf_config, tiny_config
from fusion_jax.hf_io import CheckpointError, from_pretrained, read_config


def test_tower_derivations():
    so, g = KNOWN_TOWERS["siglip-so400m-patch14-384"], KNOWN_TOWERS["siglip2-giant-opt-patch16-384"]
    assert (so.num_layers, so.split, so.num_patches, so.grid) == (26, 13, 729, 27)
    assert (g.num_layers, g.split, g.num_patches, g.grid) == (39, 19, 576, 24)


def test_reference_config_fields(golden_dir):
    cfg = read_config(str(golden_dir / "phi3_train"))
    assert cfg.llm.family == "phi3" and cfg.interaction_after == (0, 2) and cfg.query_len == (16,)
    assert cfg.vision.num_patches == 729 and cfg.vision.split == 13 and cfg.max_length == 4096
    assert cfg.projector_depth == 2 and cfg.window_size == 3 and cfg.dsm_weight == 0.1
    d = json.loads((golden_dir / "phi3_train" / "config.json").read_text())
    d["mm_vision_tower"] = "google/siglip2-giant-opt-patch16-384"
    assert from_hf_config(d).vision.num_patches == 576   # no vision_config.json: known tower
    d["mm_vision_tower"] = "my/unknown-tower"
    with pytest.raises(ValueError, match="vision_config.json"):
        from_hf_config(d)
    d["model_type"] = "llava"
    with pytest.raises(ValueError, match="model_type"):
        from_hf_config(d)


def test_config_json_round_trip_and_validation():
    cfg = tiny_config("llama", query_len="4,16,36")
    assert FusionConfig.from_dict(json.loads(cfg.to_json())) == cfg
    with pytest.raises(ValueError, match="perfect square"):
        tiny_config(query_len=(5,))
    with pytest.raises(ValueError, match="mm_projector_type"):
        tiny_config(mm_projector_type="conv")
    with pytest.raises(ValueError, match="early_mask_mode"):
        tiny_config(early_mask_mode="sometimes")


def _copy_case(golden_dir, tmp_path):
    dst = tmp_path / "case"
    shutil.copytree(golden_dir / "phi3_train", dst)
    return dst, load_file(str(dst / "weights.safetensors"))


def test_bad_checkpoint_names_every_offender(golden_dir, tmp_path):
    dst, w = _copy_case(golden_dir, tmp_path)
    (dst / "weights.safetensors").chmod(0o644)
    w.pop("model.layers.1.self_attn.qkv_proj.weight")
    w.pop("model.mm_projector.2.bias")
    w["model.extra.weight"] = np.zeros(3, np.float32)
    w["lm_head.weight"] = np.zeros((5, 64), np.float32)
    save_file(w, str(dst / "weights.safetensors"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(dst))
    msg = str(e.value)
    for s in ("missing tensor model.layers.1.self_attn.qkv_proj.weight", "missing tensor model.mm_projector.2.bias",
              "unexpected tensor model.extra.weight", "tensor lm_head.weight has shape (5, 64)"):
        assert s in msg


def test_sharded_index_folder_loads(golden_dir, tmp_path):
    dst, w = _copy_case(golden_dir, tmp_path)
    (dst / "weights.safetensors").unlink()
    names = sorted(w)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fn, ks in shards.items():
        save_file({k: w[k] for k in ks}, str(dst / fn))
    (dst / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}))
    model = from_pretrained(str(dst))
    np.testing.assert_array_equal(np.asarray(model.model.norm.weight[...]), w["model.norm.weight"])
    np.testing.assert_array_equal(np.asarray(model.model.layers.mlp.down_proj.kernel[...])[2],
                                  w["model.layers.2.mlp.down_proj.weight"].T)
