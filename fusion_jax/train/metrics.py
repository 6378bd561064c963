"""Training metrics: the NaN guard, metrics.jsonl, TensorBoard and the console line.

A step's metrics are read one step late, so the host never waits on the device between steps.
metrics.jsonl is only appended to: a resumed run logs the steps after its checkpoint again, and
readers take the last record per step (`read_metrics`).
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


def read_metrics(path: str) -> list[dict]:
    """The records of metrics.jsonl in step order, the last one per step: a resumed run appends the
    steps after its checkpoint again (the file is never rewritten). Lines that are not JSON (a line
    torn by a crash) are left out."""
    last = {}
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "step" in rec:
                last[rec["step"]] = rec
    return [last[k] for k in sorted(last)]


def cut_torn_tail(path: str):
    """Drop a half-written last line (a crash mid-write), so that appended records start a line."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - (1 << 16))
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return
            i = chunk.rfind(b"\n")
            if i >= 0:
                f.truncate(start + i + 1)
                return
            pos = start
        f.truncate(0)


def batch_info(cfg, raw: dict, batch: dict) -> dict:
    """What the throughput numbers need from one step's batch."""
    return {"tokens": int(np.asarray(raw["attention_mask"]).sum()) * jax.process_count(),
            "q": int(raw["query_len"]), "S": int(np.asarray(raw["token_ids"]).shape[1]),
            "flops": flops_lib.train_flops_per_step(cfg, {k: v.shape for k, v in batch.items()})}


def _skip_counts(rec: dict, data: dict | None) -> str:
    """Adds the data iterator's cumulative counts (this host's) to `rec`; the progress line's part."""
    if not data:
        return ""
    n = sum(data["skipped"].values())
    rec.update(data_records=data["records"], data_skipped_total=n, data_skipped=data["skipped"])
    top = sorted(data["skipped"].items(), key=lambda kv: -kv[1])[:3]
    return f" | skipped {n}/{data['records']}" + (f" ({', '.join(f'{r} {c}' for r, c in top)})" if top else "")


class MetricsLogger:
    """push(step, device metrics, batch info) after each step; flush() before a checkpoint."""

    def __init__(self, workdir: str, *, total_steps: int, start: int, log_every: int, tensorboard: bool,
                 last_good=lambda: "none", max_nonfinite: int = 0):
        self.is_main = jax.process_index() == 0
        self.total_steps, self.log_every, self.last_good = total_steps, log_every, last_good
        if not isinstance(max_nonfinite, int) or isinstance(max_nonfinite, bool) or max_nonfinite < 0:
            raise ValueError(f"config.optim.max_nonfinite_steps: must be an integer >= 0, got {max_nonfinite!r}")
        self.max_nonfinite, self.nonfinite_run, self.nonfinite_total = max_nonfinite, 0, 0
        self.file = None
        if self.is_main:
            path = os.path.join(workdir, "metrics.jsonl")
            cut_torn_tail(path)
            self.file = open(path, "a")
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
        self.tokens += info["tokens"]
        self.steps += 1
        self.flops += info["flops"]
        if not bool(m["finite"]):
            self._nonfinite(k, m)
            return
        self.nonfinite_run = 0
        self.last = m
        if k % self.log_every == 0 or k == self.total_steps:
            self._write(k, m, info)

    def _nonfinite(self, k: int, m):
        """A NaN/Inf step (its update was not applied): skipped within the budget, else a stop."""
        self.nonfinite_run += 1
        loss, gnorm = float(m["loss"]), float(m["grad_norm"])
        if self.nonfinite_run > self.max_nonfinite:
            budget = (f"; {self.nonfinite_run} such steps in a row, more than optim.max_nonfinite_steps = "
                      f"{self.max_nonfinite}" if self.max_nonfinite else "")
            raise TrainingError(
                f"step {k}: loss is {loss} (grad norm {gnorm}){budget}: stopping. "
                f"The update of this step was not applied and no checkpoint was written after it; the "
                f"last good checkpoint is {self.last_good()}. Lower optim.lr, check the "
                f"data of this step, or use compute_dtype=float32.")
        self.nonfinite_total += 1
        rec = {"step": k, "event": "nonfinite_skipped", "nonfinite_loss": str(loss), "nonfinite_grad_norm": str(gnorm),
               "in_a_row": self.nonfinite_run, "time": time.time()}
        self._emit(rec, f"step {k}: loss {loss} (grad norm {gnorm}): update skipped ({self.nonfinite_run} in a "
                        f"row, optim.max_nonfinite_steps = {self.max_nonfinite}); the data moves on")

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
        skips = _skip_counts(rec, info.get("data"))
        self.t_last = now
        self._reset()
        mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
        self._emit(rec, f"step {k}/{self.total_steps} | loss {rec['loss']:.4f} (ce {rec['ce_loss']:.4f}, "
                        f"dsm {rec['dsm_loss']:.4f}) | lr {rec['lr']:.2e} | gnorm {rec['grad_norm']:.3f} | "
                        f"{rec['tokens_per_s']:,.0f} tok/s | {rate:.2f} step/s{mfu} | ETA {fmt_time(rec['eta_s'])}"
                        f"{skips}")

    def _emit(self, rec: dict, line: str):
        """One record to metrics.jsonl and TensorBoard, one line to the console (process 0)."""
        if not self.is_main:
            return
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()
        if self.writer is not None:
            for n, v in rec.items():
                if n not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{n}", v, rec["step"])
        log(line)

    def close(self):
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()
