"""The step loop under injected faults: a NaN batch (optim.max_nonfinite_steps), a wrong image
folder (data.max_skip_fraction), a torn metrics.jsonl line. Each runs the real loop.train on a tiny
model and a small JSONL dataset; only the fault is injected (into the real batch, folder or file)."""
from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from fusion_jax.train import loop
from fusion_jax.train.metrics import TrainingError, cut_torn_tail, read_metrics


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """40 good records (1 in 5 text-only) and 11 bad ones (counted skips, ~22%)."""
    from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
    root = tmp_path_factory.mktemp("data")
    path, imgdir = write_dataset(str(root), n=40, size=24, bad=True)
    return path, imgdir, make_tokenizer_folder(str(root / "tok"))


def _tc(data, **kw):
    from fusion_jax.data.testing import path_train_config
    return path_train_config(*data, **{"total_steps": 6, "checkpoint_every": 1, "tensorboard": False, **kw})


class _NaNAt:
    """The real data iterator; the batch of global step `at` gets NaN pixels (the injected fault).
    The step is the iterator's own count, restored on resume, so a resumed run meets it again."""

    def __init__(self, it, at: int):
        self._it, self._at = it, at

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self._it)
        if self._it.stats()["steps"] == self._at:
            b["images"] = np.full_like(b["images"], np.nan)
        return b

    def __getattr__(self, name):
        return getattr(self._it, name)


def _steps_on_disk(workdir) -> list[int]:
    return sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())


def test_nan_budget_torn_metrics_and_resume(data, tmp_path, monkeypatch, capsys):
    """NaN batch at step 4. Budget 0: the run stops, nothing past step 3 is saved or logged. Then a
    crash's leftovers (a stale step-4 record, a torn line) and a resume with the budget set: the
    resume replays step 4, skips it, logs the skip and finishes; metrics.jsonl was only appended to."""
    real = loop.build_iterator
    monkeypatch.setattr(loop, "build_iterator", lambda *a, **k: _NaNAt(real(*a, **k), 4))
    wd = str(tmp_path / "run")
    kw = {"data.max_skip_fraction": 0.9, "checkpoint_every": 3}
    with pytest.raises(TrainingError, match=r"step 4: loss is nan.*last good checkpoint is .*checkpoints/3"):
        loop.train(_tc(data, **kw), wd)
    assert _steps_on_disk(wd) == [3]  # none at or after the NaN step
    path = os.path.join(wd, "metrics.jsonl")
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    first = read_metrics(path)
    assert all(r["data_records"] >= 8 and r["data_skipped_total"] == sum(r["data_skipped"].values()) for r in first)
    assert "skipped " in capsys.readouterr().out  # the progress line carries the skip counts

    with open(path, "a") as f:  # a crashed run: step 4 logged after checkpoint 3, then a torn line
        f.write(json.dumps({"step": 4, "loss": 99.0, "stale": True}) + "\n" + '{"step": 5, "lo')
    kept = open(path, "rb").read().rsplit(b"\n", 1)[0] + b"\n"
    r = loop.train(_tc(data, **kw, **{"optim.max_nonfinite_steps": 1, "allow_config_change": True}), wd)
    assert (r["start_step"], r["step"], r["stopped"], r["nonfinite_skipped"]) == (3, 6, None, 1)
    raw = open(path, "rb").read()
    assert raw.startswith(kept)  # appended, never rewritten
    lines = [json.loads(x) for x in raw.decode().splitlines()]  # the torn fragment is gone
    assert sum(x.get("stale", False) for x in lines) == 1
    recs = {x["step"]: x for x in read_metrics(path)}  # the last record per step
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert recs[4]["event"] == "nonfinite_skipped" and recs[4]["nonfinite_loss"] == "nan"
    assert all(np.isfinite(recs[k]["loss"]) for k in (5, 6))
    assert "update skipped" in capsys.readouterr().out
    # skip counts are cumulative across the resume (the iterator state carries them)
    assert recs[5]["data_records"] > recs[3]["data_records"]
    assert recs[6]["data_skipped_total"] >= recs[3]["data_skipped_total"] > 0
    assert _steps_on_disk(wd) == [3, 6]


def test_nonfinite_budget_counts_steps_in_a_row(tmp_path):
    """The budget is for steps in a row: a finite step resets it; one more than it stops the run,
    naming the budget. (The logger that decides, fed the step metrics that the train step returns.)"""
    from fusion_jax.train.metrics import SCALARS, MetricsLogger

    def metrics(loss):
        return {**{n: np.float32(loss) for n in SCALARS}, "num_targets": np.int32(1), "finite": np.isfinite(loss)}

    info = {"tokens": 1, "flops": 1.0, "q": 4, "S": 8}
    log = MetricsLogger(str(tmp_path), total_steps=9, start=0, log_every=1, tensorboard=False, max_nonfinite=1)
    for k, loss in enumerate([1.0, np.nan, 1.0, np.nan, np.inf], 1):
        log.push(k, metrics(loss), info)
    with pytest.raises(TrainingError, match=r"step 5: loss is inf.*2 such steps in a row, more than "
                                            r"optim.max_nonfinite_steps = 1"):
        log.flush()
    log.close()
    recs = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [(r["step"], r.get("event")) for r in recs] == [(1, None), (2, "nonfinite_skipped"), (3, None),
                                                           (4, "nonfinite_skipped")]
    assert log.nonfinite_total == 2
    with pytest.raises(ValueError, match=r"config\.optim\.max_nonfinite_steps"):
        MetricsLogger(str(tmp_path), total_steps=9, start=0, log_every=1, tensorboard=False, max_nonfinite=-1)


def test_wrong_image_folder_fails_fast(data, tmp_path):
    """Every image record skips (missing_image): the run stops at the first batch, naming the reason."""
    empty = tmp_path / "not_the_images"
    empty.mkdir()
    t0 = time.time()
    with pytest.raises(TrainingError, match=r"data\.max_skip_fraction = 0\.5.*missing_image: \d+ "
                                            r"\(e\.g\. record \w+\)"):
        loop.train(_tc(data, **{"data.image_folder": str(empty)}), str(tmp_path / "run"))
    assert time.time() - t0 < 120
    assert not os.path.exists(tmp_path / "run" / "checkpoints") or _steps_on_disk(tmp_path / "run") == []
    with pytest.raises(ValueError, match=r"config\.data\.max_skip_fraction"):
        loop.train(_tc(data, **{"data.max_skip_fraction": 1.5}), str(tmp_path / "run2"))


def test_torn_tail_is_cut(tmp_path):
    p = str(tmp_path / "m.jsonl")
    cases = [(b"", b""), (b'{"step": 1}\n', b'{"step": 1}\n'), (b'{"step": 1}\n{"st', b'{"step": 1}\n'),
             (b'{"st', b""), (b'{"step": 1}\n' + b"x" * 70000, b'{"step": 1}\n')]
    for before, after in cases:
        with open(p, "wb") as f:
            f.write(before)
        cut_torn_tail(p)
        assert open(p, "rb").read() == after, before[:20]
    with open(p, "w") as f:
        f.write('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.0}\nnot json\n{"step": 1, "loss": 3.0}\n')
    assert read_metrics(p) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 1.0}]
