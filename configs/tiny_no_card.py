"""tiny ablation: use_card=False (otherwise identical to configs/tiny.py)."""
from fusion_jax.train.presets import tiny_train_config


def get_config():
    return tiny_train_config(use_card=False)
