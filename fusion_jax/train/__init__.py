"""Training: optimizer (optim), the jitted step (step), Orbax checkpoints (checkpoint), model
FLOPs (flops), data glue (data), config presets (presets) and the loop (loop). See train.py.

Evaluation entry point: `fusion_jax.train.checkpoint.load_params(workdir_or_step_dir)`.
"""
