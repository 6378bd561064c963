"""The one table between our parameter paths and the reference PyTorch/HF names.

Each row: (our dotted path, HF name with `{i}` for the layer index when our
parameter is stacked, transform). Transforms are their own inverses' partners:
  copy   - same layout;
  linear - PyTorch [out, in]  <-> ours [in, out];
  conv   - Conv2d [D, C, p, p] <-> ours [C*p*p, D] (patches flattened C-major).
Conversion in both directions and checkpoint loading all read this table.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_jax.config import FusionConfig

VT = "model.vision_tower.vision_tower.vision_model"


@dataclass(frozen=True)
class Row:
    ours: str
    hf: str
    transform: str = "copy"
    stack: int = 0          # >0: our tensor has a leading layer axis of this size

    def hf_names(self):
        return [self.hf.format(i=i) for i in range(self.stack)] if self.stack else [self.hf]


def _linear(rows, ours, hf, bias=True, stack=0):
    rows.append(Row(f"{ours}.kernel", f"{hf}.weight", "linear", stack))
    if bias:
        rows.append(Row(f"{ours}.bias", f"{hf}.bias", "copy", stack))


def _norm(rows, ours, hf, bias=True, stack=0):
    rows.append(Row(f"{ours}.weight", f"{hf}.weight", "copy", stack))
    if bias:
        rows.append(Row(f"{ours}.bias", f"{hf}.bias", "copy", stack))


def param_table(cfg: FusionConfig) -> list[Row]:
    c, v = cfg.llm, cfg.vision
    rows: list[Row] = []
    N = c.num_hidden_layers
    rows.append(Row("model.embed_tokens.weight", "model.embed_tokens.weight"))
    ly, hl = "model.layers", "model.layers.{i}"
    if c.family == "phi3":
        _linear(rows, f"{ly}.self_attn.qkv_proj", f"{hl}.self_attn.qkv_proj", False, N)
        _linear(rows, f"{ly}.mlp.gate_up_proj", f"{hl}.mlp.gate_up_proj", False, N)
    else:
        for p in ("q_proj", "k_proj", "v_proj"):
            _linear(rows, f"{ly}.self_attn.{p}", f"{hl}.self_attn.{p}", c.attention_bias, N)
        for p in ("gate_proj", "up_proj"):
            _linear(rows, f"{ly}.mlp.{p}", f"{hl}.mlp.{p}", False, N)
    _linear(rows, f"{ly}.self_attn.o_proj", f"{hl}.self_attn.o_proj", False, N)
    _linear(rows, f"{ly}.mlp.down_proj", f"{hl}.mlp.down_proj", False, N)
    _norm(rows, f"{ly}.input_layernorm", f"{hl}.input_layernorm", False, N)
    _norm(rows, f"{ly}.post_attention_layernorm", f"{hl}.post_attention_layernorm", False, N)
    _norm(rows, "model.norm", "model.norm", False)

    ot = "model.vision_tower"
    rows.append(Row(f"{ot}.embeddings.patch_embedding.kernel", f"{VT}.embeddings.patch_embedding.weight", "conv"))
    rows.append(Row(f"{ot}.embeddings.patch_embedding.bias", f"{VT}.embeddings.patch_embedding.bias"))
    rows.append(Row(f"{ot}.embeddings.position_embedding", f"{VT}.embeddings.position_embedding.weight"))
    M = v.num_layers
    ol, hv = f"{ot}.layers", f"{VT}.encoder.layers.{{i}}"
    for p in ("q_proj", "k_proj", "v_proj", "out_proj"):
        _linear(rows, f"{ol}.self_attn.{p}", f"{hv}.self_attn.{p}", True, M)
    _linear(rows, f"{ol}.mlp.fc1", f"{hv}.mlp.fc1", True, M)
    _linear(rows, f"{ol}.mlp.fc2", f"{hv}.mlp.fc2", True, M)
    _norm(rows, f"{ol}.layer_norm1", f"{hv}.layer_norm1", True, M)
    _norm(rows, f"{ol}.layer_norm2", f"{hv}.layer_norm2", True, M)
    _norm(rows, f"{ot}.post_layernorm", f"{VT}.post_layernorm")

    for proj in ("mm_projector", "aux_projector"):
        for k in range(cfg.projector_depth):
            _linear(rows, f"model.{proj}.linear_{2 * k}", f"model.{proj}.{2 * k}")

    if cfg.use_card and cfg.num_sampler_layers:  # CARD's interaction layers
        n = cfg.num_sampler_layers
        oi, hi = "model.vision_sampler_layers", "model.vision_sampler_layers.{i}.layers.0"
        _linear(rows, f"{oi}.proj_in", f"{hi}.proj_in", False, n)
        _linear(rows, f"{oi}.proj_out.linear_1", f"{hi}.proj_out.linear_1", False, n)
        _linear(rows, f"{oi}.proj_out.linear_2", f"{hi}.proj_out.linear_2", False, n)
        _norm(rows, f"{oi}.norm", f"{hi}.norm", True, n)
        for p in ("q_proj", "k_proj", "v_proj"):
            _norm(rows, f"{oi}.cross_attn.{p}.layer_norm", f"{hi}.cross_attn.{p}.0", True, n)
            _linear(rows, f"{oi}.cross_attn.{p}.linear", f"{hi}.cross_attn.{p}.1", False, n)
        _linear(rows, f"{oi}.cross_attn.o_proj", f"{hi}.cross_attn.o_proj", False, n)
        _linear(rows, f"{oi}.proj_context", f"{hi}.proj_context", False, n)

    if not c.tie_word_embeddings:
        _linear(rows, "lm_head", "lm_head", False)
    return rows


# ----------------------------------------------------------------------------- transforms

def to_ours(t: np.ndarray, transform: str) -> np.ndarray:
    if transform == "linear":
        return t.T
    if transform == "conv":
        return t.reshape(t.shape[0], -1).T
    return t


def to_hf(t: np.ndarray, transform: str, hf_shape=None) -> np.ndarray:
    if transform == "linear":
        return t.T
    if transform == "conv":
        return t.T.reshape(hf_shape)
    return t


def hf_shape(row: Row, ours_shape, cfg: FusionConfig):
    """HF shape of one (per-layer) tensor given our (per-layer) shape."""
    if row.transform == "linear":
        return tuple(ours_shape[::-1])
    if row.transform == "conv":
        v = cfg.vision
        return (ours_shape[1], v.num_channels, v.patch_size, v.patch_size)
    return tuple(ours_shape)
