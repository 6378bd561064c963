"""FUSION 8b (llama31) stage2 with QLoRA (docs/lora.md): configs/fusion_8b_llama31_stage2_lora.py with the
frozen LLM linear layers held as nf4 (qwix QArray, one scale per output channel and 64 inputs)."""
from fusion_jax.train.presets import stage_lora_config


def get_config():
    return stage_lora_config("8b", "stage2", base_dtype="nf4")
