"""LoRA adapters out of a train run: merged into full weights (`merge-lora`) or as a PEFT folder (`to-peft`).

`to-peft` writes what the reference's `load_pretrained_model(model_path, model_base)` and `peft` read:
  adapter_model.safetensors   base_model.model.<HF module>.lora_A.weight [r, in] / lora_B.weight [out, r]
  adapter_config.json         peft LoraConfig (r, lora_alpha: scale = alpha / r as ours; target_modules
                              a regex naming exactly the adapted modules)
  non_lora_trainables.bin     the full_train tensors, base_model.model.<HF name> -> tensor: `torch.save`
                              of plain tensors, because the reference reads it with torch.load
  non_lora_trainables.safetensors  the same tensors (read this one where you can: no pickle)
  config.json                 the reference config (FusionConfig.from_pretrained(model_path) reads it)
"""
from __future__ import annotations

import json
import os
import re

import numpy as np
from etils import epath

from fusion_jax import paths
from fusion_jax.convert import orbax_io as oio
from fusion_jax.convert.st_io import CheckpointError
from fusion_jax.convert.util import copy_tokenizer, staged_dir
from fusion_jax.param_map import param_table
from fusion_jax.param_map import to_hf as hf_layout

PREFIX = "base_model.model."


def _adapter_dir(adapters: str):
    from fusion_jax.generate.loading import read_model_config, resolve_step_dir
    sd = resolve_step_dir(adapters)
    cfg = read_model_config(sd)
    if cfg.lora is None:
        raise ValueError(f"--adapters {adapters}: not a LoRA checkpoint (its fusion_config.json has no lora)")
    return sd, cfg


def write_orbax_folder(tmp: str, cfg, flat: dict):
    """A converted Orbax folder (fusion_config.json + params/) from {dotted name: array}."""
    w = oio.ParamWriter(tmp)
    for name, a in flat.items():
        a = np.asarray(a)
        w.create(name, a.shape, a.dtype).write(a).result()
    w.finish()
    with open(os.path.join(tmp, oio.CONFIG), "w") as f:
        f.write(cfg.to_json())


def merge_lora(base: str, adapters: str, dst: str, *, force: bool = False, log=print) -> str:
    """Full weights (a converted Orbax folder, which `to-hf` exports): base + scale * A @ B."""
    from flax import nnx

    from fusion_jax import lora
    from fusion_jax.generate.loading import tokenizer_dir_of
    sd, _ = _adapter_dir(adapters)
    model = lora.merge_adapters(lora.load_adapter_model(sd, base, quantize=False))
    flat = {".".join(str(k) for k in p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model))}
    with staged_dir(dst, force) as tmp:
        write_orbax_folder(tmp, model.cfg, flat)
        for side in (oio.HF_CONFIG, oio.HF_VISION_CONFIG):
            if paths.isfile(paths.join(base, side)):          # the base may be a gs:// folder
                epath.Path(tmp, side).write_text(epath.Path(base, side).read_text())
        tok = tokenizer_dir_of(sd)
        if tok:
            copy_tokenizer(tok, os.path.join(tmp, oio.TOKENIZER))
    log(f"wrote {dst}: {len(flat)} parameters (adapters of {sd} merged into {base})")
    return dst


def _layers(r):
    """(layer index or None, HF name) of each tensor of a param_map row."""
    return list(enumerate(r.hf_names())) if r.stack else [(None, r.hf)]


def _torch(a: np.ndarray):
    import torch
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(a.copy())


def _rows_by_ours(cfg):
    return {r.ours: r for r in param_table(cfg.replace(lora=None))}


def peft_tensors(sd: str, cfg) -> tuple[dict, dict, list[str]]:
    """({peft name: array}, {non-lora name: array}, adapted HF module names) of a LoRA step dir."""
    reader = oio.ParamReader(sd)
    rows = _rows_by_ours(cfg)
    lora_w, full, modules = {}, {}, []
    for name in sorted(reader.names):
        if name.endswith((".lora_a", ".lora_b")):
            mod, which = name.rsplit(".", 1)
            r = rows.get(mod + ".kernel")
            if r is None:
                raise CheckpointError(f"{sd}: adapter {name} sits on no known linear layer")
            for i, hf in _layers(r):
                hmod = hf[: -len(".weight")]
                a = reader.get(name, i)
                lora_w[f"{PREFIX}{hmod}.lora_{which[-1].upper()}.weight"] = np.ascontiguousarray(a.T)
                if which == "lora_a":
                    modules.append(hmod)
        else:
            r = rows.get(name)
            if r is None:
                raise CheckpointError(f"{sd}: parameter {name} has no reference name (param_map)")
            for i, hf in _layers(r):
                t = reader.get(name, i)
                shape = None if r.transform != "conv" else t.shape
                full[PREFIX + hf] = np.ascontiguousarray(hf_layout(t, r.transform, shape))
    return lora_w, full, modules


def peft_config(cfg, modules: list[str], base: str) -> dict:
    lc = cfg.lora
    pattern = "|".join(re.escape(m).replace(r"\.0\.", r"\.\d+\.") for m in dict.fromkeys(
        re.sub(r"\.\d+\.", ".0.", m) for m in modules))
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lc.rank, "lora_alpha": lc.alpha,
            "lora_dropout": lc.dropout, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
            "init_lora_weights": True, "use_rslora": False, "use_dora": False, "modules_to_save": None,
            "target_modules": f"^({pattern})$", "base_model_name_or_path": base, "revision": None}


def to_peft(adapters: str, dst: str, *, force: bool = False, log=print) -> str:
    import torch
    from safetensors.numpy import save_file

    from fusion_jax.convert.hf_export import write_hf_configs
    sd, cfg = _adapter_dir(adapters)
    lora_w, full, modules = peft_tensors(sd, cfg)
    if not modules:
        raise CheckpointError(f"{sd}: no adapters (lora_a / lora_b) in params/")
    base = cfg.lora.base
    with staged_dir(dst, force) as tmp:
        save_file(lora_w, os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
            json.dump(peft_config(cfg, modules, base), f, indent=2, sort_keys=True)
        save_file(full, os.path.join(tmp, "non_lora_trainables.safetensors"), metadata={"format": "pt"})
        torch.save({k: _torch(v) for k, v in full.items()}, os.path.join(tmp, "non_lora_trainables.bin"))
        if base and paths.isfile(paths.join(base, "config.json")):   # a released HF base: its config
            epath.Path(tmp, "config.json").write_text(epath.Path(base, "config.json").read_text())
        else:
            write_hf_configs(base if base and paths.isdir(base) else tmp, tmp, cfg.replace(lora=None))
    log(f"wrote {dst}: {len(lora_w)} adapter tensors on {len(modules)} modules, {len(full)} non-LoRA tensors")
    return dst
