"""Checkpoint conversion: reference HF folders <-> Orbax, stage-1 init, inspection.

CLI: `python -m fusion_jax.convert {to-orbax,to-hf,init,inspect} ...`.
"""
from __future__ import annotations


def __getattr__(name):
    if name in ("to_orbax", "to_hf"):
        from fusion_jax.convert import hf_export
        return getattr(hf_export, name)
    if name == "init_stage1":
        from fusion_jax.convert.init_stage1 import init_stage1
        return init_stage1
    if name == "inspect_dir":
        from fusion_jax.convert.inspect_ckpt import inspect_dir
        return inspect_dir
    if name == "load_orbax_model":
        from fusion_jax.convert.orbax_io import load_orbax_model
        return load_orbax_model
    raise AttributeError(name)
