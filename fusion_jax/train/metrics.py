"""Training metrics: the NaN guard, metrics.jsonl, TensorBoard and the console line.

A step's metrics are read one step late, so the host never waits on the device between steps.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np

from fusion_jax.train import flops as flops_lib

SCALARS = ("loss", "ce_loss", "dsm_loss", "instruct_cos_loss", "vision_cos_loss", "grad_norm", "lr", "vision_lr")


class TrainingError(RuntimeError):
    """A stop the user must act on (NaN loss, bad config); the message says what happened."""


def log(msg: str):
    if jax.process_index() == 0:
        print(msg, flush=True)


def fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def truncate_metrics(path: str, last_step: int):
    """Drop records past `last_step` (a resumed run logs those steps again)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= last_step]
    with open(path, "w") as f:
        f.writelines(keep)


def batch_info(cfg, raw: dict, batch: dict) -> dict:
    """What the throughput numbers need from one step's batch."""
    return {"tokens": int(np.asarray(raw["attention_mask"]).sum()) * jax.process_count(),
            "q": int(raw["query_len"]), "S": int(np.asarray(raw["token_ids"]).shape[1]),
            "flops": flops_lib.train_flops_per_step(cfg, {k: v.shape for k, v in batch.items()})}


class MetricsLogger:
    """push(step, device metrics, batch info) after each step; flush() before a checkpoint."""

    def __init__(self, workdir: str, *, total_steps: int, start: int, log_every: int, tensorboard: bool,
                 last_good=lambda: "none"):
        self.is_main = jax.process_index() == 0
        self.total_steps, self.log_every, self.last_good = total_steps, log_every, last_good
        self.file = open(os.path.join(workdir, "metrics.jsonl"), "a") if self.is_main else None
        self.writer = None
        if self.is_main and tensorboard:
            from tensorboardX import SummaryWriter
            self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.peak = flops_lib.peak_flops()
        self.t_run0 = self.t_last = time.time()
        self.step0 = start
        self.pending = None
        self.last = None
        self._reset()

    def _reset(self):
        self.tokens, self.steps, self.flops = 0, 0, 0.0

    def push(self, step: int, metrics, info: dict):
        self.flush()
        self.pending = (step, metrics, info)

    def flush(self):
        if self.pending is not None:
            self._resolve(*self.pending)
            self.pending = None

    def _resolve(self, k: int, m, info: dict):
        m = jax.device_get(m)
        if not bool(m["finite"]):
            raise TrainingError(
                f"step {k}: loss is {float(m['loss'])} (grad norm {float(m['grad_norm'])}): stopping. "
                f"The update of this step was not applied and no checkpoint was written after it; the "
                f"last good checkpoint is {self.last_good()}. Lower optim.lr, check the "
                f"data of this step, or use compute_dtype=float32.")
        self.tokens += info["tokens"]
        self.steps += 1
        self.flops += info["flops"]
        self.last = m
        if k % self.log_every == 0 or k == self.total_steps:
            self._write(k, m, info)

    def _write(self, k: int, m, info: dict):
        now = time.time()
        dt = max(now - self.t_last, 1e-9)
        rate = self.steps / dt
        rec = {"step": k, **{n: float(m[n]) for n in SCALARS}, "num_targets": int(m["num_targets"]),
               "tokens_per_s": self.tokens / dt, "steps_per_s": rate, "tflops_per_s": self.flops / dt / 1e12,
               "query_len": info["q"], "seq_len": info["S"], "time": now}
        if self.peak:
            rec["mfu"] = self.flops / dt / (self.peak * jax.device_count())
        rec["eta_s"] = (self.total_steps - k) / max((k - self.step0) / max(now - self.t_run0, 1e-9), 1e-9)
        self.t_last = now
        self._reset()
        if not self.is_main:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.writer is not None:
            for n, v in rec.items():
                if n not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{n}", v, k)
        mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
        log(f"step {k}/{self.total_steps} | loss {rec['loss']:.4f} (ce {rec['ce_loss']:.4f}, "
            f"dsm {rec['dsm_loss']:.4f}) | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
            f"{rec['tokens_per_s']:,.0f} tok/s | {rate:.2f} step/s{mfu} | ETA {fmt_time(rec['eta_s'])}")

    def close(self):
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
