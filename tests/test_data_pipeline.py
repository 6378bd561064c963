"""grain pipeline: fixed shapes, determinism, sharding, checkpointed state, skips, CLI."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from fusion_jax.constants import IGNORE_INDEX
from fusion_jax.data.__main__ import main as cli_main
from fusion_jax.data.pipeline import (
    BatchCollator,
    DataIterator,
    PipelineConfig,
    build_dataset,
    modality_length_grouped_indices,
    open_source,
)
from fusion_jax.data.sample import SampleConfig, SampleProcessor, Skipped
from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
from fusion_jax.data.tokenizer import load_tokenizer

SCFG = dict(image_size=16, num_image_tokens=9, max_length=256, query_lens=(4, 16), max_questions=3,
            max_instruct_len=64)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    path, imgs = write_dataset(root, 20, size=24, bad=True)
    tokdir = make_tokenizer_folder(os.path.join(root, "tok"))
    return {"root": root, "path": path, "images": imgs, "tokdir": tokdir, "tok": load_tokenizer(tokdir)}


def _ds(data, **kw):
    proc = SampleProcessor(data["tok"], SampleConfig(**SCFG), image_folder=data["images"])
    cfg = dict(batch_size=4, seed=3, seq_buckets=(64, 128, 256), process_index=0, process_count=1)
    cfg.update(kw)
    return build_dataset(open_source(data["path"]), proc, PipelineConfig(**cfg))


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_batches_fixed_shapes_and_deterministic(data):
    a, b = _take(iter(_ds(data)), 6), _take(iter(_ds(data)), 6)
    for x, y in zip(a, b, strict=True):
        assert x["ids"] == y["ids"] and x["query_len"] == y["query_len"]
        np.testing.assert_array_equal(x["token_ids"], y["token_ids"])
    qs = {x["query_len"] for x in a}
    assert qs <= {4, 16}
    for x in a:
        S = x["token_ids"].shape[1]
        assert S in (64, 128, 256) and x["images"].shape == (4, 5, 3, 16, 16)
        assert x["latent_pos"].shape == (4, 3 * x["query_len"]) and x["instruct_pos"].shape == (4, 3)
        assert x["instructs"].shape[1] in (16, 32, 64)
        assert (x["labels"] >= 0).any(axis=1).all()  # every sample has something to learn
        # text-only samples have zero images
        assert np.all(x["images"][~x["has_image"]] == 0)
    c = _take(iter(_ds(data, seed=4)), 6)
    assert [x["ids"] for x in c] != [x["ids"] for x in a]


def test_skips_counted_by_reason(data):
    it = iter(_ds(data, order="sequential", num_epochs=1))
    n = sum(len(b["ids"]) for b in it)
    st = it.stats()
    assert n == 20
    assert st["skipped"] == {"missing_image": 1, "empty_image": 1, "truncated_image": 1, "not_an_image": 1,
                             "unsafe_image_path": 2, "malformed_json": 1, "bad_value": 1,
                             "unknown_role": 1, "no_answer_round": 1}
    assert st["skipped_examples"]["unsafe_image_path"] == ["b_abs", "b_dotdot"]


def test_state_restore_is_exact(data, tmp_path):
    import grain
    from etils import epath
    it = iter(_ds(data))
    _take(it, 3)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    expect = _take(it, 4)
    it2 = iter(_ds(data))
    handler.restore(epath.Path(tmp_path), item=it2)
    got = _take(it2, 4)
    for x, y in zip(expect, got, strict=True):
        assert x["ids"] == y["ids"] and x["query_len"] == y["query_len"]
        np.testing.assert_array_equal(x["labels"], y["labels"])
    assert it2.stats()["steps"] == it.stats()["steps"]


def test_sharding_by_process(data):
    ids = []
    for p in range(2):
        it = iter(_ds(data, order="sequential", num_epochs=1, batch_size=2, process_index=p, process_count=2))
        ids.append([i for b in it for i in b["ids"]])
    assert not set(ids[0]) & set(ids[1])
    assert len(ids[0]) + len(ids[1]) == 20


def test_length_grouping_like_reference():
    rng = np.random.default_rng(0)
    lengths = np.concatenate([rng.integers(1, 100, 37), -rng.integers(1, 100, 21)])
    order = modality_length_grouped_indices(lengths, 8, np.random.default_rng(1))
    assert sorted(order.tolist()) == list(range(58))
    mbs = [order[i:i + 8] for i in range(0, 58, 8)][:-1]
    mixed = [mb for mb in mbs if (lengths[mb] > 0).any() and (lengths[mb] < 0).any()]
    assert len(mixed) <= 1  # only the merged leftover megabatch mixes modalities
    for mb in mbs:
        if not len(mixed) or mb is not mixed[0]:
            a = np.abs(lengths[mb])
            assert (np.diff(a) <= 0).all()


def test_length_grouped_pipeline_runs(data):
    b = _take(iter(_ds(data, order="length_grouped")), 3)
    assert all(x["token_ids"].shape[0] == 4 for x in b)


def test_global_arrays_on_mesh(data):
    import jax

    from fusion_jax.sharding import make_mesh, shard_batch
    mesh = make_mesh((4, 1, 1), devices=jax.devices()[:4])
    raw = next(DataIterator(_ds(data)))
    b = shard_batch({k: raw[k] for k in ("token_ids", "images")}, mesh)
    assert isinstance(b["token_ids"], jax.Array) and b["token_ids"].shape[0] == 4
    assert len(b["images"].sharding.device_set) == 4
    assert isinstance(raw["ids"], list)


def test_nothing_to_learn_is_skipped(data):
    tok = data["tok"]
    proc = SampleProcessor(tok, SampleConfig(**(SCFG | {"max_length": 40})))
    long_q = " ".join(["the quick brown fox"] * 20)
    rec = {"id": "long", "conversations": [{"from": "human", "value": long_q}, {"from": "gpt", "value": "ok"}]}
    out = proc({"payload": json.dumps(rec), "key": "k"})
    assert isinstance(out, Skipped) and out.reason == "nothing_to_learn"


def test_collator_buckets_and_query_len():
    col = BatchCollator(num_image_tokens=9, query_lens=(4, 16, 36), max_questions=2, max_length=100,
                        seq_buckets=(32, 64, 128), instruct_buckets=(8, 16), seed=0)
    assert col.seq_buckets == (32, 64, 100)
    qs = [col.query_len(s) for s in range(60)]
    assert set(qs) == {4, 16, 36} and qs == [col.query_len(s) for s in range(60)]
    ids = np.array([1, -300, 5, 6, 7], np.int32)
    lab = np.array([IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, -400, 7], np.int32)
    raw = {"input_ids": [ids], "labels": [lab], "instructs": [np.array([5, 6])],
           "images": np.zeros((1, 5, 3, 4, 4), np.float32), "has_image": np.array([False]), "ids": ["a"]}
    out = col(raw, 0)
    assert out["token_ids"].shape == (1, 32) and out["instructs"].shape == (1, 8)


def test_check_cli_json(data, capsys):
    rc = cli_main(["check", data["path"], "--image-folder", data["images"], "--tokenizer", data["tokdir"],
                   "--template", "phi_3", "--max-len", "4096", "--json"])
    assert rc == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["total"] == 30 and rep["usable"] == 20 and sum(rep["skipped"].values()) == 10
    assert rep["skipped"]["unsafe_image_path"] == 2 and "p50" in rep["text_tokens"]
    assert cli_main(["check", data["path"], "--image-folder", data["images"], "--tokenizer", data["tokdir"],
                     "--strict"]) == 1
    assert "b_missing" in capsys.readouterr().err
    assert cli_main(["check", os.path.join(data["root"], "nope.yaml"), "--tokenizer", data["tokdir"]]) == 2


def test_yaml_mixture_strategies(data, tmp_path):
    y = tmp_path / "mix.yaml"
    y.write_text(f"datasets:\n  - json_path: {data['path']}\n    sampling_strategy: first:5\n"
                 f"  - json_path: {data['path']}\n    sampling_strategy: end:10%\n"
                 f"  - json_path: {data['path']}\n    sampling_strategy: random:4\n")
    src = open_source(str(y), image_folder=data["images"], seed=0)
    assert len(src) == 5 + 3 + 4
    assert src[5]["key"] == "data.jsonl:28"  # ceil(10% of 30) = 3 last lines
    assert len({src[i]["key"] for i in range(8, 12)}) == 4


MULTI = textwrap.dedent("""
    import sys
    from absl import flags
    import numpy as np
    from fusion_jax.data.pipeline import PipelineConfig, build_dataset, open_source
    from fusion_jax.data.sample import SampleConfig, SampleProcessor
    from fusion_jax.data.tokenizer import load_tokenizer

    def make(workers):
        proc = SampleProcessor(load_tokenizer(sys.argv[2]), SampleConfig(image_size=16, num_image_tokens=9,
                               max_length=256, query_lens=(4, 16), max_questions=3, max_instruct_len=64),
                               image_folder=sys.argv[3])
        return build_dataset(open_source(sys.argv[1]), proc, PipelineConfig(
            batch_size=2, seed=0, seq_buckets=(128, 256), worker_count=workers, process_index=0,
            process_count=1))

    if __name__ == "__main__":
        flags.FLAGS.mark_as_parsed()
        it = iter(make(2))
        first = [next(it)["ids"] for _ in range(3)]
        state = it.get_state()
        nxt = [next(it)["ids"] for _ in range(3)]
        it.close()
        it2 = iter(make(2))
        it2.set_state(state)
        again = [next(it2)["ids"] for _ in range(3)]
        it2.close()
        assert nxt == again, (nxt, again)
        print("OK", first, nxt)
""")


def test_multiprocess_workers(data, tmp_path):
    script = tmp_path / "multi.py"
    script.write_text(MULTI)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, str(script), data["path"], data["tokdir"], data["images"]],
                       capture_output=True, text=True, timeout=240, env=env,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "OK" in r.stdout


def test_orbax_checkpoint_manager_roundtrip(data, tmp_path):
    import grain
    import orbax.checkpoint as ocp
    it = DataIterator(_ds(data))
    _take(it, 2)
    mgr = ocp.CheckpointManager(str(tmp_path / "ckpt"))
    mgr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it.grain_iterator)))
    mgr.wait_until_finished()
    expect = _take(it, 3)
    it2 = DataIterator(_ds(data))
    mgr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it2.grain_iterator)))
    got = _take(it2, 3)
    assert [b["ids"] for b in got] == [b["ids"] for b in expect]
    assert [b["query_len"] for b in got] == [b["query_len"] for b in expect]
    mgr.close()


def test_unexpected_errors_are_counted_not_raised(data):
    class Boom:
        bos_id = None

        def encode_with_offsets(self, text):
            raise RuntimeError("tokenizer exploded")
    proc = SampleProcessor(Boom(), SampleConfig(**SCFG))
    rec = {"id": "r", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    out = proc({"payload": json.dumps(rec), "key": "k"})
    assert isinstance(out, Skipped) and out.reason == "unexpected_error" and "exploded" in out.detail
