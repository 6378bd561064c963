"""Ahead-of-time compile the real train step of a config for a TPU slice (or the local CPU).

    python -m fusion_jax.tools.aot_compile --config configs/fusion_8b_llama31_stage2.py \
        --topology v5p:4x4x4 --mesh 1,-1,1 [--remat full] [--vision-remat full] [--json]
    python -m fusion_jax.tools.aot_compile --config configs/tiny.py --topology cpu:8 --json
    python -m fusion_jax.tools.aot_compile --config ... --topology v5e:2x2 --policies all   # one row per policy

Nothing is allocated: the train state and the batch are abstract (`jax.ShapeDtypeStruct` with
their shardings), the step is `fusion_jax.train.loop.Setup(...).train_step` (the jitted function
train.py runs), lowered and compiled for the topology's devices. A TPU topology needs `libtpu`
(the version `pip install "jax[tpu]==<jax version>"` resolves; no TPU has to be attached).

The batch is the config's worst bucket: global_batch_size x data.max_length tokens, the largest
query_len, data.max_questions questions and data.max_instruct_len instruct tokens (override with
--batch/--seq/--query-len/--max-questions/--instruct-len).

Reports per-device bytes (arguments, outputs, aliased, temporaries, code, their total, XLA's peak),
the chip's HBM, whether it fits (on a TPU the compiler's verdict: a program over HBM fails to
compile), the compiled FLOPs per step (cost analysis, all devices) against the analytic
model FLOPs (fusion_jax.train.flops), a roofline step time and the lower/compile times. The attention
implementation, remat policies and optimizer-state placement are the config's (attention `auto`: splash
on TPU; `optim.host_offload` `auto`: host memory when the state would take > 40% of HBM); --attention,
--remat, --host-offload override them, and --policies compiles once per remat policy and prints a table
(bytes per device, XLA-counted FLOPs with the remat recompute). With
--json the last stdout line is one JSON object. Exit status: 0 fits, 1 does not fit (including
a compiler out-of-memory error), 2 bad arguments or other compile failure.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import time

# The host's own backend must not try to drive a TPU; TPU topologies are compile-only clients.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # silences libtpu's hostname probe off-TPU
# Compile-only use: do not take /tmp/libtpu_lockfile (another jax process on this host may hold it).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

GiB = 1024 ** 3

# Per-chip HBM bytes, HBM bandwidth (B/s) by substring of jax's device_kind (lower case).
# Public spec sheets: v4 32 GiB 1.2 TB/s; v5e 16 GiB 819 GB/s; v5p 95 GiB 2.77 TB/s; v6e 32 GiB 1.64 TB/s.
CHIPS = (
    ("v6 lite", dict(name="v6e", hbm=32 * GiB, bw=1640e9)),
    ("v6e", dict(name="v6e", hbm=32 * GiB, bw=1640e9)),
    ("v5 lite", dict(name="v5e", hbm=16 * GiB, bw=819e9)),
    ("v5e", dict(name="v5e", hbm=16 * GiB, bw=819e9)),
    ("v5p", dict(name="v5p", hbm=95 * GiB, bw=2765e9)),
    ("v5", dict(name="v5p", hbm=95 * GiB, bw=2765e9)),
    ("v4", dict(name="v4", hbm=32 * GiB, bw=1200e9)),
    ("v3", dict(name="v3", hbm=16 * GiB, bw=900e9)),
)


def chip_info(device) -> dict:
    kind = str(getattr(device, "device_kind", "")).lower()
    for key, info in CHIPS:
        if key in kind:
            return dict(info, kind=device.device_kind)
    if device.platform == "cpu":
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            total = 0
        return dict(name="cpu", kind=device.device_kind, hbm=total, bw=None, shared_host_memory=True)
    return dict(name=kind or device.platform, kind=device.device_kind, hbm=None, bw=None)


HBM_REPORT = "*train_step*memory-usage-report.txt"


def enable_hbm_report(dump_dir: str):
    """Have XLA write its buffer-assignment memory report for the train step under `dump_dir`: the
    default-memory total there is the figure the TPU compiler checks against HBM. XLA reads the flag
    at its first compile in the process, so the CLI calls this before anything compiles."""
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={dump_dir}"
                               " --xla_dump_hlo_module_re=train_step").strip()


def hbm_report_bytes(dump_dir: str, since: float) -> int | None:
    """HBM (default memory space) total of the newest train-step memory report written after `since`."""
    files = [p for p in pathlib.Path(dump_dir).glob(HBM_REPORT) if p.stat().st_mtime >= since]
    if not files:
        return None
    text = max(files, key=lambda p: p.stat().st_mtime).read_text()
    m = re.search(r"Memory Space: default \(color=0\)\s*\nTotal bytes: (\d+)", text)
    return int(m.group(1)) if m else None


# ----------------------------------------------------------------------------- config / devices

def load_train_config(path: str):
    """The ml_collections ConfigDict of a configs/*.py file (`get_config()`)."""
    if not os.path.isfile(path):
        raise ValueError(f"--config {path}: no such file")
    spec = importlib.util.spec_from_file_location("fusion_train_config", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.get_config()


def topology_devices(topology: str):
    """Devices of a TPU topology ('v5p:4x4x4', 'v5e:4x8', 'v6e:8x8', 'v4:2x2x2') or 'cpu[:N]'."""
    import jax
    if topology == "cpu" or topology.startswith("cpu:"):
        devs = jax.devices("cpu")
        n = int(topology.split(":")[1]) if ":" in topology else len(devs)
        if n > len(devs):
            raise ValueError(f"--topology {topology}: only {len(devs)} CPU devices (set XLA_FLAGS="
                             f"--xla_force_host_platform_device_count={n})")
        return devs[:n]
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ValueError(f"--topology {topology}: needs libtpu (pip install 'jax[tpu]=={jax.__version__}')") from e
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology, "tpu").devices)


def parse_mesh(s) -> tuple[int, ...]:
    if isinstance(s, (tuple, list)):
        return tuple(int(x) for x in s)
    return tuple(int(x) for x in str(s).strip("()[] ").split(",") if x.strip())


def build_mesh(devices, shape):
    """`sharding.make_mesh` over `devices`, in mesh_utils' ICI-aware order where it maps the shape (TPU)."""
    from jax.experimental import mesh_utils

    from fusion_jax.sharding import make_mesh, resolve_mesh_shape
    try:
        devices = list(mesh_utils.create_device_mesh(resolve_mesh_shape(shape, len(devices)), devices).flat)
    except Exception:  # noqa: BLE001  (CPU devices or shapes the helper does not map)
        pass
    return make_mesh(shape, devices)


# ----------------------------------------------------------------------------- compile

_OOM = re.compile(r"(?:Used|used)\s+([\d.]+)([KMGT]?)(?:i?B)?\s+of\s+([\d.]+)([KMGT]?)(?:i?B)?\s+hbm", re.I)
_UNIT = {"": 1, "K": 1024, "M": 1024 ** 2, "G": GiB, "T": 1024 ** 4}


_OOM2 = re.compile(r"\(([\d.]+)([KMGT]?)\)\s+exceeds available HBM\s+\(([\d.]+)([KMGT]?)\)", re.I)


def parse_oom(msg: str):
    """(used_bytes, capacity_bytes) from an XLA TPU 'Ran out of memory' message, if present.

    For 'HLO temporaries (X) exceeds available HBM (Y)' the used figure is temporaries only."""
    m = _OOM.search(msg) or _OOM2.search(msg)
    if not m:
        return None
    return (float(m.group(1)) * _UNIT[m.group(2).upper()], float(m.group(3)) * _UNIT[m.group(4).upper()])


def _cost(compiled) -> dict:
    try:
        c = compiled.cost_analysis()
    except Exception:  # noqa: BLE001
        return {}
    if isinstance(c, (list, tuple)):
        c = c[0] if c else {}
    return dict(c or {})


def _apply_overrides(tc, *, mesh_shape, remat, vision_remat, batch, grad_accum, compute_dtype, scan_layers, seq,
                     host_offload=None, attention_impl=None):
    over = {"mesh": None if mesh_shape is None else tuple(mesh_shape), "global_batch_size": batch,
            "grad_accum": grad_accum, "model.remat_policy": remat, "model.vision_remat_policy": vision_remat,
            "model.compute_dtype": compute_dtype, "model.scan_layers": scan_layers, "data.max_length": seq,
            "optim.host_offload": host_offload, "model.attention_impl": attention_impl}
    with tc.unlocked():
        for key, val in over.items():
            if val is not None:
                *parents, name = key.split(".")
                node = tc
                for part in parents:
                    node = node[part]
                node[name] = val
        # Setup validates data.path for real datasets; AOT needs no data.
        tc.data.source = "synth"
        tc.init_from = ""


def _attention_kernel(cfg, mesh, seq_len: int) -> str:
    """What the decoder's training attention runs on the topology's chips (`auto` resolved)."""
    import jax

    from fusion_jax import attention

    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        return attention.resolve_impl(cfg.attention_impl, seq_len, cfg.compute_dtype)


def _abstract_sharded_batch(s, mesh, shape: dict) -> dict:
    from jax import ShapeDtypeStruct

    from fusion_jax.train import step as step_lib
    ab = step_lib.abstract_batch(s.cfg, shape["global_batch"], shape["seq_len"], shape["query_len"],
                                 instruct_len=shape["instruct_len"], max_questions=shape["max_questions"])
    bsh = step_lib.batch_shardings(mesh)
    return {k: ShapeDtypeStruct(v.shape, v.dtype, sharding=bsh[k]) for k, v in ab.items()}


def _compile_error(rep: dict, e: Exception, chip: dict) -> dict:
    """Report a failed compile: `oom` (over HBM, with the compiler's figures when it gives them) or `error`."""
    msg = str(e)
    oom = parse_oom(msg) if ("RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower()) else None
    if oom is None and "RESOURCE_EXHAUSTED" not in msg:
        rep.update(fits=False, error=msg.splitlines()[0][:500] if msg else type(e).__name__, status="error")
        return rep
    rep.update(fits=False, status="oom", error=" ".join(msg.split())[:600],
               bytes_per_device=int(oom[0]) if oom else None)
    if oom:
        rep["hbm_bytes_per_device"] = int(oom[1]) if not chip["hbm"] else chip["hbm"]
        rep["compiler_hbm_capacity"] = int(oom[1])
    return rep


def _memory(rep: dict, compiled, chip: dict):
    """Per-device bytes and the verdict. A TPU compile fails with RESOURCE_EXHAUSTED when the program's
    HBM allocations (arguments, temporaries, code) exceed the chip, so a compiled TPU program fits.
    memory_analysis's sum over-counts the temporaries (16.04 GiB for a program the compiler counts as
    15.49 and accepts; docs/pod_readiness.md). XLA's peak is not that figure either (it can be lower,
    and it counts host memory too); `hbm_used_bytes` from the buffer report is."""
    mem = compiled.memory_analysis()

    def g(name):
        return int(getattr(mem, name, 0) or 0) if mem is not None else 0

    arg, out, alias, tmp, code = (g("argument_size_in_bytes"), g("output_size_in_bytes"),
                                  g("alias_size_in_bytes"), g("temp_size_in_bytes"),
                                  g("generated_code_size_in_bytes"))
    total = arg + out - alias + tmp + code
    rep.update(argument_bytes=arg, output_bytes=out, alias_bytes=alias, temp_bytes=tmp, code_bytes=code,
               bytes_per_device=total, peak_memory_bytes=g("peak_memory_in_bytes"),
               host_argument_bytes=g("host_argument_size_in_bytes"),
               host_output_bytes=g("host_output_size_in_bytes"), host_temp_bytes=g("host_temp_size_in_bytes"))
    hbm = chip["hbm"]
    compiler_checked = chip["name"] != "cpu" and hbm is not None
    rep["fits_by"] = "tpu_compiler" if compiler_checked else "memory_analysis"
    rep["fits"] = bool(hbm is None or compiler_checked or total <= hbm)
    used = rep.get("hbm_used_bytes") or total
    rep["hbm_fraction"] = round(used / hbm, 4) if hbm else None


def _flops_and_roofline(rep: dict, compiled, chip: dict, n_devices: int):
    cost = _cost(compiled)
    dev_flops = float(cost.get("flops", 0.0) or 0.0)
    dev_bytes = float(cost.get("bytes accessed", 0.0) or 0.0)
    model_flops, peak = rep["model_flops_per_step"], rep["peak_flops_per_device"]
    rep["flops_per_device"] = dev_flops
    rep["flops_per_step"] = dev_flops * n_devices
    rep["compiled_over_model_flops"] = round(rep["flops_per_step"] / model_flops, 4) if model_flops else None
    rep["bytes_accessed_per_device"] = dev_bytes
    # XLA's cost analysis counts a while loop's body once, so scanned layers are undercounted:
    # the roofline uses the analytic model FLOPs, times the recompute factor of the remat policy.
    rep["flops_note"] = "cost_analysis counts each scan (while) body once; compare only unscanned"
    # Rough factors: the policies that save the weight matmuls rerun only the attention's forward (~5%).
    recompute = {"full": 4 / 3, "nothing": 4 / 3, "dots": 1.0, "dots_no_batch": 1.0, "none": 1.0,
                 "dots_with_no_batch_dims_saveable": 1.05, "offload_dot": 1.05}
    f_exec = model_flops * recompute.get(rep["remat_policy"], 1.0)
    rep["executed_flops_estimate"] = f_exec
    if peak:
        rep["roofline_model_flops_s"] = model_flops / (peak * n_devices)   # 100% MFU step time
        rep["roofline_step_s"] = f_exec / (peak * n_devices)               # + remat recompute
        rep["roofline_mfu"] = rep["roofline_model_flops_s"] / rep["roofline_step_s"]
        rep["roofline_tokens_per_s_per_device"] = (rep["global_batch"] * rep["seq_len"] / rep["roofline_step_s"]
                                                   / n_devices)
    rep["hbm_traffic_s_lower_bound"] = dev_bytes / chip["bw"] if chip.get("bw") else None


def aot_compile(tc, topology: str, *, mesh_shape=None, remat: str | None = None,
                vision_remat: str | None = None, batch: int | None = None, seq: int | None = None,
                query_len: int | None = None, max_questions: int | None = None,
                instruct_len: int | None = None, grad_accum: int | None = None,
                compute_dtype: str | None = None, scan_layers: bool | None = None,
                host_offload: str | None = None, attention_impl: str | None = None,
                hbm_report_dir: str | None = None, log=lambda s: None) -> dict:
    """Lower and compile `tc`'s train step for `topology`; returns the report dict."""
    import jax

    from fusion_jax.train import flops as flops_lib
    from fusion_jax.train.loop import Setup

    _apply_overrides(tc, mesh_shape=mesh_shape, remat=remat, vision_remat=vision_remat, batch=batch,
                     grad_accum=grad_accum, compute_dtype=compute_dtype, scan_layers=scan_layers, seq=seq,
                     host_offload=host_offload, attention_impl=attention_impl)
    devices = topology_devices(topology)
    mesh = build_mesh(devices, tuple(tc.mesh))
    chip = chip_info(devices[0])
    t0 = time.perf_counter()
    s = Setup(tc, None, mesh=mesh)
    cfg = s.cfg
    shape = {"global_batch": int(tc.global_batch_size), "seq_len": int(tc.data.max_length),
             "query_len": int(query_len or max(cfg.query_len)),
             "max_questions": int(max_questions or tc.data.max_questions),
             "instruct_len": int(instruct_len or tc.data.max_instruct_len)}
    ab = _abstract_sharded_batch(s, mesh, shape)
    state = s.sharded_abstract_state()
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_params))
    rep = {
        "topology": topology, "device_kind": chip["kind"], "chip": chip["name"], "num_devices": len(devices),
        "mesh": dict(mesh.shape), "remat_policy": cfg.remat_policy,
        "vision_remat_policy": cfg.vision_remat_policy or cfg.remat_policy, "compute_dtype": cfg.compute_dtype,
        "attention_impl": cfg.attention_impl, "attention_kernel": _attention_kernel(cfg, mesh, shape["seq_len"]),
        "host_offload": bool(s.host_offload),
        "grad_accum": int(tc.grad_accum), **shape, "n_params": n_params, "scan_layers": cfg.scan_layers,
        "hbm_bytes_per_device": chip["hbm"], "setup_s": round(time.perf_counter() - t0, 2),
        "model_flops_per_step": flops_lib.train_flops_per_step(cfg, {k: v.shape for k, v in ab.items()}),
        "peak_flops_per_device": flops_lib.peak_flops(devices[0]),
    }
    log(f"{cfg.llm.family} {n_params / 1e9:.2f}B params | {len(devices)} x {chip['kind']} | mesh "
        f"{rep['mesh']} | batch {rep['global_batch']} x {rep['seq_len']} (grad_accum {rep['grad_accum']}, "
        f"q {rep['query_len']}, questions {rep['max_questions']}, instruct {rep['instruct_len']}) | "
        f"remat {rep['remat_policy']}/{rep['vision_remat_policy']} | {rep['compute_dtype']} | attention "
        f"{rep['attention_kernel']} | optimizer state in {'host' if rep['host_offload'] else 'device'} memory")
    t1 = time.perf_counter()
    lowered = s.train_step.lower(state, ab)
    rep["lower_s"] = round(time.perf_counter() - t1, 2)
    log(f"lowered in {rep['lower_s']:.1f}s; compiling ...")
    t2 = time.perf_counter()
    since, compiled, error = time.time(), None, None
    try:
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError RESOURCE_EXHAUSTED on TPU)
        error = e
    rep["compile_s"] = round(time.perf_counter() - t2, 2)
    rep["hbm_used_bytes"] = hbm_report_bytes(hbm_report_dir, since) if hbm_report_dir else None
    if error is not None:
        return _compile_error(rep, error, chip)
    _memory(rep, compiled, chip)
    _flops_and_roofline(rep, compiled, chip, len(devices))
    rep["status"] = "ok" if rep["fits"] else "over_hbm"
    return rep


def _gib(x):
    return "?" if x is None else f"{x / GiB:.2f} GiB"


def _size(x):
    return _gib(x) if x >= GiB else f"{x / 2 ** 20:.1f} MiB"


def format_report(r: dict) -> str:
    lines = [f"topology        {r['topology']} ({r['num_devices']} x {r['device_kind']}), mesh {r['mesh']}",
             f"step            batch {r['global_batch']} x {r['seq_len']} (grad_accum {r['grad_accum']}, "
             f"q {r['query_len']}), remat {r['remat_policy']}/{r['vision_remat_policy']}, {r['compute_dtype']}"]
    if r.get("status") == "error":
        lines.append(f"ERROR           {r.get('error')}")
        return "\n".join(lines)
    if "argument_bytes" in r:
        lines += [f"per device      arguments {_gib(r['argument_bytes'])}, outputs {_gib(r['output_bytes'])} "
                  f"(aliased {_gib(r['alias_bytes'])}), temporaries {_gib(r['temp_bytes'])}, "
                  f"code {_gib(r['code_bytes'])}",
                  f"HBM used        {_gib(r.get('hbm_used_bytes'))} (the compiler's buffer assignment)",
                  f"total           {_gib(r['bytes_per_device'])} (memory_analysis sum), XLA peak "
                  f"{_gib(r.get('peak_memory_bytes'))} of {_gib(r['hbm_bytes_per_device'])} HBM "
                  f"-> {'FITS' if r['fits'] else 'DOES NOT FIT'} (by {r.get('fits_by')})"]
        mf = r["model_flops_per_step"]
        lines.append(f"FLOPs / step    compiled {r['flops_per_step']:.4g} vs model {mf:.4g} "
                     f"(ratio {r['compiled_over_model_flops']})")
        if r.get("roofline_step_s"):
            lines.append(f"roofline        {r['roofline_step_s']:.3f} s/step at peak (model FLOPs x remat recompute; "
                         f"100%-MFU {r['roofline_model_flops_s']:.3f} s), "
                         f"{r['roofline_tokens_per_s_per_device']:.0f} tok/s/device; no communication")
    else:
        lines.append(f"DOES NOT FIT    compiler: {r.get('error', '')[:300]}")
    lines.append(f"time            setup {r['setup_s']}s, lower {r.get('lower_s')}s, compile {r['compile_s']}s")
    return "\n".join(lines)


def policy_table(reports: list[dict]) -> str:
    """One row per remat policy: fit, bytes per device, XLA-counted FLOPs (remat recompute included;
    a scanned body counts once, so compare rows of one run, or use --unrolled for absolute counts)."""
    rows = ["| remat policy | fits | per device (args / temps / total / XLA peak) | XLA FLOPs per device | compile |",
            "|---|---|---|---|---|"]
    for r in reports:
        if "argument_bytes" in r:
            mem = " / ".join(_size(r[k]) for k in ("argument_bytes", "temp_bytes", "bytes_per_device",
                                                   "peak_memory_bytes"))
            fl = f"{r['flops_per_device']:.4g}"
        else:
            mem, fl = f"over HBM: {_gib(r.get('bytes_per_device'))} ({r.get('status')})", "-"
        rows.append(f"| {r['remat_policy']} | {'yes' if r.get('fits') else 'no'} | {mem} | {fl} | "
                    f"{r.get('compile_s')} s |")
    return "\n".join(rows)


def _parser():
    p = argparse.ArgumentParser(prog="python -m fusion_jax.tools.aot_compile", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="configs/NAME.py")
    p.add_argument("--topology", required=True, help="TPU topology (v5p:4x4x4, v5e:8x8, v6e:4x8) or cpu[:N]")
    p.add_argument("--mesh", default=None, help="data,fsdp,tensor (one may be -1); default: the config's")
    p.add_argument("--remat", default=None, help="decoder remat policy (default: the config's)")
    p.add_argument("--vision-remat", default=None, help="vision tower remat policy (default: the config's)")
    p.add_argument("--policies", default=None,
                   help="compile once per decoder remat policy (comma list or 'all') and print a table")
    p.add_argument("--host-offload", default=None, choices=("auto", "on", "off"),
                   help="optimizer state in host memory (default: the config's optim.host_offload)")
    p.add_argument("--attention", default=None, help="attention_impl (default: the config's, auto)")
    p.add_argument("--batch", type=int, default=None, help="global batch (default: the config's)")
    p.add_argument("--grad-accum", type=int, default=None)
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: data.max_length)")
    p.add_argument("--query-len", type=int, default=None, help="default: the largest of model.query_len")
    p.add_argument("--max-questions", type=int, default=None)
    p.add_argument("--instruct-len", type=int, default=None)
    p.add_argument("--compute-dtype", default=None, choices=("float32", "bfloat16"))
    p.add_argument("--unrolled", action="store_true", help="scan_layers=False (compile-time comparison)")
    p.add_argument("--json", action="store_true", help="last stdout line: one JSON object")
    return p


def _run_one(a, remat, log) -> dict:
    tc = load_train_config(a.config)
    return aot_compile(tc, a.topology, mesh_shape=parse_mesh(a.mesh) if a.mesh else None,
                       remat=remat, vision_remat=a.vision_remat, batch=a.batch, seq=a.seq,
                       query_len=a.query_len, max_questions=a.max_questions, instruct_len=a.instruct_len,
                       grad_accum=a.grad_accum, compute_dtype=a.compute_dtype,
                       scan_layers=False if a.unrolled else None, host_offload=a.host_offload,
                       attention_impl=a.attention, hbm_report_dir=a.hbm_report_dir, log=log)


def main(argv=None) -> int:
    a = _parser().parse_args(argv)

    def log(msg):
        print(msg, file=sys.stderr if a.json else sys.stdout, flush=True)

    a.hbm_report_dir, xla_flags = None, os.environ.get("XLA_FLAGS")
    if not a.topology.startswith("cpu"):
        a.hbm_report_dir = tempfile.mkdtemp(prefix="aot_hbm_")
        enable_hbm_report(a.hbm_report_dir)
    try:
        return _main(a, log, argv)
    finally:
        if a.hbm_report_dir:
            shutil.rmtree(a.hbm_report_dir, ignore_errors=True)
            os.environ.pop("XLA_FLAGS", None)
            if xla_flags is not None:
                os.environ["XLA_FLAGS"] = xla_flags


def _main(a, log, argv) -> int:
    from fusion_jax.nn import REMAT_POLICIES
    policies = [a.remat]
    if a.policies:
        policies = list(REMAT_POLICIES) if a.policies == "all" else a.policies.split(",")
    try:
        reps = [_run_one(a, pol, log) for pol in policies]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        if a.json:
            print(json.dumps({"fits": False, "status": "error", "error": str(e)}))
        return 2
    command = "python -m fusion_jax.tools.aot_compile " + " ".join(
        x if x and " " not in x else repr(x) for x in (argv if argv is not None else sys.argv[1:]))
    for rep in reps:
        rep.update(config=a.config, command=command)
        log(format_report(rep))
    if a.policies:
        log(policy_table(reps))
    rep = reps[0] if len(reps) == 1 else {"policies": reps, "fits": any(r.get("fits") for r in reps),
                                          "status": "ok", "command": command}
    if a.json:
        print(json.dumps(rep, sort_keys=True, default=str))
    if len(reps) == 1 and rep.get("status") == "error":
        return 2
    return 0 if rep["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
