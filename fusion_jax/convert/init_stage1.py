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

import numpy as np
from etils import epath

from fusion_jax import paths
from fusion_jax.config import KNOWN_TOWERS, FusionConfig, llm_config_from_hf, vision_config_from_hf
from fusion_jax.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN
from fusion_jax.convert import orbax_io as oio
from fusion_jax.convert.hf_export import (
    cast_float,
    check_table,
    known_tower,
    our_shapes,
    out_dtype,
    per_layer_shape,
    synth_hf_config,
    vision_hf_config,
    write_row,
)
from fusion_jax.convert.st_io import CheckpointError, SafeReader, np_dtype
from fusion_jax.convert.util import has_tokenizer, progress, staged_dir, tokenizer_files
from fusion_jax.param_map import VT, param_table

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
        config = json.loads(epath.Path(config).read_text())
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
    name = vjson.get("_name_or_path") or epath.Path(paths.absolute(vision_dir)).name
    return name


# ----------------------------------------------------------------------------- tokenizer

def extend_tokenizer(llm_dir: str, out_dir: str):
    """Copy the LLM's tokenizer with the two vision tokens added; returns (len before, new ids)."""
    files = tokenizer_files(llm_dir)
    if "tokenizer.json" in files:
        import tokenizers
        tok = tokenizers.Tokenizer.from_str((epath.Path(llm_dir) / "tokenizer.json").read_text())
        n0 = tok.get_vocab_size(with_added_tokens=True)
        missing = [t for t in NEW_TOKENS if tok.token_to_id(t) is None]
        tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in missing])
        out = epath.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for f in files:
            if f != "tokenizer.json":
                (epath.Path(llm_dir) / f).copy(out / f, overwrite=True)
        (out / "tokenizer.json").write_text(tok.to_str(pretty=True))
        tc = out / "tokenizer_config.json"
        if tc.is_file() and missing:
            d = json.loads(tc.read_text())
            dec = d.setdefault("added_tokens_decoder", {})
            for t in missing:
                dec[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False,
                                                "rstrip": False, "single_word": False, "special": True}
            tc.write_text(json.dumps(d, indent=2, ensure_ascii=False))
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


def _read_llm_config(llm_dir: str):
    ljson = normalize_llm_config(json.loads((epath.Path(llm_dir) / "config.json").read_text()))
    family = FAMILIES.get(ljson.get("model_type"))
    if family is None:
        raise CheckpointError(f"{llm_dir}/config.json: model_type={ljson.get('model_type')!r}, "
                              f"expected one of {sorted(FAMILIES)}")
    return ljson, family


def _vocab(llm_dir: str, tok_dir: str, v_old: int, log):
    """(tokenizer length before the vision tokens, vocab size after) with the tokenizer saved."""
    tok_len, new_ids = extend_tokenizer(llm_dir, tok_dir)
    if tok_len is None:
        tok_len, new_ids = v_old, [v_old, v_old + 1]
        log(f"note: {llm_dir} has no tokenizer files; assuming the tokenizer has {v_old} tokens "
            f"(= vocab_size), so {NEW_TOKENS[0]}={v_old}, {NEW_TOKENS[1]}={v_old + 1}; no tokenizer is saved")
    n_vocab = tok_len + len(NEW_TOKENS)
    if max(new_ids) != n_vocab - 1:
        raise CheckpointError(f"tokenizer: vision tokens got ids {new_ids}, expected the last two of {n_vocab}")
    if tok_len > v_old:
        log(f"warning: tokenizer has {tok_len} tokens but the embedding only {v_old} rows; "
            f"rows {v_old}.. are set to the mean")
    log(f"vocab {v_old} -> {n_vocab} (tokenizer {tok_len} + {NEW_TOKENS[0]}, {NEW_TOKENS[1]} at {new_ids})")
    return tok_len, n_vocab


def _sources(vreader, lreader, n_layers: int):
    """(HF name -> (reader, source name) for every checkpoint tensor we keep, dropped SigLIP names)."""
    last = f"vision_model.encoder.layers.{n_layers - 1}."
    src, dropped = {}, []
    for n0 in vreader.keys():
        # SiglipVisionModel saved by transformers 5 has no `vision_model.` prefix
        n = f"vision_model.{n0}" if n0.startswith(("embeddings.", "encoder.", "post_layernorm.", "head.")) else n0
        if n.startswith("vision_model.") and not n.startswith(("vision_model.head.", last)):
            src[f"{VT}.{n[len('vision_model.'):]}"] = (vreader, n0)
        else:
            dropped.append(n)
    src.update((n, (lreader, n)) for n in lreader.keys())
    bad = [n for n in dropped if not (n.startswith(("text_model.", "vision_model.head.", last))
                                      or n in ("logit_scale", "logit_bias"))]
    return src, dropped, bad


def _check_sources(rows, src, src_shape, shapes, cfg, bad_drop, vision_dir):
    from fusion_jax.hf_io import check_names
    problems = check_names(rows, src.keys(), src_shape, lambda r: per_layer_shape(r, shapes, cfg))
    problems = [p.replace(f"{VT}.", "(SigLIP) vision_model.") if p.startswith("unexpected tensor " + VT)
                else p for p in problems]
    problems += [f"unexpected tensor {n} in {vision_dir}" for n in bad_drop]
    if problems:
        raise CheckpointError(f"init: {len(problems)} problem(s):\n  " + "\n  ".join(problems))


def _write_hf_side_configs(tmp: str, cfg: FusionConfig, ljson: dict, dt_out):
    drop = ("architectures", "_name_or_path", "auto_map", "transformers_version", "dtype")
    base = {k: v for k, v in ljson.items() if k not in drop}
    base["torch_dtype"] = (str(dt_out) if dt_out is not None
                           else str(ljson.get("torch_dtype") or ljson.get("dtype") or "float32"))
    (epath.Path(tmp) / oio.HF_CONFIG).write_text(json.dumps(synth_hf_config(cfg, base), indent=2, sort_keys=True))
    if not known_tower(cfg):
        (epath.Path(tmp) / oio.HF_VISION_CONFIG).write_text(json.dumps(vision_hf_config(cfg), indent=2, sort_keys=True))


def init_stage1(vision_dir: str, llm_dir: str, dst: str, *, config=None, dtype=None, seed: int = 0,
                force: bool = False, log=print):
    vjson = json.loads((epath.Path(vision_dir) / "config.json").read_text())
    vcfg = vision_config_from_hf(vjson)
    ljson, family = _read_llm_config(llm_dir)
    vreader, lreader = SafeReader(vision_dir), SafeReader(llm_dir)
    dt_out = np_dtype(dtype) if dtype else None
    resized = {"model.embed_tokens.weight", "lm_head.weight"}

    with staged_dir(dst, force) as tmp:
        tok_len, n_vocab = _vocab(llm_dir, paths.join(tmp, oio.TOKENIZER), ljson["vocab_size"], log)
        llm = llm_config_from_hf({**ljson, "vocab_size": n_vocab}, family)
        over = _load_overrides(config)
        over.setdefault("mm_vision_tower", _tower_name(vcfg, vision_dir, vjson))
        cfg = FusionConfig(llm=llm, vision=vcfg, **over)
        rows, shapes = param_table(cfg), our_shapes(cfg)
        check_table(rows, shapes)
        src, dropped_v, bad_drop = _sources(vreader, lreader, vcfg.num_hidden_layers)
        fresh_rows = [r for r in rows if r.ours.startswith(FRESH_PREFIXES)]

        def src_shape(n):
            rd, sn = src[n]
            return (n_vocab,) + tuple(rd.shape(sn)[1:]) if n in resized else rd.shape(sn)

        def read(n):
            rd, sn = src[n]
            t = rd.get(sn)
            return (resize_rows(t, tok_len, n_vocab) if n in resized else t), rd.nbytes(sn)

        _check_sources([r for r in rows if r not in fresh_rows], src, src_shape, shapes, cfg, bad_drop, vision_dir)
        fresh = fresh_params(cfg, [r.ours for r in fresh_rows], seed)
        total = sum(rd.nbytes(sn) for rd, sn in src.values() if rd is vreader)
        total += lreader.total_bytes + sum(a.nbytes for a in fresh.values())
        w = oio.ParamWriter(tmp)
        with progress(total, "init") as bar:
            for r in rows:
                if r in fresh_rows:
                    a = cast_float(fresh[r.ours], dt_out, r.ours)
                    w.create(r.ours, a.shape, a.dtype).write(a).result()
                    bar.update(fresh[r.ours].nbytes)
                    continue
                rd, sn = src[r.hf_names()[0]]
                write_row(w, r, shapes[r.ours], out_dtype(rd.dtype(sn), dt_out), read, bar)
        w.finish()
        (epath.Path(tmp) / oio.CONFIG).write_text(cfg.to_json())
        _write_hf_side_configs(tmp, cfg, ljson, dt_out)
    log(f"wrote {dst}: vision {vcfg.num_layers}/{vcfg.num_hidden_layers} SigLIP layers (dropped {len(dropped_v)} "
        f"tensors), LLM {llm.family} {llm.num_hidden_layers} layers, fresh {len(fresh_rows)} parameters")
    return dst
