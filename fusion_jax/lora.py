"""LoRA and QLoRA on FUSION's stacked layers, configured as qwix's `LoraRule` and quantized with qwix.

qwix's own model surgery (`qwix.apply_lora_to_model`) creates adapters lazily during the first call,
which fails inside `nn.scan_layers`. Here the adapters are created up front on every `nn.Linear` whose
module path matches `LoraConfig.target`, stacked along the layer axis like the kernel (so the scan
carries them), with logical axes for sharding; `nn.Linear` adds the low-rank term. QLoRA bases are
qwix `QArray`s (nf4 / int8) multiplied by `qwix.dot_general`.

Parameters in a model with adapters:
  trainable   `.../lora_a`, `.../lora_b` and every parameter under `LoraConfig.full_train`;
  frozen      everything else (the base), held in `base_dtype`.
A LoRA checkpoint (train step dir or `merge-lora --adapters` folder) stores only the trainable ones;
its fusion_config.json has `lora.base`, the folder the frozen base comes from.
"""
from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.config import FusionConfig, LoraConfig
from fusion_jax.nn import Linear

QUANT_TILE = 64          # nf4 / int8 scales: one per output channel and block of 64 inputs (QLoRA's)
LORA_LEAF = re.compile(r"(^|/)lora_[ab]$")


def lora_rule(lc: LoraConfig):
    """The qwix rule this config stands for (its initializers create the adapters)."""
    import qwix
    qtype = lc.base_dtype if lc.base_dtype in ("nf4", "int8") else None
    return qwix.LoraRule(module_path=lc.target, rank=lc.rank, alpha=lc.alpha, dropout=lc.dropout,
                         weight_qtype=qtype, tile_size=QUANT_TILE if qtype else None)


def adapted_linears(model, lc: LoraConfig) -> list[tuple[str, Linear]]:
    """(module path, Linear) of every linear layer the adapters go on, in graph order."""
    pat = re.compile(lc.target)
    out = [("/".join(str(k) for k in path), m) for path, m in nnx.iter_modules(model) if isinstance(m, Linear)]
    out = [(p, m) for p, m in out if pat.search(p)]
    if not out:
        raise ValueError(f"lora.target={lc.target!r} matches no linear layer "
                         f"(module paths look like 'model/layers/self_attn/o_proj')")
    return out


def add_adapters(model, lc: LoraConfig, seed: int = 0):
    """lora_a (qwix's he_uniform, from `seed`) and lora_b = 0 on every target, in place."""
    rule = lora_rule(lc)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), 0x10A)
    for i, (_, m) in enumerate(adapted_linears(model, lc)):
        m.add_lora(lc.rank, lc.scale, jax.random.fold_in(key, i), init_a=rule.lora_a_initializer,
                   dropout=lc.dropout)
    return model


def attach_dropout_keys(model, key):
    """Turn LoRA dropout on for one training forward of `model` (a fresh `nnx.merge` inside the train
    step): the i-th adapted layer (graph order) gets fold_in(fold_in(key, i), layer) per stacked layer,
    as a `LoraDropoutKey` stacked like its kernel, so the layer scan hands each layer its own key.
    Models that never get keys (eval, generation, chat, merge, export) run without dropout."""
    from fusion_jax.nn import LoraDropoutKey
    sites = [m for _, m in nnx.iter_modules(model) if isinstance(m, Linear) and getattr(m, "lora_a", None) is not None]
    for i, m in enumerate(sites):
        k = jax.random.fold_in(key, i)
        stack = m.lora_a.get_value().shape[:-2]
        n = int(np.prod(stack)) if stack else 0
        if n:
            k = jax.vmap(lambda j, k=k: jax.random.fold_in(k, j))(jnp.arange(n)).reshape(stack + k.shape)
        m.lora_dropout_key = LoraDropoutKey(k)
    return model


def is_trainable(path: str, lc: LoraConfig) -> bool:
    """`path`: '/'-joined parameter path, e.g. model/layers/self_attn/o_proj/lora_a."""
    return bool(LORA_LEAF.search(path) or re.search(lc.full_train, path))


def prepare_base(model, lc: LoraConfig):
    """Hold the frozen base in `base_dtype`: nf4 / int8 quantize the target kernels (qwix) and keep the
    rest of the base in bfloat16; bfloat16 casts the whole base; float32 leaves it. In place."""
    if lc.base_dtype in ("nf4", "int8"):
        for _, m in adapted_linears(model, lc):
            m.quantize_kernel(lc.base_dtype, QUANT_TILE)
    if lc.base_dtype == "float32":
        return model
    _, state = nnx.split(model)
    for path, v in nnx.to_flat_state(state):
        p = "/".join(str(k) for k in path)
        val = v.get_value()
        if not is_trainable(p, lc) and jnp.issubdtype(val.dtype, jnp.floating) and not p.endswith("kernel_scale"):
            v.set_value(val.astype(jnp.bfloat16))
    return model


def build_model(cfg: FusionConfig, seed: int = 0, base_params: dict | None = None):
    """A model with adapters and its base in `base_dtype`. `base_params`: the base's pure dict (no
    adapters; default: the seeded random init)."""
    from fusion_jax.model import FusionForCausalLM
    lc = cfg.lora
    model = FusionForCausalLM(cfg.replace(lora=None), rngs=nnx.Rngs(seed))
    if base_params is not None:
        state = nnx.state(model)
        nnx.replace_by_pure_dict(state, base_params)
        nnx.update(model, state)
    add_adapters(model, lc, seed)
    prepare_base(model, lc)
    model.cfg = cfg
    return model


# ----------------------------------------------------------------------------- trees

def trainable_part(params: dict, lc: LoraConfig) -> dict:
    """The nested sub-dict of `params` a LoRA checkpoint stores."""
    def walk(d, prefix):
        out = {}
        for k, v in d.items():
            p = f"{prefix}{k}"
            if isinstance(v, dict):
                sub = walk(v, p + "/")
                if sub:
                    out[k] = sub
            elif is_trainable(p, lc):
                out[k] = v
        return out
    return walk(params, "")


def merge_parts(base: dict, part: dict) -> dict:
    """`base` with the leaves of `part` put in (nested dicts; new keys allowed)."""
    out = dict(base)
    for k, v in part.items():
        out[k] = merge_parts(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


# ----------------------------------------------------------------------------- folders

def base_folder(cfg: FusionConfig, base: str | None, where: str) -> str:
    from etils import epath
    b = base or cfg.lora.base
    if not b:
        raise ValueError(f"{where}: LoRA adapters without a base folder (pass --base DIR)")
    if not epath.Path(b).exists():
        raise FileNotFoundError(f"{where}: base {b} does not exist (pass --base DIR)")
    return b


def load_base_params(base: str, cfg: FusionConfig, mesh=None) -> dict:
    """The base's pure dict from an Orbax / HF folder or a train workdir / step dir (placed on `mesh`
    by the logical-axis rules when given)."""
    from fusion_jax.generate.loading import load_model
    model = load_model(base, mesh=mesh)
    if model.cfg.lora is not None:
        raise ValueError(f"base {base}: is itself a LoRA checkpoint (merge it first: convert merge-lora)")
    if (model.cfg.llm, model.cfg.vision) != (cfg.llm, cfg.vision):
        raise ValueError(f"base {base}: its LLM / vision tower differ from the adapters' fusion_config.json")
    return nnx.split(model)[1].to_pure_dict()


def load_adapter_model(folder: str, base: str | None = None, *, quantize: bool = True, mesh=None, **overrides):
    """A model with the adapters of `folder` (a LoRA train step dir or workdir) on its base.
    `quantize=False` keeps the base in full precision (merge-lora)."""
    from fusion_jax.convert.orbax_io import restore_params_tree
    from fusion_jax.generate.loading import read_model_config, resolve_step_dir
    sd = resolve_step_dir(folder)
    cfg = read_model_config(sd)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if cfg.lora is None:
        raise ValueError(f"{folder}: not a LoRA checkpoint (its fusion_config.json has no lora)")
    base_params = load_base_params(base_folder(cfg, base, folder), cfg, mesh=mesh)
    lc = cfg.lora if quantize else dataclasses.replace(cfg.lora, base_dtype="float32")
    model = build_model(cfg.replace(lora=lc), 0, base_params)
    params = nnx.split(model)[1].to_pure_dict()
    part = trainable_part(params, lc)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), part)
    restored = restore_params_tree(sd, abstract)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, merge_parts(params, restored))
    nnx.update(model, state)
    model.cfg = cfg
    if mesh is not None:
        from fusion_jax.sharding import shard_model
        shard_model(model, mesh)
    return model


def merge_adapters(model):
    """kernel += scale * lora_a @ lora_b on every adapted layer (full-precision base), adapters removed;
    returns the model with `cfg.lora = None`."""
    for _, m in nnx.iter_modules(model):
        if isinstance(m, Linear) and getattr(m, "lora_a", None) is not None:
            if m.kernel is None:
                raise ValueError("merge needs the full-precision base (load with quantize=False)")
            k = m.kernel.get_value()
            delta = jnp.matmul(m.lora_a.get_value().astype(jnp.float32), m.lora_b.get_value().astype(jnp.float32))
            m.kernel.set_value((k.astype(jnp.float32) + delta * m.lora_scale).astype(k.dtype))
            del m.lora_a, m.lora_b, m.lora_scale, m.lora_dropout
    model.cfg = model.cfg.replace(lora=None)
    return model
