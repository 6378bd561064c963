"""Evaluation at scale on a tiny checkpoint: bad questions counted (exit status 1) without losing
the other answers; --resume after a kill gives the uninterrupted file byte for byte; PIL images,
per-question instructs and max_new_tokens; --mesh on 8 CPU devices gives the one-device answers;
the 8B preset's parameters are sharded under --dtype bfloat16 --mesh (abstract shapes only);
2 processes under jax.distributed answer disjoint shards merged in question order.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.abspath(__file__)
REPO = os.path.dirname(os.path.dirname(HERE))
GOOD = 6     # answerable questions in the fixture file


def _questions(image_folder):
    qs = []
    for i in range(GOOD):
        q = {"question_id": f"q{i}", "text": f"What is shown in picture {i}?", "category": "x"}
        if i % 3 != 2:                                   # every third one is text-only
            q["image"] = f"img{i % 2}.png"
        if i == 4:
            q["max_new_tokens"] = 2                      # its own group
        qs.append(q)
    return qs


BAD = [{"question_id": "missing", "text": "?", "image": "nope.png"},
       {"question_id": "unsafe", "text": "?", "image": "../img0.png"},
       {"question_id": "nokey"},
       {"question_id": "long", "text": "word " * 800}]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fusion_jax.data.testing import gradient_image
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    root = tmp_path_factory.mktemp("scale")
    ckpt, model, tok = write_tiny_checkpoint(str(root / "ckpt"), seed=1)
    imgs = root / "images"
    imgs.mkdir()
    for i in range(2):
        gradient_image(40 + 8 * i, 36, seed=i).save(imgs / f"img{i}.png")
    good = _questions(str(imgs))
    qfile = root / "questions.jsonl"
    lines = [json.dumps(q) for q in good[:3]] + [json.dumps(b) for b in BAD[:2]] + ["{not json"] + \
        [json.dumps(q) for q in good[3:]] + [json.dumps(b) for b in BAD[2:]]
    qfile.write_text("\n".join(lines) + "\n")
    return dict(root=root, ckpt=ckpt, model=model, tok=tok, imgs=str(imgs), qfile=str(qfile), good=good)


def _cli(s, out, *extra):
    from fusion_jax.eval.__main__ import main
    return main(["--ckpt", s["ckpt"], "--questions", s["qfile"], "--image-folder", s["imgs"], "--out", str(out),
                 "--batch-size", "2", "--max-new-tokens", "3", "--query-len", "4", "--seq-bucket", "128",
                 "--no-progress", *extra])


@pytest.fixture(scope="module")
def baseline(setup):
    out = setup["root"] / "base.jsonl"
    assert _cli(setup, out) == 1                      # bad questions -> non-zero status at the end
    return out


def test_bad_questions_are_counted_not_fatal(setup, baseline):
    rows = [json.loads(x) for x in open(baseline)]
    assert [r["question_id"] for r in rows] == [q["question_id"] for q in setup["good"]]
    fails = [json.loads(x) for x in open(str(baseline).replace(".jsonl", ".failures.jsonl"))]
    reasons = {f["question_id"]: f["reason"] for f in fails}
    assert set(reasons) == {"missing", "unsafe", "nokey", "long", None}
    assert "missing_image" in reasons["missing"] and "unsafe_image_path" in reasons["unsafe"]
    assert reasons["nokey"].startswith("malformed") and "max_length" in reasons["long"]
    assert "line 6" in reasons[None]
    assert not os.path.exists(str(baseline) + ".parts")


def test_resume_after_kill_gives_the_same_file(setup, baseline, monkeypatch):
    from fusion_jax.eval import scale
    out = setup["root"] / "resumed.jsonl"
    real_flush, calls = scale.ChunkWriter.flush, []

    def killed_after_one_chunk(self):
        if calls:
            raise KeyboardInterrupt          # the process dies before its second chunk lands
        calls.append(1)
        real_flush(self)

    monkeypatch.setattr(scale.ChunkWriter, "flush", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        _cli(setup, out, "--flush-every", "2")
    monkeypatch.undo()
    parts = out.parent / (out.name + ".parts")
    done = sorted(parts.glob("*.jsonl"))
    assert len(done) == 1 and not out.exists()
    (parts / "p00000-dead-000001.jsonl.tmp-0123").write_text('{"question_id": "q5", "te')  # torn write
    assert _cli(setup, out, "--resume") == 1
    assert out.read_bytes() == baseline.read_bytes()
    assert not parts.exists()


def test_run_eval_pil_images_and_overrides(setup):
    from PIL import Image

    from fusion_jax.eval.runner import prepare, run_eval
    from fusion_jax.generate import GenerationConfig, answer
    model, tok = setup["model"], setup["tok"]
    img = Image.open(os.path.join(setup["imgs"], "img1.png"))
    qs = [{"question_id": 1, "text": "Describe.", "image": img, "max_new_tokens": 2},
          {"question_id": 2, "text": "Describe.", "image": "img1.png"}]
    g = GenerationConfig(max_new_tokens=3, query_len=4, seq_bucket=128)
    rows = run_eval(model, tok, qs, image_folder=setup["imgs"], gcfg=g, batch_size=2, progress=False)
    assert [r["question_id"] for r in rows] == [1, 2]                # one batch per max_new_tokens
    want = answer(model, tok, [{"question": "Describe.", "image": img}], g)[0]
    assert rows[1]["text"] == want and want.startswith(rows[0]["text"])   # 2 tokens vs 3
    # the per-question vision instructs travel with the request (generate.prompts.answer reads them)
    assert prepare(model, tok, dict(qs[1], instructs="colour"), setup["imgs"], g)["instructs"] == "colour"


def test_mesh_on_8_devices_matches_one_device(setup, baseline):
    import jax
    assert jax.device_count() == 8
    out = setup["root"] / "mesh.jsonl"
    assert _cli(setup, out, "--mesh", "1,4,2", "--dtype", "float32", "--limit", "3") == 1   # the malformed line
    assert out.read_text().splitlines() == baseline.read_text().splitlines()[:3]


def test_bfloat16_mesh_loading(setup):
    """--dtype bfloat16 --mesh: parameters restored in bfloat16 onto the process-local mesh."""
    import argparse

    from fusion_jax.eval.scale import add_scale_args, load_for_eval
    from fusion_jax.generate.cli import add_generation_args
    from fusion_jax.hf_io import flat_state
    ap = argparse.ArgumentParser()
    add_generation_args(ap)
    add_scale_args(ap)
    _, model = load_for_eval(ap.parse_args(["--ckpt", setup["ckpt"], "--dtype", "bfloat16", "--mesh", "1,-1,1"]))
    params = {n: v.get_value() for n, v in flat_state(model).items()}
    assert model.cfg.compute_dtype == "bfloat16"
    assert {str(a.dtype) for a in params.values()} == {"bfloat16"}
    assert any(len(a.sharding.device_set) == 8 and a.sharding.shard_shape(a.shape) != a.shape
               for a in params.values())


def test_generate_missing_image_fails_before_loading(capsys):
    from fusion_jax.generate.cli import main
    assert main(["--ckpt", "/nonexistent/ckpt", "--image", "missing.png", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "missing.png" in err and "does not exist" in err and "nonexistent" not in err


def test_8b_preset_parameters_are_sharded():
    """What `--dtype bfloat16 --mesh 1,-1,1` restores onto: every large parameter split 8 ways."""
    import jax

    from fusion_jax.hf_io import abstract_model, flat_state, param_shardings
    from fusion_jax.sharding import make_mesh
    from fusion_jax.train.presets import model_preset
    cfg = model_preset("llama31_8b").replace(compute_dtype="bfloat16")
    model = abstract_model(cfg)
    mesh = make_mesh((1, -1, 1), jax.local_devices())
    placed = param_shardings(model, mesh)
    total = per_device = 0
    for name, v in flat_state(model).items():
        shape = v.get_value().shape
        n = int(np.prod(shape)) * 2                               # bfloat16 bytes
        shard = placed[name].shard_shape(shape)
        total += n
        per_device += int(np.prod(shard)) * 2
        if n > 2**24:
            assert int(np.prod(shard)) * 8 == int(np.prod(shape)), (name, shape, shard)
    assert total > 15e9                                           # it is the 8B model
    assert per_device < total / 8 * 1.02, (per_device, total)


# ----------------------------------------------------------------------------- 2 processes

def worker(pid: int, port: int, argv_json: str):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"localhost:{port}", num_processes=2, process_id=pid,
                               initialization_timeout=120)
    from fusion_jax.eval.__main__ import main
    sys.exit(main(json.loads(argv_json)))


def test_two_processes_answer_disjoint_shards(setup, baseline):
    out = setup["root"] / "mp.jsonl"
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    argv = ["--ckpt", setup["ckpt"], "--questions", setup["qfile"], "--image-folder", setup["imgs"],
            "--out", str(out), "--batch-size", "2", "--max-new-tokens", "3", "--query-len", "4", "--seq-bucket", "128",
            "--no-progress"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import sys, json; sys.path.insert(0, sys.argv[1]); import test_eval_scale as t; " \
           "t.worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])"
    procs = [subprocess.Popen([sys.executable, "-c", code, os.path.dirname(HERE), str(p), str(port),
                               json.dumps(argv)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for p in range(2)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    # process 0 saw failures of both shards; each process reports its own
    assert [p.returncode for p in procs] == [1, 1], logs
    assert out.read_bytes() == baseline.read_bytes(), logs
    fails = [json.loads(x) for x in open(str(out).replace(".jsonl", ".failures.jsonl"))]
    assert {f["question_id"] for f in fails} == {"missing", "unsafe", "nokey", "long", None}
