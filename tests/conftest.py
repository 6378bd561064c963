import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

# Parity tests compare float32 numbers; XLA's default CPU/TPU matmul precision may be lower.
jax.config.update("jax_default_matmul_precision", "highest")

GOLDEN = pathlib.Path(__file__).resolve().parents[2] / "shared" / "golden" / "fusion_ref"


@pytest.fixture(scope="session")
def golden_dir():
    if not GOLDEN.exists():
        pytest.skip(f"golden data not found at {GOLDEN}")
    return GOLDEN
