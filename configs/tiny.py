"""tiny: CPU, fully offline. Synthesizes a QA set into WORKDIR/data on first use, trains a BPE
tokenizer on it (WORKDIR/tokenizer) and a small FUSION model for about 12 minutes on 2 cores."""
from fusion_jax.train.presets import tiny_train_config


def get_config():
    return tiny_train_config()
