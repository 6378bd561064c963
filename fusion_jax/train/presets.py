"""Model presets and the ml_collections train configs (configs/*.py are thin wrappers).

Recipe (reference scripts/train/*.sh, 32 GPUs): stage 1: lr 2e-5 (vision tower same), global
batch 256 (8 x 1 x 32), max len 2048; stage 1.5: lr 2e-5 / vision 2e-6, global 128 (2 x 2 x 32),
len 4096; stage 2: lr 1e-5 / vision 1e-6, global 128 (3B: 2 x 2 x 32, 8B: 4 x 1 x 32), len 4096.
All: AdamW, weight decay 0, warmup 3% then cosine, max grad norm 1.0 (HF default), bf16,
gradient checkpointing, one epoch, full fine-tuning with the vision tower unfrozen.
"""
from __future__ import annotations

import dataclasses

import ml_collections as mlc

from fusion_jax.config import KNOWN_TOWERS, FusionConfig, LLMConfig, tiny_config

# Vocab = the base tokenizer's length + <vision_start>, <vision_end> (initialize_vision_tokenizer
# resizes the embeddings to len(tokenizer)): Phi-3.5-mini 32011 + 2, Llama-3.1 128256 + 2.
PHI35_VOCAB = 32011 + 2
LLAMA31_VOCAB = 128256 + 2

PHI35_ROPE = None  # the real long-rope factors come with --config.init_from (fusion_config.json)
LLAMA31_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def model_preset(name: str, tower: str = "siglip-so400m-patch14-384") -> FusionConfig:
    if tower not in KNOWN_TOWERS:
        raise ValueError(f"config.model.vision_tower={tower!r}: expected one of {sorted(KNOWN_TOWERS)}")
    vision = KNOWN_TOWERS[tower]
    if name == "phi35_3b":
        llm = LLMConfig(family="phi3", vocab_size=PHI35_VOCAB, hidden_size=3072, intermediate_size=8192,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=PHI35_ROPE,
                        max_position_embeddings=131072, original_max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=32000, pad_token_id=32000)
    elif name == "llama31_8b":
        llm = LLMConfig(family="llama", vocab_size=LLAMA31_VOCAB, hidden_size=4096, intermediate_size=14336,
                        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=LLAMA31_ROPE,
                        max_position_embeddings=131072, bos_token_id=128000,
                        eos_token_id=(128001, 128008, 128009), pad_token_id=None)
    else:
        raise ValueError(f"config.model.preset={name!r}: expected tiny | phi35_3b | llama31_8b")
    return FusionConfig(llm=llm, vision=vision, mm_vision_tower=f"google/{tower}")


def base_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0
    c.total_steps = -1            # -1: one epoch of the data (global batches)
    c.log_every = 10
    c.checkpoint_every = 1000
    c.keep_checkpoints = 2          # >= 1; 2 leaves a fallback when the latest cannot be restored
    c.allow_config_change = False   # resume into a workdir whose saved config differs (logged)
    c.async_checkpoint = True
    c.init_from = ""              # converted Orbax folder, HF folder, or a train workdir / step dir
    c.mesh = (-1, 1, 1)           # (data, fsdp, tensor); -1 fills
    c.global_batch_size = 256
    c.grad_accum = 1
    c.tensorboard = True
    c.stop_after = -1             # stop (with a checkpoint) after this many steps of this run; testing
    c.optim = mlc.ConfigDict(dict(
        lr=2e-5, vision_lr=mlc.FieldReference(None, field_type=float), warmup_ratio=0.03,
        schedule="cosine", weight_decay=0.0, grad_clip=1.0, b1=0.9, b2=0.999, eps=1e-8, freeze="",
        max_nonfinite_steps=0,    # > 0: skip up to that many consecutive NaN/Inf steps (0: stop at the first)
        host_offload="auto"))     # optimizer state in host memory: auto (state > 40% of HBM) | on | off
    # preset / vision_tower / tiny pick and size the model; every other key is a FusionConfig field
    c.model = mlc.ConfigDict(dict(
        preset="phi35_3b", vision_tower="siglip-so400m-patch14-384",
        compute_dtype="bfloat16", param_dtype="float32", scan_layers=True,
        remat_policy="full",                      # decoder layers
        vision_remat_policy="full",               # vision tower layers
        use_tune=True, use_card=True, use_dsm=True, query_len="4,16,36,64,144",
        early_mask_mode="reference",
        image_token_grid=mlc.FieldReference(None, field_type=int),  # FUSION-L: 12; None: the tower's grid
        linear_2d=False, ce_skip_empty_chunks=False, attention_impl="auto"))  # CPU choices: tiny sets them
    c.data = mlc.ConfigDict(dict(
        source="path",            # "path" (JSON/YAML mixture or prepared dir) | "synth" (tiny only)
        path="", image_folder="", tokenizer="", template="phi_3",
        max_length=2048, max_questions=16, max_instruct_len=512,
        seq_buckets=(1024, 2048), instruct_buckets=(), order="length_grouped", worker_count=4,
        max_skip_fraction=0.5))   # stop when more records than this share were skipped (bad image_folder)
    return c


STAGES = {
    # stage: (lr, vision_lr, global batch, grad accum {3b, 8b}, max len, yaml)
    "stage1": (2e-5, None, 256, {"3b": 1, "8b": 1}, 2048, "stage1.yaml"),
    "stage1_5": (2e-5, 2e-6, 128, {"3b": 2, "8b": 2}, 4096, "stage1.5.yaml"),
    "stage2": (1e-5, 1e-6, 128, {"3b": 2, "8b": 1}, 4096, "stage2.yaml"),
}


def stage_config(size: str, stage: str, x: bool = False) -> mlc.ConfigDict:
    """`size` '3b' (Phi-3.5-mini) or '8b' (Llama-3.1-8B); `x`: FUSION-X (siglip2-giant tower)."""
    c = base_config()
    lr, vlr, gb, acc, max_len, yaml = STAGES[stage]
    c.optim.lr = lr
    c.optim.vision_lr = vlr
    c.global_batch_size = gb
    c.grad_accum = acc[size]
    c.model.preset = "phi35_3b" if size == "3b" else "llama31_8b"
    c.model.vision_tower = "siglip2-giant-opt-patch16-384" if x else "siglip-so400m-patch14-384"
    c.data.template = "phi_3" if size == "3b" else "llama_3"
    c.data.max_length = max_len
    c.data.seq_buckets = (1024, 2048) if max_len == 2048 else (1024, 2048, 3072, 4096)
    c.data.path = f"playground/train/yaml/{yaml}"
    c.data.image_folder = "playground/train/images"
    c.checkpoint_every = 1000
    # FSDP over every device (ZeRO-3 like the reference's DeepSpeed runs): 5-10B params with
    # fp32 AdamW state (16 B/param) cannot be replicated on any current accelerator.
    c.mesh = (1, -1, 1)
    return c


def lora_config(**kw) -> mlc.ConfigDict:
    """config.lora (fusion_jax.config.LoraConfig's keys; rank 0 = off). Defaults: the reference's
    `--lora_enable` targets (the LLM's linear layers) and non_lora_trainables (projectors, interaction
    layers); rank / alpha as LLaVA's finetune_lora.sh (128 / 256); dropout 0.05, the reference's
    `lora_dropout` (which that script keeps)."""
    from fusion_jax.config import LORA_FULL_TRAIN, LORA_TARGET
    c = mlc.ConfigDict(dict(rank=128, alpha=256.0, dropout=0.05, target=LORA_TARGET, full_train=LORA_FULL_TRAIN,
                            base_dtype="bfloat16"))
    c.update(kw)
    return c


def stage_lora_config(size: str, stage: str = "stage2", base_dtype: str = "bfloat16") -> mlc.ConfigDict:
    """A stage recipe fine-tuned with LoRA: the LLM frozen under adapters, lr 2e-4 (LLaVA's LoRA
    recipe), the vision tower frozen too (set config.lora.full_train to train it in full)."""
    c = stage_config(size, stage)
    c.lora = lora_config(base_dtype=base_dtype)
    c.optim.lr = 2e-4
    c.optim.vision_lr = None
    return c


def tiny_train_config(**model_overrides) -> mlc.ConfigDict:
    """CPU, offline: synthesized data, a tiny model; 11-15 minutes on 2 cores (docs/ablations.md)."""
    c = base_config()
    c.total_steps = 1100                # 11-15 min on 2 cores incl. synthesis (docs/ablations.md)
    c.log_every = 25
    c.checkpoint_every = 100
    c.global_batch_size = 16
    c.optim.lr = 2e-3
    c.optim.vision_lr = 2e-4              # one tenth, as FUSION's stage 2; 2e-3 erases the warm start
    c.optim.warmup_ratio = 0.03
    # the stand-in for SigLIP pretraining (tower_warmup.py); 900 text images alone do not teach it to read
    c.vision_warmup = mlc.ConfigDict(dict(steps=600, lr=2e-3, batch_size=16, text_images=6000))
    c.model.preset = "tiny"
    c.model.compute_dtype = "float32"
    c.model.remat_policy = "none"
    c.model.vision_remat_policy = "none"
    c.model.scan_layers = False           # XLA:CPU runs the scan's backward ~2x slower than unrolled
    c.model.query_len = "4"
    c.model.linear_2d = True              # one 2-D matmul per nn.Linear: faster on XLA:CPU
    c.model.ce_skip_empty_chunks = True   # skip CE chunks without targets (unsharded only)
    c.model.attention_impl = "loop"       # the batched form below 256 queries
    c.model.num_sampler_layers = 2        # CARD: an interaction layer after decoder layers 0 and 2
    c.model.sampler_stride = 2
    c.model.sampler_heads = 4
    c.model.embed_init_std = 1.0          # words on the scale of the image features (docs/ablations.md)
    c.model.update(model_overrides)
    # the LLM's and the tower's sizes (every other model setting is a FusionConfig field above)
    c.model.tiny = mlc.ConfigDict(dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
        vision_hidden_size=64, vision_intermediate_size=128, vision_layers=5, vision_heads=4,
        image_size=32, patch_size=4))
    c.data.source = "synth"
    c.data.template = "phi_3"
    c.data.max_length = 192
    c.data.seq_buckets = (160, 192)       # spliced length: mean 115, p99 155 with this tokenizer
    c.data.instruct_buckets = (64,)
    c.data.max_instruct_len = 64
    c.data.max_questions = 2
    c.data.order = "shuffle"
    c.data.worker_count = 0
    # fusion_jax.synth.SynthConfig; half the conversations end by listing every object
    c.data.synth = mlc.ConfigDict(dict(num=6000, seed=0, image_size=64, workers=2, heldout_fraction=0.1,
                                       difficulty="easy", describe_fraction=0.5))
    c.data.tokenizer_vocab_size = 512     # saturates (~475): every word and answer one token
    # after training, answer the held-out split (WORKDIR/data/eval) and print accuracy per kind
    c.heldout_eval = mlc.ConfigDict(dict(batch_size=32, max_new_tokens=32))
    return c


def tiny_model_config(tc, vocab_size: int) -> FusionConfig:
    """The tiny FusionConfig's LLM and tower: sizes from config.model.tiny, vocab from the tokenizer."""
    t = tc.model.tiny
    base = tiny_config("phi3")
    llm = dataclasses.replace(base.llm, vocab_size=int(vocab_size), hidden_size=t.hidden_size,
                              intermediate_size=t.intermediate_size, num_hidden_layers=t.num_hidden_layers,
                              num_attention_heads=t.num_attention_heads,
                              num_key_value_heads=t.num_attention_heads, rope_scaling=None,
                              max_position_embeddings=4096, original_max_position_embeddings=None)
    vision = dataclasses.replace(base.vision, hidden_size=t.vision_hidden_size,
                                 intermediate_size=t.vision_intermediate_size,
                                 num_hidden_layers=t.vision_layers, num_attention_heads=t.vision_heads,
                                 image_size=t.image_size, patch_size=t.patch_size)
    return base.replace(llm=llm, vision=vision)
