"""FUSION 8b (llama31) stage2 with LoRA on the LLM (docs/lora.md): adapters on every linear layer of
the decoder (dropout 0.05 on their input, the reference's lora_dropout), projectors and interaction
layers trained in full, the rest frozen in bfloat16.
Set --config.init_from (a released HF folder or a converted Orbax folder: the frozen base) and
--config.data.*. QLoRA: --config.lora.base_dtype=nf4 (or int8)."""
from fusion_jax.train.presets import stage_lora_config


def get_config():
    return stage_lora_config("8b", "stage2")
