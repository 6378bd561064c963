"""Prepared ArrayRecord datasets: written by the tfds builder, read without TensorFlow."""
import sys

import numpy as np
import tensorflow_datasets as tfds

from fusion_jax.data.pipeline import PipelineConfig, build_dataset, open_source
from fusion_jax.data.sample import SampleConfig, SampleProcessor, Skipped
from fusion_jax.data.testing import make_tokenizer_folder, write_dataset
from fusion_jax.data.tfds_builder import prepare
from fusion_jax.data.tokenizer import load_tokenizer


def test_prepare_and_read_same_samples(tmp_path):
    path, imgs = write_dataset(str(tmp_path), 8, size=24, bad=True)
    tok = load_tokenizer(make_tokenizer_folder(str(tmp_path / "tok")))
    out = prepare(path, str(tmp_path / "prepared"), image_folder=imgs)
    src = tfds.data_source("fusion_mixture/default", data_dir=str(tmp_path / "prepared"), split="train")
    assert len(src) == 18
    ex = next(src[i] for i in range(len(src)) if src[i]["image_path"] == b"img1.jpg")
    assert ex["image"][:2] == b"\xff\xd8"  # JPEG bytes stored as-is
    assert "tensorflow" not in sys.modules

    proc = SampleProcessor(tok, SampleConfig(image_size=16, num_image_tokens=9, max_length=512,
                                             query_lens=(4,), max_questions=3), image_folder=imgs)
    raw, prep = open_source(path), open_source(out)

    def run(s):
        res = {}
        for i in range(len(s)):
            o = proc(s[i])
            res[o.id if isinstance(o, Skipped) else o["id"]] = o
        return res
    a, b = run(raw), run(prep)
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], Skipped):
            assert isinstance(b[k], Skipped) and a[k].reason == b[k].reason, k
        else:
            np.testing.assert_array_equal(a[k]["input_ids"], b[k]["input_ids"])
            np.testing.assert_array_equal(a[k]["images"], b[k]["images"])
    # The pipeline reads a prepared dir just like JSON.
    it = iter(build_dataset(prep, proc, PipelineConfig(batch_size=2, order="length_grouped",
                                                       seq_buckets=(512,), process_index=0, process_count=1)))
    assert next(it)["token_ids"].shape == (2, 512)
