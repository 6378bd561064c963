import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
# XLA:CPU runs collective thunks on its intra-op pool (NPROC threads, default max(cores, devices)).
# A device blocked in a rendezvous holds a pool thread; with 8 fake devices on 2 cores the pool
# could fill with waiters while a peer still needed a thread, and XLA aborted after its 40 s
# rendezvous timeout (tests/test_train.py 2x2x2 mesh, ~2 of 3 runs). More threads than waiters.
os.environ.setdefault("NPROC", "32")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib

import jax
import pytest

# Parity tests compare float32 numbers; XLA's default CPU/TPU matmul precision may be lower.
jax.config.update("jax_default_matmul_precision", "highest")

# Cases recorded from the official PyTorch code (README.md there lists every quirk); they ship with
# the tests, so a missing one is a broken checkout, not a reason to skip.
GOLDEN = pathlib.Path(__file__).resolve().parent / "golden" / "fusion_ref"


@pytest.fixture(scope="session")
def golden_dir():
    missing = [c for c in ("phi3_train", "phi3_generate") if not (GOLDEN / c / "outputs.npz").is_file()]
    if missing:
        pytest.fail(f"golden fixtures missing under {GOLDEN}: {missing}")
    return GOLDEN


@pytest.fixture(scope="module")
def jax_compile_cache(tmp_path_factory):
    """JAX's persistent compilation cache for one test module. A program compiled once is reused by
    a later jit of it in this process (e.g. a second `loop.train`) and by subprocesses started with
    the returned environment entries (a CLI run loads what the in-process reference compiled; the
    matmul precision above is part of the program, so it goes along)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    path = str(tmp_path_factory.mktemp("jax_cache"))
    keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
    old = {k: getattr(jax.config, k) for k in keys}
    jax.config.update(keys[0], path)
    jax.config.update(keys[1], 0)
    cc.reset_cache()
    yield {"JAX_COMPILATION_CACHE_DIR": path, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_DEFAULT_MATMUL_PRECISION": "highest"}
    for k, v in old.items():
        jax.config.update(k, v)
    cc.reset_cache()
