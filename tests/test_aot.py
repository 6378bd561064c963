"""fusion_jax.tools.aot_compile on a micro config: the real train step compiled ahead of time for
the local CPU backend (always) and for a small TPU topology (when libtpu is installed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from fusion_jax.tools import aot_compile as A

MICRO = textwrap.dedent("""
    from fusion_jax.train.presets import tiny_train_config

    def get_config():
        tc = tiny_train_config()
        tc.global_batch_size = 4
        tc.mesh = (-1, 1, 1)
        tc.data.max_length = 96
        tc.data.max_questions = 1
        tc.data.max_instruct_len = 16
        tc.model.scan_layers = True
        tc.model.remat_policy = "full"
        tc.model.vision_remat_policy = "full"
        tc.model.linear_2d = False             # the single-device CPU choices are off on a mesh
        tc.model.ce_skip_empty_chunks = False
        tc.model.attention_impl = "auto"
        tc.model.tiny.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, vision_hidden_size=16, vision_intermediate_size=32,
                                  vision_layers=3, vision_heads=2, image_size=16, patch_size=4))
        tc.model.update(dict(num_sampler_layers=1, sampler_stride=2, sampler_heads=2))
        return tc
""")


@pytest.fixture
def micro_cfg(tmp_path):
    p = tmp_path / "micro.py"
    p.write_text(MICRO)
    return str(p)


def _check_report(r, n_dev):
    assert r["status"] == "ok" and r["fits"] is True
    assert r["num_devices"] == n_dev and r["global_batch"] == 4 and r["seq_len"] == 96
    assert r["remat_policy"] == "full" and r["scan_layers"] is True
    for k in ("argument_bytes", "temp_bytes", "output_bytes", "bytes_per_device"):
        assert isinstance(r[k], int) and r[k] >= 0
    # donated state: outputs alias the arguments, so the total is not their sum
    assert r["bytes_per_device"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                                     + r["temp_bytes"] + r["code_bytes"])
    assert r["argument_bytes"] > 0 and r["alias_bytes"] > 0
    assert r["flops_per_step"] > 0 and r["model_flops_per_step"] > 0
    assert r["compile_s"] > 0
    assert isinstance(r["peak_memory_bytes"], int) and isinstance(r["host_temp_bytes"], int)


def test_cpu_compile_reports_memory_and_flops(micro_cfg, capsys):
    rc = A.main(["--config", micro_cfg, "--topology", "cpu:2", "--mesh", "1,2,1", "--json"])
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    assert rc == 0
    _check_report(r, 2)
    assert r["mesh"] == {"data": 1, "fsdp": 2, "tensor": 1}
    assert r["attention_impl"] == "auto" and r["attention_kernel"] in ("xla", "chunked")
    assert r["fits_by"] == "memory_analysis"
    for k in ("fits", "bytes_per_device", "hbm_bytes_per_device", "flops_per_step", "compile_s"):
        assert k in r
    assert r["command"].startswith("python -m fusion_jax.tools.aot_compile --config")


def test_exit_status_and_errors(micro_cfg, capsys, monkeypatch):
    rc = A.main(["--config", "configs/does_not_exist.py", "--topology", "cpu", "--json"])
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 2 and r["fits"] is False and "no such file" in r["error"]
    base = {"topology": "cpu", "num_devices": 1, "device_kind": "cpu", "mesh": {}, "global_batch": 4,
            "seq_len": 96, "grad_accum": 1, "query_len": 4, "remat_policy": "full",
            "vision_remat_policy": "full", "compute_dtype": "float32", "setup_s": 0, "compile_s": 1.0,
            "hbm_bytes_per_device": 16 << 30}
    over = dict(base, fits=False, status="oom", bytes_per_device=None, error="RESOURCE_EXHAUSTED: ...")
    monkeypatch.setattr(A, "aot_compile", lambda *a, **k: dict(over))
    assert A.main(["--config", micro_cfg, "--topology", "cpu", "--json"]) == 1
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fits"] is False


def test_parsers():
    used, cap = A.parse_oom("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
                            "HLO temporaries (388.30G) exceeds available HBM (95.74G).")
    assert round(used / 2 ** 30, 2) == 388.30 and round(cap / 2 ** 30, 2) == 95.74
    used, cap = A.parse_oom("Ran out of memory in memory space hbm. Used 20.5G of 15.75G hbm.")
    assert round(used / 2 ** 30, 1) == 20.5
    assert A.parse_oom("something else") is None
    assert A.parse_mesh("1,-1,1") == (1, -1, 1) and A.parse_mesh("(2, 2, 2)") == (2, 2, 2)


def _has_libtpu():
    try:
        import libtpu  # noqa: F401
        return True
    except ImportError:
        return False


@pytest.mark.skipif(not _has_libtpu() or not os.environ.get("FUSION_TEST_TPU_AOT"),
                    reason="needs libtpu (pip install 'jax[tpu]') and FUSION_TEST_TPU_AOT=1 (~1-2 min compile)")
def test_tpu_topology_compile(micro_cfg):
    tc = A.load_train_config(micro_cfg)
    r = A.aot_compile(tc, "v5e:2x2", mesh_shape=(1, -1, 1))
    _check_report(r, 4)
    assert r["chip"] == "v5e" and r["hbm_bytes_per_device"] == 16 << 30
    assert r["roofline_step_s"] > 0 and r["peak_flops_per_device"] == 197e12
    assert r["attention_kernel"] == "splash"
    assert r["fits_by"] == "tpu_compiler" and 0 < r["peak_memory_bytes"] <= r["hbm_bytes_per_device"]


@pytest.mark.skipif(not _has_libtpu() or not os.environ.get("FUSION_TEST_TPU_AOT"),
                    reason="needs libtpu (pip install 'jax[tpu]') and FUSION_TEST_TPU_AOT=1 (~1-2 min compile)")
def test_tpu_cli_reports_the_compilers_hbm_figure(micro_cfg):
    """The CLI (a fresh process, so XLA's dump flag takes effect) reads the HBM total that the TPU
    compiler checks from XLA's buffer-assignment report."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "fusion_jax.tools.aot_compile", "--config", micro_cfg,
                          "--topology", "v5e:2x2", "--mesh=1,-1,1", "--json"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fits"] and r["fits_by"] == "tpu_compiler"
    assert 0 < r["hbm_used_bytes"] <= r["hbm_bytes_per_device"]
    assert r["hbm_used_bytes"] <= r["bytes_per_device"]      # memory_analysis's sum is the larger


@pytest.mark.skipif(not _has_libtpu() or not os.environ.get("FUSION_TEST_TPU_AOT"),
                    reason="needs libtpu (pip install 'jax[tpu]') and FUSION_TEST_TPU_AOT=1")
def test_tpu_compiler_rejects_programs_over_hbm():
    """What `fits` relies on for TPU topologies: the compiler itself refuses a program whose HBM
    allocations (here an argument and an output of 10 GiB each on a 16 GiB v5e) exceed the chip."""
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding
    dev = A.topology_devices("v5e:2x2")[0]
    x = jax.ShapeDtypeStruct((10 * 2 ** 28,), jnp.float32, sharding=SingleDeviceSharding(dev))
    double = jax.jit(lambda a: a * 2.0)
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED"):
        double.lower(x).compile()
    donated = jax.jit(lambda a: a * 2.0, donate_argnums=0).lower(x).compile()   # output reuses the input
    assert donated.memory_analysis().alias_size_in_bytes == 10 * 2 ** 30


def test_policy_sweep_prints_one_row_per_policy(micro_cfg, capsys, monkeypatch):
    """--policies compiles once per remat policy (here the compile is replaced by its report) and prints
    the table: fit, bytes per device, XLA-counted FLOPs."""
    seen = []

    def fake(tc, topology, **kw):
        seen.append((kw["remat"], kw["host_offload"]))
        fits = kw["remat"] != "none"
        r = {"topology": topology, "num_devices": 4, "device_kind": "TPU v5 lite", "mesh": {}, "global_batch": 4,
             "seq_len": 96, "grad_accum": 1, "query_len": 4, "remat_policy": kw["remat"],
             "vision_remat_policy": "full", "compute_dtype": "bfloat16", "setup_s": 0, "compile_s": 1.0,
             "hbm_bytes_per_device": 16 << 30, "fits": fits, "status": "ok" if fits else "oom"}
        if fits:
            r.update(argument_bytes=1 << 30, output_bytes=1 << 30, alias_bytes=1 << 30, temp_bytes=2 << 30,
                     code_bytes=0, bytes_per_device=3 << 30, peak_memory_bytes=5 << 29, fits_by="tpu_compiler",
                     flops_per_device=1.5e12, flops_per_step=6e12,
                     model_flops_per_step=5e12, compiled_over_model_flops=1.2)
        else:
            r.update(bytes_per_device=20 << 30, error="RESOURCE_EXHAUSTED")
        return r

    monkeypatch.setattr(A, "aot_compile", fake)
    flags = os.environ.get("XLA_FLAGS")
    rc = A.main(["--config", micro_cfg, "--topology", "v5e:2x2", "--policies", "none,full,offload_dot",
                 "--host-offload", "on", "--json"])
    captured = capsys.readouterr()
    assert os.environ.get("XLA_FLAGS") == flags          # the HBM-report dump flag does not leak
    assert rc == 0 and seen == [("none", "on"), ("full", "on"), ("offload_dot", "on")]
    table = [line for line in captured.err.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 3 and "| full | yes | 1.00 GiB / 2.00 GiB / 3.00 GiB / 2.50 GiB | 1.5e+12 |" in table[3]
    assert table[2].startswith("| none | no | over HBM: 20.00 GiB")
    r = json.loads(captured.out.strip().splitlines()[-1])
    assert [p["remat_policy"] for p in r["policies"]] == ["none", "full", "offload_dot"] and r["fits"]


def test_host_offload_setting():
    from fusion_jax.train import step
    from fusion_jax.train.flops import hbm_bytes
    mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
    state = {"w": jax.ShapeDtypeStruct((1024,), "float32")}
    assert step.resolve_host_offload("on", state, mesh) and not step.resolve_host_offload("off", state, mesh)
    assert not step.resolve_host_offload("auto", state, mesh)   # CPU: no HBM to save
    with pytest.raises(ValueError, match="host_offload"):
        step.resolve_host_offload("yes", state, mesh)
    assert hbm_bytes(type("D", (), {"device_kind": "TPU v5 lite"})()) == 16 << 30
    sh = step.train_state_shardings({"params": state, "opt_state": (state, state), "step": 0, "rng": 0},
                                    {"w": jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())}, mesh,
                                    offload_opt=True)
    assert all(s.memory_kind == "pinned_host" for s in jax.tree.leaves(sh["opt_state"]))
    assert sh["params"]["w"].memory_kind in (None, "device")


@pytest.mark.parametrize("policy", ["dots_no_batch", "dots_with_no_batch_dims_saveable", "offload_dot"])
def test_remat_policies_keep_gradients(policy):
    """Every new policy (offload_dot: host memory on this backend too) gives the gradients of no remat."""
    import jax.numpy as jnp
    import numpy as np
    from jax.ad_checkpoint import checkpoint_name

    from fusion_jax.nn import LAYER_INPUT_NAME, remat
    r = np.random.default_rng(0)
    ws, x = jnp.asarray(r.normal(size=(3, 16, 16)) / 4, jnp.float32), jnp.asarray(r.normal(size=(4, 16)), jnp.float32)

    def loss(ws, x, pol):
        def step(c, w):
            c = checkpoint_name(c, LAYER_INPUT_NAME)
            return jnp.tanh(c @ w) + c, None
        return jnp.sum(jnp.sin(jax.lax.scan(remat(step, pol), x, ws)[0]))

    with jax.default_matmul_precision("highest"):
        ref = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws, x, "none")
        got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws, x, policy)
    for a, b in zip(ref, got, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
