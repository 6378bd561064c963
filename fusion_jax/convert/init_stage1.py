"""Stage-1 starting weights from a public SigLIP checkpoint and a public HF LLM.

What the reference does at the start of training, reproduced tensor by tensor:
* vision tower: SigLIP `vision_model.*`, minus the last encoder layer and the pooling head
  (`SigLipVisionTower.load_model` deletes `encoder.layers[-1]`, replaces `head` by Identity);
  `post_layernorm` is kept; `text_model.*`, `logit_scale`, `logit_bias` are dropped;
* LLM: all tensors, with `embed_tokens` and `lm_head` resized to `len(tokenizer)` after adding
  `<vision_start>` / `<vision_end>` (`initialize_vision_tokenizer`, mm_use_im_start_end=True):
  rows beyond the tokenizer are cut, the new rows are the mean of the kept rows;
* projectors and interaction layers: our model's own initialisation (`FusionForCausalLM`).
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from fusion_jax.config import KNOWN_TOWERS, FusionConfig, llm_config_from_hf, vision_config_from_hf
from fusion_jax.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN
from fusion_jax.convert import orbax_io as oio
from fusion_jax.convert.hf_export import (
    _cast,
    _is_float,
    check_table,
    our_shapes,
    per_layer_shape,
    synth_hf_config,
    vision_hf_config,
)
from fusion_jax.convert.st_io import CheckpointError, SafeReader, np_dtype
from fusion_jax.convert.util import has_tokenizer, progress, staged_dir, tokenizer_files
from fusion_jax.param_map import VT, param_table, to_ours

FAMILIES = {"phi3": "phi3", "llama": "llama", "qwen2": "qwen2"}
FRESH_PREFIXES = ("model.mm_projector.", "model.aux_projector.", "model.vision_sampler_layers.")
NEW_TOKENS = (DEFAULT_IM_START_TOKEN, DEFAULT_IM_END_TOKEN)
# reference config.json keys accepted in --config, mapped to FusionConfig fields
REF_KEYS = {"num_of_vision_sampler_layers": "num_sampler_layers",
            "start_of_vision_sampler_layers": "sampler_start",
            "stride_of_vision_sampler_layers": "sampler_stride",
            "tokenizer_model_max_length": "max_length", "mm_vision_tower": "mm_vision_tower",
            "mm_projector_type": "mm_projector_type", "window_size": "window_size",
            "query_len": "query_len"}


def normalize_llm_config(d: dict) -> dict:
    """transformers-5 `rope_parameters` -> the 4.x keys (rope_theta, rope_scaling) the reference reads."""
    d = dict(d)
    rp = d.pop("rope_parameters", None)
    if isinstance(rp, dict):
        rp = dict(rp)
        if "rope_theta" in rp:
            d.setdefault("rope_theta", rp.pop("rope_theta"))
        if "partial_rotary_factor" in rp:
            d.setdefault("partial_rotary_factor", rp.pop("partial_rotary_factor"))
        if rp.get("rope_type", "default") != "default" and d.get("rope_scaling") is None:
            if d.get("model_type") == "phi3":  # transformers 4.x Phi3 accepts exactly these keys
                rp = {"type": rp.get("type", rp.get("rope_type")), "short_factor": rp["short_factor"],
                      "long_factor": rp["long_factor"]}
            elif rp.get("original_max_position_embeddings") == d.get("original_max_position_embeddings") \
                    and rp.get("rope_type") != "llama3":
                rp.pop("original_max_position_embeddings", None)
            d["rope_scaling"] = rp
    return d


def _load_overrides(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, str):
        with open(config) as f:
            config = json.load(f)
    out = {}
    fields = set(FusionConfig.__dataclass_fields__) - {"llm", "vision"}
    for k, v in config.items():
        k2 = REF_KEYS.get(k, k)
        if k2 not in fields:
            raise ValueError(f"--config: unknown key {k!r} (FusionConfig fields: {sorted(fields)})")
        out[k2] = v
    return out


def _tower_name(vcfg, vision_dir, vjson):
    for key, known in KNOWN_TOWERS.items():
        if known == vcfg:
            return f"google/{key}"
    name = vjson.get("_name_or_path") or os.path.basename(os.path.abspath(vision_dir))
    return name


# ----------------------------------------------------------------------------- tokenizer

def extend_tokenizer(llm_dir: str, out_dir: str, log=print):
    """Copy the LLM's tokenizer with the two vision tokens added; returns (len before, new ids)."""
    files = tokenizer_files(llm_dir)
    if "tokenizer.json" in files:
        import tokenizers
        tok = tokenizers.Tokenizer.from_file(os.path.join(llm_dir, "tokenizer.json"))
        n0 = tok.get_vocab_size(with_added_tokens=True)
        missing = [t for t in NEW_TOKENS if tok.token_to_id(t) is None]
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        os.makedirs(out_dir, exist_ok=True)
        for f in files:
            if f != "tokenizer.json":
                shutil.copy2(os.path.join(llm_dir, f), os.path.join(out_dir, f))
        tok.save(os.path.join(out_dir, "tokenizer.json"))
        tc = os.path.join(out_dir, "tokenizer_config.json")
        if os.path.isfile(tc) and missing:
            with open(tc) as f:
                d = json.load(f)
            dec = d.setdefault("added_tokens_decoder", {})
            for t in missing:
                dec[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
            with open(tc, "w") as f:
                json.dump(d, f, indent=2, ensure_ascii=False)
        return n0, [tok.token_to_id(t) for t in NEW_TOKENS]
    if not has_tokenizer(llm_dir):
        return None, None
    if files:  # slow-only tokenizer (e.g. tokenizer.model): use transformers as the reference does
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(llm_dir, use_fast=False)
        n0 = len(tok)
        tok.add_tokens(list(NEW_TOKENS), special_tokens=True)
        tok.save_pretrained(out_dir)
        return n0, tok.convert_tokens_to_ids(list(NEW_TOKENS))
    return None, None


# ----------------------------------------------------------------------------- resize

def resize_rows(old: np.ndarray, tok_len: int, n_total: int) -> np.ndarray:
    """`resize_token_embeddings(n_total)` then rows [tok_len:] = mean of rows [:tok_len]
    (the reference's initialize_vision_tokenizer), in the tensor's own dtype."""
    V, D = old.shape
    keep = min(V, tok_len)
    out = np.empty((n_total, D), old.dtype)
    out[:keep] = old[:keep]
    acc = np.zeros((D,), np.float64)
    for s in range(0, keep, 8192):
        acc += old[s:min(s + 8192, keep)].astype(np.float64).sum(0)
    mean = (acc / max(keep, 1)).astype(np.float32).astype(old.dtype)
    out[keep:] = mean
    return out


# ----------------------------------------------------------------------------- main

def fresh_params(cfg: FusionConfig, names, seed: int):
    """Our model's own initialisation of `names`, computed under jit so that nothing else
    (the 8B LLM, the tower) is materialised: XLA drops the unused initialisers."""
    import jax
    from flax import nnx

    from fusion_jax.hf_io import flat_state
    from fusion_jax.model import FusionForCausalLM

    @jax.jit
    def make():
        st = flat_state(FusionForCausalLM(cfg, rngs=nnx.Rngs(seed)))
        return {n: st[n].get_value() for n in names}
    return {k: np.asarray(v) for k, v in make().items()}


def init_stage1(vision_dir: str, llm_dir: str, dst: str, *, config=None, dtype=None, seed: int = 0,
                force: bool = False, log=print):
    with open(os.path.join(vision_dir, "config.json")) as f:
        vjson = json.load(f)
    vcfg = vision_config_from_hf(vjson)
    with open(os.path.join(llm_dir, "config.json")) as f:
        ljson_raw = json.load(f)
    ljson = normalize_llm_config(ljson_raw)
    family = FAMILIES.get(ljson.get("model_type"))
    if family is None:
        raise CheckpointError(f"{llm_dir}/config.json: model_type={ljson.get('model_type')!r}, "
                              f"expected one of {sorted(FAMILIES)}")
    vreader, lreader = SafeReader(vision_dir), SafeReader(llm_dir)
    V_old = ljson["vocab_size"]
    dt_out = np_dtype(dtype) if dtype else None

    with staged_dir(dst, force) as tmp:
        tok_len, new_ids = extend_tokenizer(llm_dir, os.path.join(tmp, oio.TOKENIZER), log)
        if tok_len is None:
            tok_len = V_old
            new_ids = [V_old, V_old + 1]
            log(f"note: {llm_dir} has no tokenizer files; assuming the tokenizer has {V_old} tokens "
                f"(= vocab_size), so {NEW_TOKENS[0]}={V_old}, {NEW_TOKENS[1]}={V_old + 1}; "
                f"no tokenizer is saved")
        n_vocab = tok_len + len(NEW_TOKENS)
        if max(new_ids) != n_vocab - 1:
            raise CheckpointError(f"tokenizer: vision tokens got ids {new_ids}, expected the last two "
                                  f"of {n_vocab}")
        if tok_len > V_old:
            log(f"warning: tokenizer has {tok_len} tokens but the embedding only {V_old} rows; "
                f"rows {V_old}.. are set to the mean")
        llm = llm_config_from_hf({**ljson, "vocab_size": n_vocab}, family)
        over = _load_overrides(config)
        over.setdefault("mm_vision_tower", _tower_name(vcfg, vision_dir, vjson))
        cfg = FusionConfig(llm=llm, vision=vcfg, **over)
        log(f"vocab {V_old} -> {n_vocab} (tokenizer {tok_len} + {NEW_TOKENS[0]}, {NEW_TOKENS[1]} "
            f"at {new_ids})")

        rows = param_table(cfg)
        shapes = our_shapes(cfg)
        check_table(rows, shapes)

        # HF name -> (reader, source name) for every tensor that comes from a checkpoint
        L = vcfg.num_hidden_layers
        src = {}
        dropped_v, dropped_l = [], []
        for n0 in vreader.keys():
            # SiglipVisionModel saved by transformers 5 has no `vision_model.` prefix
            n = f"vision_model.{n0}" if n0.startswith(("embeddings.", "encoder.", "post_layernorm.",
                                                          "head.")) else n0
            if n.startswith("vision_model.") and not (
                    n.startswith("vision_model.head.") or n.startswith(f"vision_model.encoder.layers.{L - 1}.")):
                src[f"{VT}.{n[len('vision_model.'):]}"] = (vreader, n0)
            else:
                dropped_v.append(n)
        for n in lreader.keys():
            src[n] = (lreader, n)
        fresh_rows = [r for r in rows if r.ours.startswith(FRESH_PREFIXES)]
        ckpt_rows = [r for r in rows if not r.ours.startswith(FRESH_PREFIXES)]
        resized = {"model.embed_tokens.weight", "lm_head.weight"}

        def src_shape(n):
            rd, sn = src[n]
            shp = rd.shape(sn)
            return (n_vocab,) + tuple(shp[1:]) if n in resized else shp

        from fusion_jax.hf_io import check_names
        problems = check_names(ckpt_rows, src.keys(), src_shape, lambda r: per_layer_shape(r, shapes, cfg))
        problems = [p.replace(f"{VT}.", "(SigLIP) vision_model.") if p.startswith("unexpected tensor " + VT)
                    else p for p in problems]
        bad_drop = [n for n in dropped_v if not (n.startswith(("text_model.", "vision_model.head.",
                                                              f"vision_model.encoder.layers.{L - 1}."))
                                                 or n in ("logit_scale", "logit_bias"))]
        problems += [f"unexpected tensor {n} in {vision_dir}" for n in bad_drop]
        if problems:
            raise CheckpointError(f"init: {len(problems)} problem(s):\n  " + "\n  ".join(problems))

        fresh = fresh_params(cfg, [r.ours for r in fresh_rows], seed)
        total = sum(rd.nbytes(sn) for rd, sn in src.values() if rd is vreader)
        total += lreader.total_bytes + sum(a.nbytes for a in fresh.values())
        w = oio.ParamWriter(tmp)
        with progress(total, "init") as bar:
            for r in rows:
                if r in fresh_rows:
                    a = fresh[r.ours]
                    a = _cast(a, dt_out) if dt_out is not None else a
                    w.create(r.ours, a.shape, a.dtype).write(a).result()
                    bar.update(fresh[r.ours].nbytes)
                    continue
                names = r.hf_names()
                rd0, sn0 = src[names[0]]
                dt = rd0.dtype(sn0)
                dt = dt_out if (dt_out is not None and _is_float(dt)) else dt
                if r.stack:
                    arr = w.create_stacked(r.ours, shapes[r.ours], dt)
                    for i, n in enumerate(names):
                        rd, sn = src[n]
                        arr[i].write(_cast(to_ours(rd.get(sn), r.transform), dt)).result()
                        bar.update(rd.nbytes(sn))
                else:
                    rd, sn = src[names[0]]
                    t = rd.get(sn)
                    if names[0] in resized:
                        t = resize_rows(t, tok_len, n_vocab)
                    w.create(r.ours, shapes[r.ours], dt).write(_cast(to_ours(t, r.transform), dt)).result()
                    bar.update(rd.nbytes(sn))
        w.finish()
        with open(os.path.join(tmp, oio.CONFIG), "w") as f:
            f.write(cfg.to_json())
        base = {k: v for k, v in ljson.items() if k not in ("architectures", "_name_or_path", "auto_map",
                                                             "transformers_version")}
        tdt = str(dt_out) if dt_out is not None else str(ljson.get("torch_dtype") or ljson.get("dtype") or "float32")
        base.pop("dtype", None)
        base["torch_dtype"] = tdt
        with open(os.path.join(tmp, oio.HF_CONFIG), "w") as f:
            json.dump(synth_hf_config(cfg, base), f, indent=2, sort_keys=True)
        from fusion_jax.convert.hf_export import _known_tower
        if not _known_tower(cfg):
            with open(os.path.join(tmp, oio.HF_VISION_CONFIG), "w") as f:
                json.dump(vision_hf_config(cfg), f, indent=2, sort_keys=True)
    log(f"wrote {dst}: vision {vcfg.num_layers}/{L} SigLIP layers (dropped {len(dropped_v)} tensors), "
        f"LLM {llm.family} {llm.num_hidden_layers} layers, fresh {len(fresh_rows)} parameters")
    return dst
