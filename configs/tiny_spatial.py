"""tiny, stripped to spatial relations: the one setting where the tiny model learns both axes
(held-out 0.82 and 0.91 in two seeds, 600 questions; docs/ablations.md, session 17). A diagnostic:
spatial samples only (one turn, short forms), TUNE, CARD and DSM off, the warmed-up tower frozen
(side and dense tags), and a constant LLM learning rate of 3e-4 (the cosine 2e-3 schedule escapes
the plateau on one axis at best, late in its tail)."""
from fusion_jax.train.presets import tiny_train_config


def get_config():
    c = tiny_train_config(use_tune=False, use_card=False, use_dsm=False)
    c.vision_warmup.side_tags = True
    c.vision_warmup.dense_tags = True
    c.optim.freeze = "^model/vision_tower/"
    c.optim.lr = 3e-4
    c.optim.schedule = "constant"
    c.data.synth_kinds = ("spatial",)
    c.data.synth_describe_fraction = 0.0
    c.data.synth_max_turns = 1
    c.data.synth_mc_fraction = 0.0
    c.data.synth_spatial_yesno_fraction = 0.0
    return c
