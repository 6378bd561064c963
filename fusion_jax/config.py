"""One config for every FUSION variant: towers, LLM families, sizes and switches.

Everything the reference hard-codes (729 vision tokens, the 13-layer split, the
3*D_vis connector width) is derived here from the tower's depth and patch grid.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

LLM_FAMILIES = ("phi3", "llama", "qwen2")
MODEL_TYPES = {"fusion_phi": "phi3", "fusion_llama": "llama", "fusion_qwen": "qwen2"}
EARLY_MASK_MODES = ("reference", "intended")


@dataclass(frozen=True)
class VisionConfig:
    """SigLIP tower as stored in the checkpoint (num_hidden_layers before the reference drops one)."""
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_attention_heads: int = 16
    num_hidden_layers: int = 27
    image_size: int = 384
    patch_size: int = 14
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def num_layers(self) -> int:
        """Layers actually run: the reference deletes the last encoder layer."""
        return self.num_hidden_layers - 1

    @property
    def split(self) -> int:
        """Early/late boundary and connector group size (13 for so400m, 19 for siglip2-giant)."""
        return self.num_layers // 2

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


KNOWN_TOWERS = {
    "siglip-so400m-patch14-384": VisionConfig(),
    "siglip2-giant-opt-patch16-384": VisionConfig(
        hidden_size=1536, intermediate_size=6144, num_attention_heads=16, num_hidden_layers=40,
        image_size=384, patch_size=16),
}


@dataclass(frozen=True)
class LLMConfig:
    family: str = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Any = None            # dict as in HF config.json (frozen as a tuple of items)
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 131072
    original_max_position_embeddings: int | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False        # qwen2: bias on q/k/v
    hidden_act: str = "silu"
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: Any = 2

    def __post_init__(self):
        if self.family not in LLM_FAMILIES:
            raise ValueError(f"llm.family={self.family!r}: expected one of {LLM_FAMILIES}")
        if isinstance(self.rope_scaling, dict):
            object.__setattr__(self, "rope_scaling", _freeze(self.rope_scaling))
        if isinstance(self.eos_token_id, list):
            object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope(self) -> dict | None:
        return None if self.rope_scaling is None else _thaw(self.rope_scaling)


def _freeze(d):
    return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in sorted(d.items()))


def _thaw(t):
    return {k: list(v) if isinstance(v, tuple) else v for k, v in t}


# LoRA defaults follow the reference's `--lora_enable`: every linear layer of the LLM's decoder
# (find_all_linear_names skips the projectors, tower, interaction layers and lm_head), and the
# projectors and interaction layers trained in full (its `non_lora_trainables`).
LORA_TARGET = r"^model/layers/(self_attn|mlp)/"
LORA_FULL_TRAIN = r"^model/(mm_projector|aux_projector|vision_sampler_layers)/"
LORA_BASE_DTYPES = ("bfloat16", "float32", "nf4", "int8")


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters (fusion_jax.lora). `target` / `full_train`: regexes (re.search) over module
    paths such as `model/layers/self_attn/qkv_proj`. `base_dtype`: how the frozen base is held
    (nf4 / int8: QLoRA through qwix's QArray). `base`: the folder the base weights come from
    (set from `init_from`; "" = the seeded random init). `dropout`: peft's lora_dropout, on the adapter
    branch's input in the train step only (its keys from the train state's rng)."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = LORA_TARGET
    full_train: str = LORA_FULL_TRAIN
    base_dtype: str = "bfloat16"
    base: str = ""

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank > 0):
            raise ValueError(f"lora.rank={self.rank!r}: expected an integer > 0")
        if self.base_dtype not in LORA_BASE_DTYPES:
            raise ValueError(f"lora.base_dtype={self.base_dtype!r}: expected one of {LORA_BASE_DTYPES}")
        if not (isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0):
            raise ValueError(f"lora.dropout={self.dropout!r}: expected a rate in [0, 1)")
        for k in ("target", "full_train"):
            try:
                re.compile(getattr(self, k))
            except re.error as e:
                raise ValueError(f"lora.{k}: bad regular expression {getattr(self, k)!r} ({e})") from e

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


# Fields of older fusion_config.json files that no longer exist (retired experiments, off by default).
RETIRED_FIELDS = ("ce_turn_power", "vision_posemb_init")


@dataclass(frozen=True)
class FusionConfig:
    llm: LLMConfig = field(default_factory=LLMConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    mm_projector_type: str = "mlp2x_gelu"
    # CARD's interaction layers: the reference's `*_vision_sampler_layers` keys, spelled as in
    # existing fusion_config.json files
    num_sampler_layers: int = 10
    sampler_start: int = 0
    sampler_stride: int = 3
    sampler_heads: int = 16
    window_size: int = 3
    query_len: tuple[int, ...] = (4, 16, 36, 64, 144)
    dsm_weight: float = 0.1
    early_mask_mode: str = "reference"
    use_tune: bool = True
    use_card: bool = True
    use_dsm: bool = True
    image_token_grid: int | None = None      # FUSION-L: resize image tokens to this grid (12)
    max_length: int | None = 4096            # tokenizer_model_max_length
    mm_vision_tower: str = "google/siglip-so400m-patch14-384"
    # numerics / performance
    compute_dtype: str = "float32"           # "bfloat16" for training
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat_policy: str = "none"               # decoder layers: fusion_jax.nn.REMAT_POLICIES
    vision_remat_policy: str | None = None   # vision layers; None = same as remat_policy
    attention_impl: str = "auto"             # auto | xla | loop | chunked | splash | cudnn (fusion_jax.attention)
    loss_chunk: int = 256                    # train-step CE: head + CE over chunks of target rows
    # CPU choices (the tiny preset and the `small` benchmark). Both change the program per device, so
    # keep them off on a multi-device mesh: a 2-D matmul merges the sharded batch axis (XLA:CPU's SPMD
    # collectives deadlocked on it), and skipped chunks make devices branch around the head's collectives.
    linear_2d: bool = False                  # Linear runs one 2-D matmul: XLA:CPU's weight grad ~2x faster
    ce_skip_empty_chunks: bool = False       # chunked CE skips target-free chunks at run time (lax.cond)
    # init only (no effect on loaded weights): std of the token embedding. HF's 0.02 suits a
    # pretrained LLM; a tiny model trained from scratch needs word embeddings on the scale of
    # the image features (~1), or the question's words drown next to them (docs/ablations.md).
    embed_init_std: float = 0.02
    lora: LoraConfig | None = None           # low-rank adapters on a frozen base (fusion_jax.lora)

    def __post_init__(self):
        if self.early_mask_mode not in EARLY_MASK_MODES:
            raise ValueError(f"early_mask_mode={self.early_mask_mode!r}: expected {EARLY_MASK_MODES}")
        if isinstance(self.lora, dict):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if isinstance(self.query_len, (int, str)):
            object.__setattr__(self, "query_len", parse_query_len(self.query_len))
        for q in self.query_len:
            if math.isqrt(q) ** 2 != q:
                raise ValueError(f"query_len {q} is not a perfect square")
        from fusion_jax.attention import IMPLS
        if self.attention_impl not in IMPLS:
            raise ValueError(f"attention_impl={self.attention_impl!r}: expected one of {', '.join(IMPLS)}")
        _ = self.projector_depth  # raises on an unknown projector type
        if not (math.isfinite(self.embed_init_std) and self.embed_init_std > 0):
            raise ValueError(f"embed_init_std={self.embed_init_std!r}: expected a finite number > 0")
        if self.llm.hidden_size % self.sampler_heads:
            raise ValueError(f"llm.hidden_size {self.llm.hidden_size} not divisible by "
                             f"sampler_heads {self.sampler_heads}")

    @property
    def projector_depth(self) -> int:
        m = re.fullmatch(r"mlp(\d+)x_gelu", self.mm_projector_type)
        if self.mm_projector_type == "linear":
            return 1
        if not m:
            raise ValueError(f"mm_projector_type={self.mm_projector_type!r}: expected 'linear' or 'mlp{{N}}x_gelu'")
        return int(m.group(1))

    @property
    def interaction_after(self) -> tuple[int, ...]:
        """Decoder layers followed by an interaction layer (the reference's list, deduplicated)."""
        if not self.use_card:
            return ()
        idx = (self.sampler_start + k * self.sampler_stride for k in range(self.num_sampler_layers))
        return tuple(dict.fromkeys(i for i in idx if i < self.llm.num_hidden_layers))

    @property
    def num_image_tokens(self) -> int:
        g = self.image_token_grid or self.vision.grid
        return g * g

    def replace(self, **kw) -> FusionConfig:
        return dataclasses.replace(self, **kw)

    # ----------------------------------------------------------------- serialisation
    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["llm"]["rope_scaling"] = self.llm.rope
        d["query_len"] = list(self.query_len)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FusionConfig:
        d = {k: v for k, v in d.items() if k not in RETIRED_FIELDS}
        llm = LLMConfig(**d.pop("llm"))
        vision = VisionConfig(**d.pop("vision"))
        if "query_len" in d:
            d["query_len"] = tuple(d["query_len"])
        return cls(llm=llm, vision=vision, **d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def tiny_config(family: str = "phi3", **overrides) -> FusionConfig:
    """A few-hundred-K-parameter model for tests, demos and CPU runs."""
    rope = None
    if family == "phi3":
        rope = {"type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0],
                "long_factor": [1.0, 1.2, 1.5, 2.0, 4.0, 8.0, 16.0, 32.0]}
    elif family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    llm = LLMConfig(family=family, vocab_size=256, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=4 if family == "phi3" else 2, rms_norm_eps=1e-5,
                    rope_scaling=rope, max_position_embeddings=131072 if family == "phi3" else 2048,
                    original_max_position_embeddings=4096 if family == "phi3" else None,
                    tie_word_embeddings=(family == "qwen2"), attention_bias=(family == "qwen2"))
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                          num_hidden_layers=5, image_size=32, patch_size=4)
    cfg = FusionConfig(llm=llm, vision=vision, num_sampler_layers=2, sampler_start=0,
                       sampler_stride=2, query_len=(4, 16), max_length=512,
                       mm_vision_tower="tiny-siglip")
    return cfg.replace(**overrides) if overrides else cfg


def parse_query_len(q) -> tuple[int, ...]:
    if isinstance(q, int):
        return (q,)
    if isinstance(q, str):
        return tuple(int(x) for x in q.split(",") if x.strip())
    return tuple(int(x) for x in q)


def vision_config_from_hf(d: dict) -> VisionConfig:
    if d.get("model_type") == "siglip" and "vision_config" in d:
        d = d["vision_config"]
    names = {f.name for f in dataclasses.fields(VisionConfig)}
    return VisionConfig(**{k: d[k] for k in names if k in d})


def tower_from_name(name: str) -> VisionConfig:
    for key, cfg in KNOWN_TOWERS.items():
        if key in name:
            return cfg
    raise ValueError(f"unknown vision tower {name!r}: add vision_config.json beside config.json "
                     f"(known: {sorted(KNOWN_TOWERS)})")


def llm_config_from_hf(d: dict, family: str) -> LLMConfig:
    rope = d.get("rope_scaling")
    rp = d.get("rope_parameters") if isinstance(d.get("rope_parameters"), dict) else {}
    if rope is None and rp.get("rope_type", rp.get("type", "default")) != "default":
        rope = rp  # transformers >= 5 spelling
    if isinstance(rope, dict):
        rope = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    kw = dict(
        family=family,
        vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
        head_dim=d.get("head_dim"), rms_norm_eps=d.get("rms_norm_eps", 1e-6),
        rope_theta=d.get("rope_theta", rp.get("rope_theta", 10000.0)), rope_scaling=rope,
        partial_rotary_factor=d.get("partial_rotary_factor") or rp.get("partial_rotary_factor", 1.0),
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        original_max_position_embeddings=d.get("original_max_position_embeddings"),
        tie_word_embeddings=d.get("tie_word_embeddings", False),
        attention_bias=d.get("attention_bias", family == "qwen2"),
        hidden_act=d.get("hidden_act", "silu"),
        pad_token_id=d.get("pad_token_id"), bos_token_id=d.get("bos_token_id"),
        eos_token_id=d.get("eos_token_id"),
    )
    if family == "qwen2":
        kw["attention_bias"] = True
    return LLMConfig(**kw)


def from_hf_config(d: dict, vision: VisionConfig | None = None) -> FusionConfig:
    """FusionConfig from a reference `config.json` (model_type fusion_phi/llama/qwen)."""
    mt = d.get("model_type")
    if mt not in MODEL_TYPES:
        raise ValueError(f"config.json model_type={mt!r}: expected one of {sorted(MODEL_TYPES)}")
    llm = llm_config_from_hf(d, MODEL_TYPES[mt])
    if mt == "fusion_qwen":  # FusionQwenForCausalLM sets config.rope_scaling = None
        llm = dataclasses.replace(llm, rope_scaling=None)
    tower = d.get("mm_vision_tower", "")
    if vision is None:
        vision = tower_from_name(tower)
    return FusionConfig(
        llm=llm, vision=vision,
        mm_projector_type=d.get("mm_projector_type", "mlp2x_gelu"),
        num_sampler_layers=d.get("num_of_vision_sampler_layers", 10),
        sampler_start=d.get("start_of_vision_sampler_layers", 0),
        sampler_stride=d.get("stride_of_vision_sampler_layers", 3),
        window_size=d.get("window_size", 3),
        query_len=parse_query_len(d.get("query_len", "4,16,36,64,144")),
        max_length=d.get("tokenizer_model_max_length"),
        mm_vision_tower=tower,
    )
