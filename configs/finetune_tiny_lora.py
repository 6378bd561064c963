"""tiny LoRA fine-tuning (docs/lora.md): adapters on a trained configs/tiny.py checkpoint, learning new data
(the full-difficulty synthesized set, seed 7). Keep the base's vocabulary: copy its tokenizer first.

    mkdir -p W && cp -r BASE/tokenizer W/
    python train.py --config configs/finetune_tiny_lora.py --workdir W --config.init_from=BASE
"""
from fusion_jax.train.presets import lora_config, tiny_train_config


def get_config():
    c = tiny_train_config()
    c.total_steps = 300
    c.checkpoint_every = 300
    c.vision_warmup.steps = 0                  # the base's tower is trained already
    c.data.synth.update(seed=7, num=2000, difficulty="full")
    # no dropout: the measured run (docs/lora.md) used none; 1.3 M parameters on 1800 samples underfit
    c.lora = lora_config(rank=8, alpha=16.0, dropout=0.0, base_dtype="float32")
    return c
