"""Training metrics: the NaN guard, metrics.jsonl, TensorBoard and the console line.

A step's metrics are read one step late, so the host never waits on the device between steps.
metrics.jsonl is only appended to: a resumed run logs the steps after its checkpoint again, and
readers take the last record per step (`read_metrics`). A cloud object (gs://) cannot be appended
to: there `JsonlLog` rewrites the whole (small) object at most every CLOUD_SYNC_S seconds and always
before a checkpoint and at close; an upload replaces the object whole, so it is never torn.
TensorBoard event files are written locally and copied into a cloud workdir at each sync.
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import numpy as np
from etils import epath

from fusion_jax import paths
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
    steps after its checkpoint again (no record is ever changed or removed). Lines that are not JSON (a line
    torn by a crash) are left out."""
    last = {}
    for line in epath.Path(path).read_bytes().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "step" in rec:
            last[rec["step"]] = rec
    return [last[k] for k in sorted(last)]


def _whole_lines_end(f, end: int) -> int:
    """The length of `f`'s content up to its last newline (0 when it has none)."""
    pos = end
    while pos > 0:
        start = max(0, pos - (1 << 16))
        f.seek(start)
        chunk = f.read(pos - start)
        if pos == end and chunk.endswith(b"\n"):
            return end
        i = chunk.rfind(b"\n")
        if i >= 0:
            return start + i + 1
        pos = start
    return 0


def cut_torn_tail(path: str):
    """Drop a half-written last line of a local file (a crash mid-write), so that appended records
    start a line. (A cloud object is replaced whole, never torn: JsonlLog cuts its copy in memory.)"""
    p = epath.Path(path)
    if paths.is_url(path) or not p.is_file():
        return
    with p.open("rb") as f:
        end = f.seek(0, os.SEEK_END)
        keep = _whole_lines_end(f, end)
    if keep != end:
        os.truncate(path, keep)


CLOUD_SYNC_S = 30.0


class JsonlLog:
    """An append-only JSONL file. Local: the torn tail is cut on open, each line appended and flushed.
    Cloud URL: the object is read once, kept in memory, and rewritten whole at sync() (at most every
    CLOUD_SYNC_S seconds from write(); the loop syncs before each checkpoint, so every record up to the
    last checkpoint is in the bucket, and the steps after it are logged again on resume)."""

    def __init__(self, path: str):
        self.path, self.cloud = epath.Path(path), paths.is_url(path)
        if self.cloud:
            data = self.path.read_bytes() if self.path.exists() else b""
            self.buf = bytearray(data[:data.rfind(b"\n") + 1])
            self.dirty, self.t_sync = False, time.time()
        else:
            cut_torn_tail(path)
            self.file = self.path.open("a")

    def write(self, line: str):
        if not self.cloud:
            self.file.write(line + "\n")
            self.file.flush()
            return
        self.buf += (line + "\n").encode()
        self.dirty = True
        if time.time() - self.t_sync >= CLOUD_SYNC_S:
            self.sync()

    def sync(self):
        if self.cloud and self.dirty:
            self.path.write_bytes(bytes(self.buf))
            self.dirty, self.t_sync = False, time.time()

    def close(self):
        if self.cloud:
            self.sync()
        else:
            self.file.close()


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
        self.file = JsonlLog(paths.join(workdir, "metrics.jsonl")) if self.is_main else None
        self.writer = _TensorBoard(workdir) if self.is_main and tensorboard else None
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
        self.file.write(json.dumps(rec))
        if self.writer is not None:
            for n, v in rec.items():
                if n not in ("step", "time") and isinstance(v, (int, float)):
                    self.writer.add_scalar(f"train/{n}", v, rec["step"])
        log(line)

    def sync(self):
        """Everything logged so far into the workdir (a cloud workdir: uploaded); before each checkpoint."""
        if self.file:
            self.file.sync()
        if self.writer is not None:
            self.writer.sync()

    def close(self):
        if self.file:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


class _TensorBoard:
    """tensorboardX's SummaryWriter. A cloud workdir: tensorboardX writes gs:// only through extra
    packages (TensorFlow's gfile), so the event files go to a local folder and are copied into
    WORKDIR/tensorboard at each sync and at close."""

    def __init__(self, workdir: str):
        import tempfile

        from tensorboardX import SummaryWriter
        self.dest = paths.join(workdir, "tensorboard")
        self.local = tempfile.mkdtemp(prefix="fusion_tb_") if paths.is_url(workdir) else self.dest
        self.w = SummaryWriter(self.local)
        if self.local != self.dest:
            log(f"tensorboard: event files are written to {self.local} and copied to {self.dest} at each "
                f"checkpoint")

    def add_scalar(self, *a):
        self.w.add_scalar(*a)

    def sync(self):
        if self.local != self.dest:
            self.w.flush()
            paths.copy_tree(self.local, self.dest)

    def close(self):
        self.w.close()
        self.sync()

