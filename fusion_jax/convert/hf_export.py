"""HF (reference `save_pretrained`) folder <-> Orbax folder, one tensor at a time.

Both directions read the one mapping table, `fusion_jax.param_map.param_table`.
"""
from __future__ import annotations

import json

import numpy as np
from etils import epath

from fusion_jax import paths
from fusion_jax.config import FusionConfig, tower_from_name
from fusion_jax.convert import orbax_io as oio
from fusion_jax.convert.st_io import CheckpointError, SafeReader, ShardedWriter, cast_checked, is_float, np_dtype
from fusion_jax.convert.util import copy_tokenizer, progress, staged_dir
from fusion_jax.param_map import Row, hf_shape, param_table, to_ours
from fusion_jax.param_map import to_hf as hf_layout

ARCH = {"phi3": ("fusion_phi", "FusionPhiForCausalLM"),
        "llama": ("fusion_llama", "FusionLlamaForCausalLM"),
        "qwen2": ("fusion_qwen", "FusionQwenForCausalLM")}


def our_shapes(cfg: FusionConfig) -> dict[str, tuple]:
    """Dotted path -> full (stacked) shape of every parameter, without allocating."""
    from fusion_jax.hf_io import abstract_model, flat_state
    return {k: tuple(v.get_value().shape) for k, v in flat_state(abstract_model(cfg)).items()}


def per_layer_shape(row: Row, shapes, cfg):
    shp = shapes[row.ours]
    return hf_shape(row, tuple(shp[1:]) if row.stack else tuple(shp), cfg)


def check_table(rows, shapes):
    stray = sorted(set(shapes) - {r.ours for r in rows})
    if stray:
        raise CheckpointError(f"model parameters with no mapping row: {stray}")


def cast_float(a: np.ndarray, dt, name: str):
    """`a` cast to `dt` when `a` is floating (integer tensors and dt=None: unchanged); overflow
    to inf is a CheckpointError naming tensor `name`."""
    if dt is None or a.dtype == dt or not is_float(a.dtype):
        return a
    return cast_checked(a, dt, name)


def hf_order(rows: list[Row]):
    """(row, layer) pairs in the order save_pretrained would list them: layer-major inside each
    stacked block (model.layers.0.*, model.layers.1.*, ...)."""
    group_first = {}
    items = []
    for k, r in enumerate(rows):
        if r.stack:
            prefix = r.hf.split("{i}")[0]
            g = group_first.setdefault(prefix, k)
            items += [((g, i, k), r, i) for i in range(r.stack)]
        else:
            items.append(((k, 0, k), r, None))
    items.sort(key=lambda t: t[0])
    return [(r, i) for _, r, i in items]


# ----------------------------------------------------------------------------- HF -> Orbax

def write_row(w: oio.ParamWriter, r: Row, shape, dt, read, bar):
    """One table row into `w`, one layer at a time; read(hf_name) -> (array, bytes read)."""
    names = r.hf_names()
    arr = w.create(r.ours, shape, dt, stacked=bool(r.stack))
    for i, n in enumerate(names):
        t, nbytes = read(n)
        (arr[i] if r.stack else arr).write(cast_float(to_ours(t, r.transform), dt, n)).result()
        bar.update(nbytes)


def to_orbax(src: str, dst: str, *, dtype=None, force=False, log=print):
    from fusion_jax.hf_io import check_names, read_config
    cfg = read_config(src)
    reader = SafeReader(src)
    rows = param_table(cfg)
    shapes = our_shapes(cfg)
    check_table(rows, shapes)
    problems = check_names(rows, reader.keys(), reader.shape, lambda r: per_layer_shape(r, shapes, cfg))
    if problems:
        raise CheckpointError(f"{src}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    dt_out = np_dtype(dtype) if dtype else None
    with staged_dir(dst, force) as tmp:
        w = oio.ParamWriter(tmp)
        with progress(reader.total_bytes, "to-orbax") as bar:
            for r in rows:
                dts = {reader.dtype(n) for n in r.hf_names()}
                if len(dts) > 1:
                    raise CheckpointError(f"{src}: layers of {r.hf} have mixed dtypes {sorted(map(str, dts))}")
                write_row(w, r, shapes[r.ours], out_dtype(dts.pop(), dt_out),
                          lambda n: (reader.get(n), reader.nbytes(n)), bar)
        w.finish()
        _write_side_files(src, tmp, cfg)
    log(f"wrote {dst}: {sum(len(r.hf_names()) for r in rows)} tensors -> {len(rows)} parameters")
    return dst


def _write_side_files(src, tmp, cfg):
    src, tmp = epath.Path(src), epath.Path(tmp)
    (tmp / oio.CONFIG).write_text(cfg.to_json())
    (src / "config.json").copy(tmp / oio.HF_CONFIG, overwrite=True)
    if (src / "vision_config.json").is_file():
        (src / "vision_config.json").copy(tmp / oio.HF_VISION_CONFIG, overwrite=True)
    copy_tokenizer(src, tmp / oio.TOKENIZER)


# ----------------------------------------------------------------------------- Orbax -> HF

def to_hf(src: str, dst: str, *, max_shard_size="5GB", dtype=None, force=False, log=print):
    cfg = oio.read_fusion_config(src)
    reader = oio.ParamReader(src)
    rows = param_table(cfg)
    shapes = our_shapes(cfg)
    check_table(rows, shapes)
    problems = oio.param_problems(reader, {r.ours: shapes[r.ours] for r in rows})
    if problems:
        raise CheckpointError(f"{src}: {len(problems)} problem(s):\n  " + "\n  ".join(problems))
    dt_out = np_dtype(dtype) if dtype else None
    order = hf_order(rows)

    plan = [(r.hf.format(i=i) if i is not None else r.hf, per_layer_shape(r, shapes, cfg),
             out_dtype(reader.dtype(r.ours), dt_out))
            for r, i in order]
    with staged_dir(dst, force) as tmp:
        w = ShardedWriter(tmp, plan, max_shard_size)
        with progress(w.total, "to-hf") as bar:
            for (r, i), (name, shp, dt) in zip(order, plan, strict=True):
                a = hf_layout(reader.get(r.ours, i), r.transform, shp)
                w.write(name, cast_float(a, dt, name))
                bar.update(int(np.prod(shp, dtype=np.int64)) * np.dtype(dt).itemsize)
        w.close()
        write_hf_configs(src, tmp, cfg, torch_dtype=(str(dtype) if dtype else None))
        copy_tokenizer(paths.join(src, oio.TOKENIZER), tmp)
    log(f"wrote {dst}: {len(plan)} tensors in {len(w.names)} file(s)")
    return dst


def out_dtype(dt, dt_out):
    """`dt_out` for a floating tensor when one is asked for, else the stored dtype."""
    return dt_out if (dt_out is not None and is_float(dt)) else dt


def write_hf_configs(src, tmp, cfg, torch_dtype=None):
    src, tmp = epath.Path(src), epath.Path(tmp)
    stored = src / oio.HF_CONFIG
    if stored.is_file() and torch_dtype is None:
        stored.copy(tmp / "config.json", overwrite=True)
    else:
        base = json.loads(stored.read_text()) if stored.is_file() else None
        d = synth_hf_config(cfg, base)
        if torch_dtype:
            d["torch_dtype"] = torch_dtype
        (tmp / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    vstored = src / oio.HF_VISION_CONFIG
    if vstored.is_file():
        vstored.copy(tmp / "vision_config.json", overwrite=True)
    elif not known_tower(cfg):
        (tmp / "vision_config.json").write_text(json.dumps(vision_hf_config(cfg), indent=2, sort_keys=True))


def known_tower(cfg):
    try:
        return tower_from_name(cfg.mm_vision_tower) == cfg.vision
    except ValueError:
        return False


def vision_hf_config(cfg) -> dict:
    v = cfg.vision
    return {"model_type": "siglip_vision_model", "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size, "num_attention_heads": v.num_attention_heads,
            "num_hidden_layers": v.num_hidden_layers, "image_size": v.image_size,
            "patch_size": v.patch_size, "num_channels": v.num_channels,
            "layer_norm_eps": v.layer_norm_eps, "hidden_act": v.hidden_act, "attention_dropout": 0.0}


def synth_hf_config(cfg: FusionConfig, base: dict | None = None, torch_dtype="float32") -> dict:
    """A reference-style config.json: HF LLM keys + FUSION keys (base keys kept unless ours differ)."""
    c = cfg.llm
    mt, arch = ARCH[c.family]
    d = dict(base or {})
    d.update(model_type=mt, architectures=[arch], vocab_size=c.vocab_size, hidden_size=c.hidden_size,
             intermediate_size=c.intermediate_size, num_hidden_layers=c.num_hidden_layers,
             num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
             rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta, rope_scaling=c.rope,
             max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
             hidden_act=c.hidden_act, pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id,
             eos_token_id=list(c.eos_token_id) if isinstance(c.eos_token_id, tuple) else c.eos_token_id)
    d.pop("rope_parameters", None)
    if c.head_dim is not None:
        d["head_dim"] = c.head_dim
    if c.family == "phi3":
        d["original_max_position_embeddings"] = c.original_max_position_embeddings
        if c.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = c.partial_rotary_factor
    if c.family == "llama":
        d["attention_bias"] = c.attention_bias
    d.setdefault("torch_dtype", torch_dtype)
    d.update(
        mm_vision_tower=cfg.mm_vision_tower, mm_hidden_size=cfg.vision.hidden_size,
        mm_projector_type=cfg.mm_projector_type, num_of_vision_sampler_layers=cfg.num_sampler_layers,
        start_of_vision_sampler_layers=cfg.sampler_start, stride_of_vision_sampler_layers=cfg.sampler_stride,
        window_size=cfg.window_size, query_len=",".join(str(q) for q in cfg.query_len),
        tokenizer_model_max_length=cfg.max_length, tokenizer_padding_side="right",
        mm_use_im_start_end=True, mm_use_im_patch_token=False, image_aspect_ratio="static_hd",
        mm_patch_merge_type="flat", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        unfreeze_mm_vision_tower=True, use_mm_proj=True, tune_mm_mlp_adapter=False,
        freeze_mm_mlp_adapter=False,
    )
    return d
