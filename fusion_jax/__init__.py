"""FUSION multimodal LLM in JAX / Flax NNX. Imports are lazy: `import fusion_jax` is cheap."""
from __future__ import annotations


def from_pretrained(path: str, *, mesh=None, shardings=None, dtype=None, base: str | None = None, **overrides):
    """A `FusionForCausalLM` from a converted Orbax folder (has fusion_config.json) or a
    reference HF folder (has config.json). With `mesh` alone, parameters are placed by the
    logical-axis rules (`fusion_jax.sharding.RULES`); `shardings` (dict name -> Sharding, or
    callable(name, variable)) overrides that. Orbax arrays restore directly onto their shardings.
    A folder of LoRA adapters (a LoRA run's step dir) loads onto `base` (default: its lora.base)."""
    from fusion_jax.convert.orbax_io import is_orbax_dir, load_orbax_model, read_fusion_config
    if is_orbax_dir(path) and read_fusion_config(path).lora is not None:
        from fusion_jax.lora import load_adapter_model
        return load_adapter_model(path, base, mesh=mesh, **overrides)
    if is_orbax_dir(path):
        return load_orbax_model(path, mesh=mesh, shardings=shardings, dtype=dtype, **overrides)
    from etils import epath  # a local folder or a gs:// URL
    if (epath.Path(path) / "config.json").is_file():
        from fusion_jax import hf_io
        return hf_io.from_pretrained(path, mesh=mesh, shardings=shardings, dtype=dtype, **overrides)
    raise FileNotFoundError(f"{path}: neither an Orbax folder (fusion_config.json + params/) "
                            f"nor an HF folder (config.json)")


__all__ = ["from_pretrained"]
