"""Resume faults (issue 31): an unrestorable checkpoint falls back to the previous good step, temp
folders of an interrupted save go, keep_checkpoints is checked, and config drift is an error.

One tiny 6-step run (checkpoints at 2, 4, 6) is made once; every test resumes a copy of it.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest

from fusion_jax.train import loop, presets
from fusion_jax.train.checkpoint import UNRESTORABLE

TINY = {"total_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3, "log_every": 1, "tensorboard": False,
        "global_batch_size": 8, "optim.lr": 1e-2, "optim.warmup_ratio": 0.1, "vision_warmup.steps": 0,
        "data.synth.num": 80, "data.synth.workers": 1, "data.synth.image_size": 32,
        "data.max_length": 128, "data.seq_buckets": (128,), "data.max_questions": 2,
        "model.tiny.hidden_size": 64, "model.tiny.intermediate_size": 128, "model.tiny.num_hidden_layers": 2,
        "model.tiny.vision_hidden_size": 32, "model.tiny.vision_intermediate_size": 64,
        "model.tiny.vision_layers": 3, "model.num_sampler_layers": 1, "model.tiny.image_size": 16,
        "model.linear_2d": False, "model.ce_skip_empty_chunks": False}   # 8 fake devices: the mesh forms


def _tc(**kw):
    tc = presets.tiny_train_config()
    with tc.unlocked():
        del tc["heldout_eval"]   # generation would dominate the test's time
        for k, v in {**TINY, **kw}.items():
            node = tc
            *path, last = k.split(".")
            for p in path:
                node = node[p]
            node[last] = v
    return tc


def _steps(wd) -> list[str]:
    return sorted(os.listdir(os.path.join(wd, "checkpoints")), key=lambda n: (len(n), n))


def _losses(wd) -> dict:
    """The last record of each step (a resumed run logs its steps again)."""
    out = {}
    with open(os.path.join(wd, "metrics.jsonl")) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                out[r["step"]] = r["loss"]
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    wd = str(tmp_path_factory.mktemp("resume") / "base")
    r = loop.train(_tc(), wd)
    assert r["step"] == 6 and _steps(wd) == ["2", "4", "6"]
    return wd


@pytest.fixture
def wd(base, tmp_path):
    """A copy of the base run (also a moved workdir: its saved data paths name the base folder)."""
    return shutil.copytree(base, str(tmp_path / "run"))


def _truncate_largest(step_dir: str) -> str:
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir) for n in ns if "tokenizer" not in r]
    path = max(files, key=os.path.getsize)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    return path


def _corrupt_metadata(step_dir: str) -> str:
    path = os.path.join(step_dir, "params", "_METADATA")
    assert os.path.isfile(path), os.listdir(os.path.join(step_dir, "params"))
    with open(path, "w") as f:
        f.write('{"tree_metadata": {"model": ')   # a torn write
    return path


def test_unrestorable_checkpoint_falls_back_to_previous_good_step(base, wd, capsys):
    ck = os.path.join(wd, "checkpoints")
    _corrupt_metadata(os.path.join(ck, "6"))
    _truncate_largest(os.path.join(ck, "4"))
    r = loop.train(_tc(), wd)
    out = capsys.readouterr().out
    assert f"checkpoint {ck}/6 cannot be restored (JSONDecodeError: " in out
    line4 = next(x for x in out.splitlines() if x.startswith(f"checkpoint {ck}/4 cannot be restored ("))
    assert f"{ck}/4/" in line4.split("(", 1)[1], line4   # the reason names the truncated file's place
    assert f"resumed from {ck}/2" in out and "moved the unrestorable step(s) 6, 4 to" in out
    assert (r["start_step"], r["step"]) == (2, 6)
    assert sorted(os.listdir(os.path.join(wd, UNRESTORABLE))) == ["4", "6"]   # kept for a look
    assert _steps(wd) == ["2", "4", "6"]
    a, b = _losses(base), _losses(wd)   # steps 3..6 again, exactly
    assert sorted(b) == list(range(1, 7)) and all(abs(a[k] - b[k]) <= 1e-6 for k in a), (a, b)
    # no step restores: an error naming each one, and nothing moved
    for s in ("2", "4", "6"):
        _truncate_largest(os.path.join(ck, s))
    with pytest.raises(loop.TrainingError, match="no checkpoint in") as e:
        loop.train(_tc(), wd)
    assert all(f"step {s}: " in str(e.value) for s in (6, 4, 2)), e.value
    assert _steps(wd) == ["2", "4", "6"]


def test_interrupted_save_temp_folders_are_removed_on_start(wd, capsys):
    ck = os.path.join(wd, "checkpoints")
    tmp = os.path.join(ck, "8.orbax-checkpoint-tmp-1765000000000000")
    shutil.copytree(os.path.join(ck, "6"), tmp)        # a save killed before its rename
    r = loop.train(_tc(), wd)                          # the finished run: restores step 6, trains nothing
    assert (r["start_step"], r["step"]) == (6, 6)
    assert "removed 1 temp folder(s) of an interrupted save" in capsys.readouterr().out
    assert _steps(wd) == ["2", "4", "6"]


def test_keep_checkpoints_below_one_is_a_config_error():
    for bad in (0, -1, True):
        with pytest.raises(ValueError, match=r"^config\.keep_checkpoints: must be an integer >= 1"):
            loop.validate(_tc(keep_checkpoints=bad))
    loop.validate(_tc(keep_checkpoints=1))
    assert presets.base_config().keep_checkpoints == 2


def test_config_drift_is_an_error_listing_the_keys(wd, capsys):
    path = os.path.join(wd, "config.json")
    saved = open(path, "rb").read()
    changed = {"optim.lr": 2e-2, "model.tiny.hidden_size": 32, "log_every": 2}
    with pytest.raises(ValueError, match=r"^config\.model\.tiny\.hidden_size: resuming") as e:
        loop.train(_tc(**changed), wd)
    msg = str(e.value)
    assert "optim.lr: 0.01 -> 0.02" in msg and "model.tiny.hidden_size: 64 -> 32" in msg and "2 key(s)" in msg
    assert "log_every" not in msg
    with pytest.raises(ValueError, match=r"total_steps: 6 -> 4"):   # total_steps may only grow
        loop.train(_tc(total_steps=4), wd)
    assert open(path, "rb").read() == saved          # the saved config untouched
    with open(path, "wb") as f:                      # a torn config.json is an error too, and left as is
        f.write(saved[:40])
    with pytest.raises(ValueError, match=r"^config\.allow_config_change: .*config\.json .* is not valid JSON"):
        loop.train(_tc(), wd)
    assert open(path, "rb").read() == saved[:40]
    with open(path, "wb") as f:
        f.write(saved)
    r = loop.train(_tc(log_every=2, stop_after=3), wd)   # logging-only keys differ freely
    assert r["step"] == 6
    assert "(allowed): log_every: 1 -> 2; stop_after: -1 -> 3" in capsys.readouterr().out
    assert json.load(open(path))["log_every"] == 2


def test_allow_config_change_and_total_steps_growth(wd, capsys):
    path = os.path.join(wd, "config.json")
    r = loop.train(_tc(**{"optim.lr": 2e-2, "allow_config_change": True}), wd)
    assert r["step"] == 6
    assert "allow_config_change: resuming with changed keys: optim.lr: 0.01 -> 0.02" in capsys.readouterr().out
    assert json.load(open(path))["optim"]["lr"] == 2e-2
    old = [n for n in os.listdir(wd) if n.startswith("config.replaced-")]
    assert len(old) == 1 and json.load(open(os.path.join(wd, old[0])))["optim"]["lr"] == 1e-2
    r = loop.train(_tc(**{"optim.lr": 2e-2, "total_steps": 8}), wd)   # continue the run: 2 more steps
    assert (r["start_step"], r["step"]) == (6, 8) and _steps(wd) == ["4", "6", "8"]
    assert "total_steps: 6 -> 8" in capsys.readouterr().out
