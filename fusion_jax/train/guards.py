"""What stops a run cleanly: a stop signal that every host obeys at the same step, and the
data skip budget (`data.max_skip_fraction`).

Several hosts must take the same decision at the same step: a host that stops (or raises) alone
leaves the others waiting in the next collective or the checkpoint barrier forever.
"""
from __future__ import annotations

import os
import signal

import jax
import numpy as np

from fusion_jax.train.metrics import TrainingError


def _preemption_service() -> bool:
    """Whether JAX's preemption sync service runs: jax.distributed.initialize starts it unless
    jax_enable_preemption_service is off."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def _any_host(flag: int) -> int:
    """The largest of every host's `flag` (a host sync: all hosts must call it at the same step)."""
    from jax.experimental import multihost_utils
    return int(np.max(multihost_utils.process_allgather(np.int32(flag))))


class Stopper:
    """SIGTERM / SIGINT: finish the current step, save a checkpoint, exit; every host at one step.

    One process: the signal sets a flag, nothing is synced per step. Several: JAX's preemption
    sync service owns SIGTERM; a notice on any host makes reached_preemption_sync_point(step) true
    on every host at the same step (the hosts' highest step + 1). SIGINT is handed to it as a
    SIGTERM. Without that service the hosts agree on their flags every step (a host sync).
    """

    def __init__(self):
        self.signum = None
        self._old = {}
        self.hosts = jax.process_count()
        self.service = self.hosts > 1 and _preemption_service()

    def __enter__(self):
        for s in (signal.SIGINT,) if self.service else (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: give up at once
            raise KeyboardInterrupt
        self.signum = signum
        # os.write: a print() here could re-enter a print that the signal interrupted
        os.write(2, f"\nprocess {jax.process_index()} received {signal.Signals(signum).name}: saving a "
                    f"checkpoint after this step (on every host), then exiting\n".encode())
        if self.service:
            os.kill(os.getpid(), signal.SIGTERM)

    def __exit__(self, *a):
        for s, h in self._old.items():
            if h is not None:  # None: a handler installed outside Python, left as it is
                signal.signal(s, h)

    def reason(self, tc, step: int, start: int) -> str | None:
        """Why to stop after `step` (None: go on); the same answer on every host."""
        if self.service:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(step):
                return "signal (preemption notice on a host; every host stops at this step)"
        else:
            sig = _any_host(self.signum or 0) if self.hosts > 1 else self.signum or 0
            if sig:
                return "signal " + signal.Signals(sig).name
        return "stop_after" if 0 < tc.stop_after <= step - start else None


class SkipBudget:
    """data.max_skip_fraction: stop when more than that share of the records read so far was
    skipped, once a global batch's worth of records was read (a wrong image_folder fails in
    seconds instead of training on the text-only records). One host: checked every step; several:
    at log steps, on the totals over all hosts, so that they all stop at the same step."""

    def __init__(self, tc, per_process_batch: int):
        self.max_fraction = float(tc.data.max_skip_fraction)
        if not 0 <= self.max_fraction <= 1:
            raise ValueError(f"config.data.max_skip_fraction: must be in [0, 1], got {self.max_fraction}")
        self.batch, self.min_records = per_process_batch, int(tc.global_batch_size)
        self.hosts = jax.process_count()
        self.every = int(tc.log_every) if self.hosts > 1 else 1

    def counts(self, it) -> dict:
        """This host's cumulative counts (restored with the iterator state): records read (used
        and skipped), skipped per reason, up to 5 record ids per reason."""
        st = it.stats()
        skipped = {k: int(v) for k, v in st.get("skipped", {}).items()}
        records = st.get("records")
        if records is None:  # an iterator without the count: every batch is full
            records = st["steps"] * self.batch + sum(skipped.values()) + st.get("dropped_remainder", 0)
        return {"records": int(records), "skipped": skipped, "examples": st.get("skipped_examples", {})}

    def check(self, it, step: int) -> dict:
        """counts(it); raises TrainingError past the budget."""
        c = self.counts(it)
        if step % self.every:
            return c
        n_skip, n = sum(c["skipped"].values()), c["records"]
        if self.hosts > 1:
            from jax.experimental import multihost_utils
            both = multihost_utils.process_allgather(np.asarray([n_skip, n], np.int32))
            n_skip, n = (int(v) for v in np.asarray(both).reshape(-1, 2).sum(0))
        if n >= self.min_records and n_skip > self.max_fraction * n:
            raise TrainingError(self._message(c, step, n_skip, n))
        return c

    def _message(self, c: dict, step: int, n_skip: int, n: int) -> str:
        top = sorted(c["skipped"].items(), key=lambda kv: -kv[1])[:3]
        reasons = "; ".join(f"{r}: {k} (e.g. record {', '.join(map(str, c['examples'].get(r, [])[:1])) or '?'})"
                            for r, k in top)
        host = f" (on process {jax.process_index()})" if self.hosts > 1 else ""
        return (f"step {step}: {n_skip} of the {n} records read so far were skipped ({n_skip / n:.0%}, more than "
                f"data.max_skip_fraction = {self.max_fraction}): stopping. Top reasons{host}: {reasons}. "
                f"Check data.image_folder and data.path; `python -m fusion_jax.data check` lists every bad record.")
