"""tiny: CPU, fully offline. Synthesizes a QA set into WORKDIR/data on first use, trains a BPE
tokenizer on it (WORKDIR/tokenizer), warms the vision tower up on the scene descriptions (the
stand-in for SigLIP pretraining) and trains a small FUSION model: 11-15 minutes on 2 cores."""
from fusion_jax.train.presets import tiny_train_config


def get_config():
    return tiny_train_config()
