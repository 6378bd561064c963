"""FUSION multimodal LLM in JAX / Flax NNX. Imports are lazy: `import fusion_jax` is cheap."""
from __future__ import annotations

import os


def from_pretrained(path: str, *, mesh=None, shardings=None, dtype=None, **overrides):
    """A `FusionForCausalLM` from a converted Orbax folder (has fusion_config.json) or a
    reference HF folder (has config.json). With `mesh` alone, parameters are placed by the
    logical-axis rules (`fusion_jax.sharding.RULES`); `shardings` (dict name -> Sharding, or
    callable(name, variable)) overrides that. Orbax arrays restore directly onto their shardings."""
    from fusion_jax.convert.orbax_io import is_orbax_dir, load_orbax_model
    if mesh is not None and shardings is None:
        shardings = _rule_shardings(mesh)
    if is_orbax_dir(path):
        return load_orbax_model(path, mesh=mesh, shardings=shardings, dtype=dtype, **overrides)
    if os.path.isfile(os.path.join(path, "config.json")):
        import jax

        from fusion_jax import hf_io
        from fusion_jax.convert.st_io import np_dtype
        cfg = hf_io.read_config(path, **overrides)
        model = hf_io.load_weights(hf_io.abstract_model(cfg), hf_io.TensorReader(path),
                                   dtype=np_dtype(dtype) if dtype else None)
        if mesh is not None or shardings is not None:
            from jax.sharding import NamedSharding, PartitionSpec
            for name, var in hf_io.flat_state(model).items():
                sh = (shardings(name, var) if callable(shardings) else
                      shardings[name] if isinstance(shardings, dict) else NamedSharding(mesh, PartitionSpec()))
                var.set_value(jax.device_put(var.get_value(), sh))
        return model
    raise FileNotFoundError(f"{path}: neither an Orbax folder (fusion_config.json + params/) "
                            f"nor an HF folder (config.json)")


def _rule_shardings(mesh):
    """Place each parameter by its logical axes and `fusion_jax.sharding.RULES`."""
    from jax.sharding import NamedSharding

    from fusion_jax.sharding import spec_for

    def place(name, var):
        axes = var.get_metadata().get("logical_axes")
        return NamedSharding(mesh, spec_for(axes, var.get_value().shape, mesh))
    return place


__all__ = ["from_pretrained"]
