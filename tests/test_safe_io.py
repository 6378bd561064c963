"""Safe conversion: hand-built bad safetensors files and indexes fail with an error naming the file and
tensor, and a cast to float16 that would overflow names the tensor instead of writing inf."""
import json
import os
import re
import shutil
import struct
import tracemalloc

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

os.environ["FUSION_NO_PROGRESS"] = "1"

from fusion_jax.convert.st_io import MAX_HEADER_BYTES, CheckpointError, SafeReader  # noqa: E402

BAD = "model.layers.1.mlp.down_proj.weight"     # the tensor that holds 1e6 in the overflow tests


def write_st(path, entries: dict, data: bytes, header_len=None):
    """A safetensors file written by hand: 8-byte length, JSON header, data (faults injected freely)."""
    hb = json.dumps(entries).encode()
    path.write_bytes(struct.pack("<Q", len(hb) if header_len is None else header_len) + hb + data)
    return path


def f32(shape, a, b):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [a, b]}


def test_hand_built_file_reads_like_safetensors(tmp_path):
    x, y = np.arange(6, dtype=np.float32).reshape(2, 3), np.asarray([7, 8], np.int64)
    write_st(tmp_path / "model.safetensors", {"x": f32((2, 3), 0, 24),
                                              "y": {"dtype": "I64", "shape": [2], "data_offsets": [24, 40]}},
             x.tobytes() + y.tobytes())
    r = SafeReader(str(tmp_path))
    np.testing.assert_array_equal(r.get("x"), x)
    np.testing.assert_array_equal(r.get("y"), y)
    assert load_file(str(tmp_path / "model.safetensors"))["x"].tolist() == x.tolist()


def test_absurd_header_length_fails_before_reading(tmp_path):
    # a sparse 200 MB file whose header claims 150 MB: refused without reading the claimed header
    p = tmp_path / "model.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", 150 * 2**20))
        f.truncate(200 * 2**20)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=re.escape(f"{p}: header length 157286400 bytes exceeds the "
                                                            f"{MAX_HEADER_BYTES} byte cap")):
            SafeReader(str(tmp_path))
        assert tracemalloc.get_traced_memory()[1] < 2**20
    finally:
        tracemalloc.stop()
    write_st(p, {}, b"", header_len=4096)
    with pytest.raises(CheckpointError, match="header length 4096 bytes runs past the end of the file"):
        SafeReader(str(tmp_path))
    p.write_bytes(b"\x01\x02")
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: 2 bytes, too short")):
        SafeReader(str(tmp_path))
    p.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        SafeReader(str(tmp_path))


@pytest.mark.parametrize("entries,size,match", [
    ({"w": f32((2,), 8, 0)}, 8, r"tensor w has data_offsets \[8, 0\] out of order"),
    ({"w": f32((2, 2), 0, 12)}, 16, r"tensor w has data_offsets \[0, 12\] \(12 bytes\) but shape \(2, 2\) x F32 is 16"),
    ({"w": f32((4,), 0, 16)}, 12, r"tensor w has data_offsets \[0, 16\] past the end of the data \(12 bytes"),
    ({"a": f32((4,), 0, 16), "b": f32((4,), 8, 24)}, 24, r"tensors a \[0, 16\] and b \[8, 24\] overlap"),
    ({"w": {"dtype": "F4", "shape": [2], "data_offsets": [0, 1]}}, 8, "tensor w has unknown dtype 'F4'"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8, r"tensor w has a bad shape \[-2\]"),
])
def test_bad_entries_name_file_and_tensor(tmp_path, entries, size, match):
    p = write_st(tmp_path / "model.safetensors", entries, bytes(size))
    with pytest.raises(CheckpointError, match=re.escape(f"{p}: ") + match):
        SafeReader(str(tmp_path))


def test_shards_and_index_must_agree(tmp_path):
    one, two = tmp_path / "model-00001-of-00002.safetensors", tmp_path / "model-00002-of-00002.safetensors"
    write_st(one, {"a": f32((1,), 0, 4)}, bytes(4))
    write_st(two, {"a": f32((1,), 0, 4), "b": f32((1,), 4, 8)}, bytes(8))
    # no index: the same name in two shards
    with pytest.raises(CheckpointError, match=f"tensor a appears in {one.name} and {two.name}"):
        SafeReader(str(tmp_path))
    write_st(two, {"b": f32((1,), 0, 4), "c": f32((1,), 4, 8)}, bytes(8))
    idx = tmp_path / "model.safetensors.index.json"
    idx.write_text(json.dumps({"weight_map": {"a": two.name, "b": two.name, "c": two.name, "z": one.name}}))
    with pytest.raises(CheckpointError) as e:
        SafeReader(str(tmp_path))
    msg = str(e.value)
    assert f"maps a to {two.name}, which lacks it (it is in {one.name})" in msg
    assert f"maps z to {one.name}, which lacks it\n" in msg + "\n"
    idx.write_text(json.dumps({"weight_map": {"a": one.name, "b": two.name}}))
    with pytest.raises(CheckpointError, match=f"tensor c in {two.name} is not listed in {idx.name}"):
        SafeReader(str(tmp_path))
    idx.write_text(json.dumps({"weight_map": {"a": "../elsewhere.safetensors"}}))
    with pytest.raises(CheckpointError, match="tensor a maps to '../elsewhere.safetensors', not a file name"):
        SafeReader(str(tmp_path))
    idx.write_text("{}")
    with pytest.raises(CheckpointError, match=re.escape(f"{idx}: not a checkpoint index with a weight_map")):
        SafeReader(str(tmp_path))
    idx.write_text(json.dumps({"weight_map": {"a": one.name, "b": two.name, "c": two.name}}))
    assert sorted(SafeReader(str(tmp_path)).keys()) == ["a", "b", "c"]


# ----------------------------------------------------------------------------- overflow on a cast

@pytest.fixture
def big_value_case(golden_dir, tmp_path):
    """The golden phi3 checkpoint with one finite value too large for float16 (fine in bfloat16)."""
    dst = tmp_path / "case"
    shutil.copytree(golden_dir / "phi3_train", dst)
    w = load_file(str(dst / "weights.safetensors"))
    w[BAD] = w[BAD].copy()
    w[BAD][0, 0] = 1e6
    (dst / "weights.safetensors").chmod(0o644)
    save_file(w, str(dst / "weights.safetensors"), metadata={"format": "pt"})
    return dst


def test_from_pretrained_fp16_overflow_names_tensor(big_value_case):
    from fusion_jax import from_pretrained
    from fusion_jax.hf_io import flat_state
    with pytest.raises(CheckpointError, match=rf"tensor {BAD}: max \|value\| 1e\+06 overflows float16 "
                                              r"\(largest finite 65504\)"):
        from_pretrained(str(big_value_case), dtype="float16")
    m = from_pretrained(str(big_value_case), dtype="bfloat16")
    kernel = np.asarray(flat_state(m)["model.layers.mlp.down_proj.kernel"].get_value())
    assert str(kernel.dtype) == "bfloat16" and float(kernel[1, 0, 0]) == pytest.approx(1e6, rel=1e-2)


def test_convert_fp16_overflow_names_tensor(big_value_case, tmp_path, capsys):
    from fusion_jax import from_pretrained
    from fusion_jax.convert.__main__ import main as cli
    from fusion_jax.hf_io import flat_state
    src, f16 = str(big_value_case), tmp_path / "f16"
    assert cli(["to-orbax", "--src", src, "--dst", str(f16), "--dtype", "float16"]) == 2
    assert f"tensor {BAD}: max |value| 1e+06 overflows float16" in capsys.readouterr().err
    assert not f16.exists() and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]
    assert cli(["to-orbax", "--src", src, "--dst", str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    orb = tmp_path / "f32"
    assert cli(["to-orbax", "--src", src, "--dst", str(orb)]) == 0
    assert cli(["to-hf", "--src", str(orb), "--dst", str(tmp_path / "hf16"), "--dtype", "float16"]) == 2
    assert f"tensor {BAD}: max |value| 1e+06 overflows float16" in capsys.readouterr().err
    assert cli(["to-hf", "--src", str(orb), "--dst", str(tmp_path / "hfbf"), "--dtype", "bfloat16"]) == 0
    # Orbax casts while restoring: the inf it would leave is caught and the parameter named
    with pytest.raises(CheckpointError, match=r"tensor model.layers.mlp.down_proj.kernel of .*: max \|value\| "
                                              r"1e\+06 overflows float16"):
        from_pretrained(str(orb), dtype="float16")
    m = from_pretrained(str(orb), dtype="bfloat16")
    assert str(flat_state(m)["model.layers.mlp.down_proj.kernel"].get_value().dtype) == "bfloat16"
