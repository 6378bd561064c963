"""Data faults injected into the real pipeline: record counts that survive a restore, a source whose
every image is missing, unsafe image files (escaping symlinks, FIFO, device, oversized), literal
<latent_image> in text, and a collator error or end of data on one of 2 processes (jax.distributed
on localhost; the worker is this file run as a script)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
SCFG = dict(image_size=16, num_image_tokens=9, max_length=256, query_lens=(4, 16), max_questions=3,
            max_instruct_len=64)
GOOD = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]


def _write_jsonl(path, recs):
    with open(path, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def _dataset(path, tokdir, image_folder, **kw):
    from fusion_jax.data.pipeline import PipelineConfig, build_dataset, open_source
    from fusion_jax.data.sample import SampleConfig, SampleProcessor
    from fusion_jax.data.tokenizer import load_tokenizer
    proc = SampleProcessor(load_tokenizer(tokdir), SampleConfig(**SCFG), image_folder=image_folder)
    cfg = dict(batch_size=2, seed=0, seq_buckets=(128, 256), process_index=0, process_count=1)
    cfg.update(kw)
    return build_dataset(open_source(path), proc, PipelineConfig(**cfg))


@pytest.fixture(scope="module")
def tokdir(tmp_path_factory):
    from fusion_jax.data.testing import make_tokenizer_folder
    return make_tokenizer_folder(str(tmp_path_factory.mktemp("tok") / "tok"))


# ----------------------------------------------------------------------------- records counted

def test_stats_records_counts_used_and_skipped_and_survives_restore(tmp_path, tokdir):
    from fusion_jax.data.pipeline import DataIterator
    from fusion_jax.data.testing import write_dataset
    path, imgs = write_dataset(str(tmp_path), 20, size=24, bad=True)  # 20 usable + 10 bad records
    it = DataIterator(_dataset(path, tokdir, imgs, batch_size=4, order="sequential", num_epochs=1))
    assert sum(len(b["ids"]) for b in it) == 20
    st = it.stats()
    assert st["records"] == 30 and sum(st["skipped"].values()) == 10
    it = DataIterator(_dataset(path, tokdir, imgs, batch_size=4))  # shuffled, repeated
    used = sum(len(next(it)["ids"]) for _ in range(5))
    st, state = it.stats(), it.get_state()
    assert st["records"] == used + sum(st["skipped"].values()) > used
    it2 = DataIterator(_dataset(path, tokdir, imgs, batch_size=4))
    it2.set_state(json.loads(json.dumps(state)))  # as the checkpoint stores it
    assert it2.stats()["records"] == st["records"]
    nxt = next(it2)
    assert it2.stats()["records"] == st["records"] + len(nxt["ids"]) + sum(nxt["skipped"].values())
    old = {k: v for k, v in state.items() if k != "records"}  # written before "records" existed
    it2.set_state(old)
    assert it2.stats()["records"] == st["records"]


# ----------------------------------------------------------------------------- nothing usable

def test_every_image_missing_raises_instead_of_spinning(tmp_path, tokdir):
    from fusion_jax.data.hosts import NoUsableDataError
    from fusion_jax.data.pipeline import DataIterator
    recs = [{"id": f"r{i}", "image": f"img{i}.png", "conversations": GOOD} for i in range(6)]
    path = _write_jsonl(tmp_path / "d.jsonl", recs)
    (tmp_path / "empty").mkdir()  # a wrong image folder
    t0 = time.time()  # repeated forever; (a 6-record set reshuffled per epoch is slow: sequential here)
    it = DataIterator(_dataset(path, tokdir, str(tmp_path / "empty"), order="sequential"))
    with pytest.raises(NoUsableDataError, match=r"1000 records in a row.*missing_image x1000 \(e\.g\. r0: .*img0"):
        next(it)
    print(f"default max_consecutive_skips=1000 raised after {time.time() - t0:.2f}s")
    it = DataIterator(_dataset(path, tokdir, str(tmp_path / "empty"), max_consecutive_skips=50))  # shuffled
    with pytest.raises(NoUsableDataError, match=r"50 records in a row.*missing_image x50"):
        next(it)
    it = DataIterator(_dataset(path, tokdir, str(tmp_path / "empty"), order="sequential", num_epochs=1))
    with pytest.raises(NoUsableDataError, match=r"ended after 6 records, none usable: missing_image x6 \(e\.g\. r0"):
        next(it)
    from fusion_jax.data.records import InputError
    with pytest.raises(InputError, match="no records"):
        _dataset(_write_jsonl(tmp_path / "none.jsonl", []), tokdir, None)


# ----------------------------------------------------------------------------- unsafe image files

def _unsafe_folder(tmp_path):
    from fusion_jax.data.images import DEFAULT_MAX_FILE_BYTES
    from fusion_jax.data.testing import gradient_image
    d = tmp_path / "images"
    d.mkdir()
    gradient_image(24, 24).save(d / "good.png")
    gradient_image(24, 24).save(tmp_path / "outside.png")
    os.symlink(d / "good.png", d / "inner.png")               # inside the folder: fine
    os.symlink(tmp_path / "outside.png", d / "escape.png")    # a valid image, but outside
    os.symlink("/etc/hostname", d / "host.png")
    os.symlink("/dev/null", d / "null.png")
    os.mkfifo(d / "fifo.png")                                 # opening it would block forever
    (d / "dir.png").mkdir()
    with open(d / "big.png", "wb") as f:                      # sparse: no disk used
        f.truncate(DEFAULT_MAX_FILE_BYTES + 1)
    return d


UNSAFE = {"escape.png": "image_link_escapes", "host.png": "image_link_escapes", "null.png": "image_link_escapes",
          "fifo.png": "not_a_regular_file", "dir.png": "not_a_regular_file", "big.png": "image_file_too_large"}


def test_unsafe_image_files_are_refused_unread(tmp_path):
    from fusion_jax.data import images as L
    d = _unsafe_folder(tmp_path)
    result = {}

    def read_all():
        for name, reason in UNSAFE.items():
            with pytest.raises(L.ImageError) as e:
                L.read_image_file(L.resolve_image_path(str(d), name))
            result[name] = (e.value.reason, reason)
    t = threading.Thread(target=read_all, daemon=True)  # a FIFO opened for reading would block it
    t.start()
    t.join(30)
    assert not t.is_alive(), "reading the unsafe files hung (FIFO opened?)"
    assert all(got == want for got, want in result.values()) and len(result) == len(UNSAFE), result
    with pytest.raises(L.ImageError) as e:  # a device named directly, inside its folder
        L.read_image_file(L.resolve_image_path("/dev", "null"))
    assert e.value.reason == "not_a_regular_file" and "device" in e.value.detail
    with pytest.raises(L.ImageError) as e:
        L.read_image_file(L.resolve_image_path(str(d), "good.png"), max_bytes=100)
    assert e.value.reason == "image_file_too_large"
    assert L.read_image_file(L.resolve_image_path(str(d), "inner.png"))[:4] == b"\x89PNG"


def test_unsafe_image_files_are_counted_skips_in_pipeline_and_check(tmp_path, tokdir, capsys):
    from fusion_jax.data.__main__ import main as cli_main
    d = _unsafe_folder(tmp_path)
    names = ["good.png", "inner.png", *UNSAFE]
    path = _write_jsonl(tmp_path / "d.jsonl", [{"id": n, "image": n, "conversations": GOOD} for n in names])
    it = iter(_dataset(path, tokdir, str(d), order="sequential", num_epochs=1))
    assert [i for b in it for i in b["ids"]] == ["good.png", "inner.png"]
    st = it.stats()
    assert st["skipped"] == {"image_link_escapes": 3, "not_a_regular_file": 2, "image_file_too_large": 1}
    assert st["skipped_examples"]["not_a_regular_file"] == ["fifo.png", "dir.png"] and st["records"] == 8
    for extra in ([], ["--no-decode"]):  # `check` reports the same reasons, decoding or not
        rc = cli_main(["check", path, "--image-folder", str(d), "--tokenizer", tokdir, "--json", *extra])
        rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 0 and rep["usable"] == 2 and rep["skipped"] == st["skipped"], rep
        assert rep["skipped_fraction"] == 0.75


# ----------------------------------------------------------------------------- <latent_image> in text

@pytest.mark.parametrize("turn", [0, 1])
def test_literal_latent_image_tag_is_a_counted_skip(tmp_path, tokdir, turn):
    from fusion_jax.data.records import Skip, conversation_rounds
    conv = [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A cat."}]
    conv[turn]["value"] += " <latent_image>"
    with pytest.raises(Skip) as e:
        conversation_rounds({"conversations": conv}, has_image=False)
    assert e.value.reason == "bad_latent_tag"
    recs = [{"id": "ok", "conversations": [dict(GOOD[0], value="What?"), GOOD[1]]},
            {"id": "lat", "conversations": conv}]
    it = iter(_dataset(_write_jsonl(tmp_path / "d.jsonl", recs), tokdir, None, batch_size=1,
                       order="sequential", num_epochs=1))
    assert [b["ids"] for b in it] == [["ok"]]
    st = it.stats()
    assert st["skipped"] == {"bad_latent_tag": 1} and st["skipped_examples"]["bad_latent_tag"] == ["lat"]


# ----------------------------------------------------------------------------- hosts agree

def test_host_agreement_rows():
    from fusion_jax.data import hosts
    ok = [hosts.encode_row((128, 16), None), hosts.encode_row((256, 8), None)]
    assert hosts.resolve(np.stack(ok), 3) == (256, 16)
    end = [ok[0], hosts.encode_row((0, 0), StopIteration())]
    assert hosts.resolve(np.stack(end), 3) is None
    err = hosts.encode_row((0, 0), ValueError("ü" * 500))  # cut inside a character: still decodes
    with pytest.raises(hosts.HostDataError, match=r"step 3 on 1 of 3 processes: process 2: ValueError: ü"):
        hosts.resolve(np.stack(end + [err]), 3)


def _host_scenarios(tmp: str, tokdir: str, pid: int, nproc: int) -> dict:
    """Three pipelines over 8 records, sharded [pid::2]; each the real code path of a fault."""
    from fusion_jax.data.pipeline import DataIterator
    from fusion_jax.data.testing import gradient_image
    img = os.path.join(tmp, "img")
    os.makedirs(img, exist_ok=True)
    gradient_image(24, 24).save(os.path.join(img, f"p{pid}.png"))
    long_q = "Describe the picture in detail, the dogs and the park and the river bank, " * 3
    odd_q = [long_q, "What?"]  # process 1's records: instructs too long for the bucket
    scen = {"collate_error": [{"id": f"c{i}", "image": f"p{pid}.png", "conversations": [
                dict(GOOD[0], value="<image>\n" + (odd_q[0] if i % 2 else "What?")), GOOD[1]]}
                for i in range(8)],
            "no_usable": [{"id": f"n{i}", "image": f"p{pid}.png" if i % 2 == 0 else "gone.png",
                           "conversations": GOOD} for i in range(8)],
            "end_of_data": [{"id": f"e{i}", "image": "gone.png" if i in (5, 7) else f"p{pid}.png",
                             "conversations": GOOD} for i in range(8)]}
    out = {}
    for name, recs in scen.items():
        path = _write_jsonl(os.path.join(tmp, f"{name}_{pid}.jsonl"), recs)
        it = DataIterator(_dataset(path, tokdir, img, order="sequential", num_epochs=1, instruct_buckets=(16,),
                                   max_consecutive_skips=3, process_index=pid, process_count=nproc))
        n, err = 0, None
        try:
            for _ in it:
                n += 1
        except Exception as e:  # noqa: BLE001 - reported to the test
            err = f"{type(e).__name__}: {e}"
        out[name] = {"batches": n, "error": err, "stats": {k: it.stats()[k] for k in ("records", "dropped_remainder")}}
    return out


def worker(pid: int, nproc: int, port: int, tmp: str, tokdir: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=nproc, process_id=pid,
                               initialization_timeout=120)
    res = _host_scenarios(tmp, tokdir, pid, nproc)
    with open(os.path.join(tmp, f"out_{pid}.json"), "w") as f:
        json.dump(res, f)
    jax.distributed.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_fault_on_one_host_reaches_every_host(tmp_path, tokdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    port = _free_port()
    logs = [open(tmp_path / f"log_{p}.txt", "w") for p in range(2)]
    procs = [subprocess.Popen([sys.executable, HERE, str(p), "2", str(port), str(tmp_path), tokdir], env=env,
                              cwd=REPO, stdout=logs[p], stderr=subprocess.STDOUT) for p in range(2)]
    deadline = time.time() + 240
    try:
        rcs = [p.wait(timeout=max(1, deadline - time.time())) for p in procs]
    except subprocess.TimeoutExpired:
        rcs = "timeout (a host hung)"
    finally:
        for p in procs:
            p.kill()
        for f in logs:
            f.close()
    text = "\n".join((tmp_path / f"log_{p}.txt").read_text()[-3000:] for p in range(2))
    assert rcs == [0, 0], f"{rcs}\n{text}"
    r0, r1 = (json.loads((tmp_path / f"out_{p}.json").read_text()) for p in range(2))
    for r in (r0, r1):  # the same error on both hosts, naming process 1 and its cause
        assert r["collate_error"]["batches"] == 0
        assert "HostDataError" in r["collate_error"]["error"]
        assert "process 1: ValueError: instructs of" in r["collate_error"]["error"]
        assert r["no_usable"]["batches"] == 0
        assert "process 1: NoUsableDataError: no usable record in 3 records in a row" in r["no_usable"]["error"]
        # process 1 has one batch, process 0 two: both stop after one, nobody waits
        assert r["end_of_data"]["batches"] == 1 and r["end_of_data"]["error"] is None
    assert r0["end_of_data"]["stats"] == {"records": 4, "dropped_remainder": 2}
    assert r1["end_of_data"]["stats"] == {"records": 4, "dropped_remainder": 0}


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
