"""Model FLOPs per step from the config and the batch's shape bucket, and device peak FLOP/s.

Counts matmul FLOPs (2*m*n*k) of the forward pass: vision tower (4 context tiles of P tokens and
the main view of P+T tokens), mm/aux projectors, LLM decoder (+ lm_head) and the interaction
layers; training = 3x forward (backward = 2x). Rematerialisation is not counted (MFU convention).
"""
from __future__ import annotations

from fusion_jax.config import FusionConfig
from fusion_jax.constants import NUM_CROPS, NUM_TILES


def vision_flops(cfg: FusionConfig, n_tokens: int) -> float:
    v = cfg.vision
    D, F, N = v.hidden_size, v.intermediate_size, n_tokens
    per_layer = 2 * N * (4 * D * D + 2 * D * F) + 4 * N * N * D
    patch = 2 * v.num_patches * (v.num_channels * v.patch_size ** 2) * D
    return patch + v.num_layers * per_layer


def decoder_flops(cfg: FusionConfig, seq_len: int) -> float:
    c = cfg.llm
    D, F, S, hd = c.hidden_size, c.intermediate_size, seq_len, c.dim_per_head
    Hq, Hkv = c.num_attention_heads, c.num_key_value_heads
    per_layer = 2 * S * (D * (Hq + 2 * Hkv) * hd + Hq * hd * D + 3 * D * F) + 4 * S * S * Hq * hd
    return c.num_hidden_layers * per_layer + 2 * S * D * c.vocab_size


def interaction_flops(cfg: FusionConfig, query_len: int, max_questions: int) -> float:
    if not cfg.use_card:
        return 0.0
    D, w2 = cfg.llm.hidden_size, cfg.window_size ** 2
    n_lat = max_questions * query_len
    ctx = query_len * w2                       # context tokens per sample
    per_layer = (2 * n_lat * 2 * D * D         # proj_in
                 + 2 * ctx * D * D * 3         # proj_context + k, v on the context
                 + 2 * n_lat * D * D * 2       # q, o
                 + 4 * n_lat * w2 * D          # scores + weighted sum
                 + 2 * n_lat * 2 * D * D)      # MLP
    return len(cfg.interaction_after) * per_layer


def projector_flops(cfg: FusionConfig, instruct_len: int) -> float:
    Dv, D, P, T = cfg.vision.hidden_size, cfg.llm.hidden_size, cfg.vision.num_patches, instruct_len
    mm = 2 * (3 * Dv * D + D * D) * (NUM_CROPS * P + (T if cfg.use_tune else 0))
    aux = 2 * (D * Dv + Dv * Dv) * ((T if cfg.use_tune else 0) + P)
    return mm + aux


def forward_flops_per_sample(cfg: FusionConfig, *, seq_len: int, query_len: int, instruct_len: int,
                             max_questions: int) -> dict:
    P = cfg.vision.num_patches
    T = instruct_len if cfg.use_tune else 0
    parts = {
        "vision": NUM_TILES * vision_flops(cfg, P) + vision_flops(cfg, P + T),
        "projector": projector_flops(cfg, instruct_len),
        "llm": decoder_flops(cfg, seq_len),
        "interaction": interaction_flops(cfg, query_len, max_questions),
    }
    parts["total"] = sum(parts.values())
    return parts


def train_flops_per_step(cfg: FusionConfig, batch_shapes: dict) -> float:
    """3x forward FLOPs for one global batch; `batch_shapes` maps batch keys to shapes."""
    B, S = batch_shapes["token_ids"][:2]
    Lmax = batch_shapes["instruct_pos"][1]
    q = batch_shapes["latent_pos"][1] // max(Lmax, 1)
    T = batch_shapes["instructs"][1]
    f = forward_flops_per_sample(cfg, seq_len=S, query_len=q, instruct_len=T, max_questions=Lmax)
    return 3.0 * B * f["total"]


# bf16 dense peak FLOP/s per chip/GPU, by substring of jax's device_kind.
PEAK_FLOPS = (
    ("v6", 918e12), ("v5p", 459e12), ("v5 lite", 197e12), ("v5e", 197e12), ("v5", 459e12),
    ("v4", 275e12), ("v3", 123e12), ("h200", 989e12), ("h100", 989e12), ("a100", 312e12),
    ("l4", 121e12), ("a10", 125e12),
)


GiB = 1024 ** 3
HBM_BYTES = (
    ("v6", 32 * GiB), ("v5p", 95 * GiB), ("v5 lite", 16 * GiB), ("v5e", 16 * GiB), ("v5", 95 * GiB),
    ("v4", 32 * GiB), ("v3", 16 * GiB), ("h200", 141e9), ("h100", 80e9), ("a100", 80e9),
)


def hbm_bytes(device) -> float | None:
    """Accelerator memory of one device (None when unknown, e.g. CPU)."""
    kind = getattr(device, "device_kind", "").lower()
    return next((val for key, val in HBM_BYTES if key in kind), None)


def peak_flops(device=None) -> float | None:
    """Peak bf16 FLOP/s of one device (None when unknown, e.g. CPU)."""
    import jax
    d = device or jax.devices()[0]
    kind = getattr(d, "device_kind", "").lower()
    for key, val in PEAK_FLOPS:
        if key in kind:
            return val
    return None
