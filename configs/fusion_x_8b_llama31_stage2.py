"""FUSION-X (siglip2-giant-opt-patch16-384) 8b (llama31) stage2: the reference recipe
(scripts/train/fusion-x_8b_stage2.sh).
Set --config.data.path / image_folder / tokenizer and --config.init_from (previous stage)."""
from fusion_jax.train.presets import stage_config


def get_config():
    return stage_config("8b", "stage2", x=True)
