"""Multi-process training on localhost: 2 processes x 4 CPU devices through `jax.distributed`
train the tiny config exactly like 1 process x 8 devices.

Each run is a subprocess executing this file as a script (the worker below). Both runs read the
same small JSONL dataset through the real pipeline (per-process shard [process_index::process_count],
`shard_batch` -> global arrays) and take the same train steps. Checks: per-step losses equal
the single-process run's (up to float summation order: the global batch's rows are interleaved
differently), and each step's data shards are disjoint and together are exactly the
single-process global batch.

Coordinated preemption: two processes train into one workdir; SIGTERM reaches one of them only;
both stop at the same step with one checkpoint, and a rerun resumes on both. Then the latest
checkpoint is torn for one process only: both fall back to the previous step.

Compile time dominates on 2 cores, so the workers compile at XLA's lowest CPU backend optimization
level (every run alike: the comparisons stay like for like) and share one persistent compilation
cache per module: process 0 of a pair loads what an earlier pair compiled; process 1 compiles anew
(on CPU the cache key holds the process's own topology fingerprint, and only process 0 writes, so
jax_share_binary_between_hosts would deadlock here: process 1 waits under a key nobody sets).
"""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
STEPS = 3
TRAIN_STEPS = 1000  # never reached: the first run stops on the signal, the rerun after stop_after.
# The comparison runs use it too (it only sets the lr schedule): their train step is then the
# program that the preemption runs find in the compilation cache.
GLOBAL_BATCH = 16
DEVICES_TOTAL = 8


# ----------------------------------------------------------------------------- worker (subprocess)

def _tiny_tc(data_path: str, image_folder: str, tokenizer: str):
    from fusion_jax.train.presets import tiny_train_config
    tc = tiny_train_config()
    with tc.unlocked():
        tc.global_batch_size = GLOBAL_BATCH
        tc.total_steps = TRAIN_STEPS
        tc.mesh = (-1, 1, 1)
        tc.data.source = "path"
        tc.vision_warmup.steps = 0              # the warm start reads synthesized descriptions
        tc.data.path, tc.data.image_folder, tc.data.tokenizer = data_path, image_folder, tokenizer
        tc.data.max_length = 160
        tc.data.seq_buckets = (160,)
        tc.data.instruct_buckets = (32,)
        tc.data.max_instruct_len = 32
        tc.data.order = "shuffle"
        tc.data.worker_count = 0
        tc.model.scan_layers = True            # fewer ops: quicker compile on 2 cores
        tc.model.linear_2d = False             # the single-device CPU choices are off on a mesh
        tc.model.ce_skip_empty_chunks = False
        tc.model.attention_impl = "auto"
        tc.model.tiny.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, vision_hidden_size=16, vision_intermediate_size=32,
                                  vision_layers=3, vision_heads=2, image_size=16, patch_size=4))
        tc.model.update(dict(num_sampler_layers=1, sampler_stride=2, sampler_heads=2))
    return tc


def worker(pid: int, nproc: int, port: int, out: str, data_path: str, image_folder: str, tokenizer: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if nproc > 1:
        jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                                   process_id=pid, initialization_timeout=120)
    from fusion_jax.data.tokenizer import load_tokenizer
    from fusion_jax.sharding import shard_batch
    from fusion_jax.train import loop
    from fusion_jax.train.data import build_iterator
    from fusion_jax.train.step import model_batch

    t0 = time.time()
    tc = _tiny_tc(data_path, image_folder, tokenizer)
    tok = load_tokenizer(tokenizer)
    s = loop.Setup(tc, None, vocab_size=tok.vocab_size)
    it = build_iterator(tc.data, s.cfg, tok, per_process_batch=GLOBAL_BATCH // nproc, seed=0)
    state = s.init_state()
    losses, ids = [], []
    for _ in range(STEPS):
        raw = next(it)
        ids.append([str(x) for x in raw["ids"]])
        state, m = s.train_step(state, shard_batch(model_batch(raw), s.mesh))
        losses.append(float(jax.device_get(m["loss"])))
    it.close()
    rec = {"process_index": jax.process_index(), "process_count": jax.process_count(),
           "local_devices": jax.local_device_count(), "devices": jax.device_count(),
           "losses": losses, "ids": ids, "wall_s": time.time() - t0}
    with open(out, "w") as f:
        json.dump(rec, f)
    if nproc > 1:
        jax.distributed.shutdown()


def train_worker(pid: int, nproc: int, port: int, out: str, data_path: str, image_folder: str, tokenizer: str,
                 workdir: str, stop_after: int):
    """loop.train as one of `nproc` processes (the train.py path), its summary to `out`."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc,
                               process_id=pid, initialization_timeout=120)
    from fusion_jax.train import loop
    tc = _tiny_tc(data_path, image_folder, tokenizer)
    with tc.unlocked():
        tc.update(dict(total_steps=TRAIN_STEPS, log_every=1, checkpoint_every=TRAIN_STEPS, tensorboard=False,
                       stop_after=stop_after))
    r = loop.train(tc, workdir)
    with open(out, "w") as f:
        json.dump({k: r[k] for k in ("start_step", "step", "stopped")}, f)
    jax.distributed.shutdown()


# ----------------------------------------------------------------------------- test

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _spawn(pid, nproc, port, out, data, tmp, cache_env, *extra, tag=""):
    env = dict(os.environ, **cache_env)
    env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={DEVICES_TOTAL // nproc} "
                        "--xla_backend_optimization_level=0")   # halves the compile time of the tiny model
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    log = open(os.path.join(tmp, f"log{tag}_{nproc}_{pid}.txt"), "w")
    return subprocess.Popen([sys.executable, HERE, str(pid), str(nproc), str(port), out, *data, *extra],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT), log


def test_two_processes_match_single_process(tmp_path, jax_compile_cache):
    from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
    path, imgdir = write_dataset(str(tmp_path / "data"), n=GLOBAL_BATCH * STEPS, size=24)
    tok = make_tokenizer_folder(str(tmp_path / "tok"))
    data = (path, imgdir, tok)
    port = _free_port()
    t0 = time.time()
    runs = [(0, 1, 0), (0, 2, port), (1, 2, port)]
    procs = []
    for pid, n, p in runs:  # all three at once: the single-process run overlaps the pair's startup
        out = str(tmp_path / f"out_{n}_{pid}.json")
        procs.append((out,) + _spawn(pid, n, p, out, data, str(tmp_path), jax_compile_cache))
    single, p0, p1 = _finish(procs, 220)
    wall = time.time() - t0
    print(f"multi-process test wall {wall:.1f}s; single {single['losses']} multi {p0['losses']}")

    assert single["devices"] == 8 and single["process_count"] == 1
    assert (p0["process_count"], p0["local_devices"], p0["devices"]) == (2, 4, 8)
    assert (p1["process_index"], p1["local_devices"]) == (1, 4)
    # Losses: both processes see the same (global) loss, equal to the single-process run's.
    assert p0["losses"] == p1["losses"]
    for a, b in zip(single["losses"], p0["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(a)), (single["losses"], p0["losses"])
    # Data: per step the two shards are disjoint and together are the single-process batch.
    for k in range(STEPS):
        a, b = p0["ids"][k], p1["ids"][k]
        assert len(a) == len(b) == GLOBAL_BATCH // 2
        assert not set(a) & set(b), f"step {k}: shards overlap {set(a) & set(b)}"
        assert sorted(a + b) == sorted(single["ids"][k]), f"step {k}: union != single-process batch"
    # Across steps too, nothing is seen twice within the first epoch's steps.
    seen = [i for k in range(STEPS) for i in p0["ids"][k] + p1["ids"][k]]
    assert len(seen) == len(set(seen))


def _finish(procs, timeout: float):
    """Wait for every (out, proc, log); kill all and fail with their logs past the timeout or on an error."""
    deadline = time.time() + timeout
    for out, proc, log in procs:
        try:
            rc = proc.wait(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for _, q, _ in procs:
                q.kill()
            rc = f"still running after {timeout:.0f}s"
        if rc != 0:
            logs = "\n".join(open(f.name).read()[-3000:] for _, _, f in procs)
            pytest.fail(f"worker {out} exited {rc}:\n{logs}")
        log.close()
    return [json.load(open(o)) for o, _, _ in procs]


def test_sigterm_on_one_host_stops_both_at_one_step(tmp_path, jax_compile_cache):
    from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
    from fusion_jax.train.metrics import read_metrics
    path, imgdir = write_dataset(str(tmp_path / "data"), n=2 * GLOBAL_BATCH, size=24)
    data = (path, imgdir, make_tokenizer_folder(str(tmp_path / "tok")))
    wd = str(tmp_path / "wd")
    metrics = os.path.join(wd, "metrics.jsonl")

    def run(tag, stop_after):
        port, outs = _free_port(), [str(tmp_path / f"{tag}_{pid}.json") for pid in (0, 1)]
        return [(outs[pid],) + _spawn(pid, 2, port, outs[pid], data, str(tmp_path), jax_compile_cache, wd,
                                       str(stop_after), tag=tag)
                for pid in (0, 1)]

    procs = run("a", -1)
    deadline = time.time() + 300
    while not (os.path.isfile(metrics) and len(read_metrics(metrics)) >= 2):  # training is under way
        if time.time() > deadline or any(p.poll() is not None for _, p, _ in procs):
            _finish(procs, 1)
            pytest.fail("the run ended or never reached step 2")
        time.sleep(0.2)
    procs[1][1].send_signal(signal.SIGTERM)  # one host only
    t_sig = time.time()
    a0, a1 = _finish(procs, 60)
    print(f"stopped {time.time() - t_sig:.1f}s after SIGTERM: {a0}")
    assert a0 == a1 and a0["stopped"].startswith("signal") and a0["start_step"] == 0, (a0, a1)
    stop = a0["step"]
    ckpt = os.path.join(wd, "checkpoints")
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [stop]
    assert not glob.glob(os.path.join(wd, "**", "*orbax-checkpoint-tmp*"), recursive=True)
    b0, b1 = _finish(run("b", 2), 300)  # the same command again (stopping after 2 more steps)
    assert b0 == b1 == {"start_step": stop, "step": stop + 2, "stopped": "stop_after"}, (b0, b1)
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, stop + 3))
    assert not glob.glob(os.path.join(wd, "**", "*orbax-checkpoint-tmp*"), recursive=True)
    # Multi-host fallback: only process 1's data-iterator state of the latest step is torn; process 0
    # restores that step fine, yet both agree to fall back to the previous step.
    latest = stop + 2
    assert sorted(int(d) for d in os.listdir(ckpt) if d.isdigit()) == [stop, latest]
    with open(os.path.join(ckpt, str(latest), "data", "process_1-of-2.json"), "r+b") as f:
        f.truncate(5)
    c0, c1 = _finish(run("c", 1), 300)
    assert c0 == c1 == {"start_step": stop, "step": stop + 1, "stopped": "stop_after"}, (c0, c1)
    log0 = open(tmp_path / "logc_2_0.txt").read()
    assert f"checkpoint {ckpt}/{latest} cannot be restored (failed on another process)" in log0, log0[-3000:]
    assert f"resumed from {ckpt}/{stop}" in log0
    assert os.listdir(os.path.join(wd, "unrestorable_checkpoints")) == [str(latest)]


if __name__ == "__main__":
    pid, nproc, port, out, data_path, image_folder, tokenizer = sys.argv[1:8]
    if len(sys.argv) > 8:
        train_worker(int(pid), int(nproc), int(port), out, data_path, image_folder, tokenizer, *sys.argv[8:9],
                     int(sys.argv[9]))
    else:
        worker(int(pid), int(nproc), int(port), out, data_path, image_folder, tokenizer)
