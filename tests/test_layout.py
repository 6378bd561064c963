"""Host-side layout: reference splicing, truncation and bucket errors."""
import numpy as np
import pytest

from fusion_jax.constants import IGNORE_INDEX as IGN
from fusion_jax.constants import IMAGE_TOKEN_INDEX as IMG
from fusion_jax.constants import INSTRUCT_INDEX as INS
from fusion_jax.constants import LATENT_IMAGE_TOKEN_INDEX as LAT
from fusion_jax.layout import build_layout, layout_sample, spliced_length


def _two_rounds():
    #        bos  LAT  IMG  q1  INS  a1  a1  LAT  q2  INS  a2
    ids = np.array([1, LAT, IMG, 10, 11, 20, 21, LAT, 12, 13, 22])
    lab = np.array([IGN, IGN, IGN, IGN, INS, 20, 21, IGN, IGN, INS, 22])
    return ids, lab


def test_order_based_splicing_and_positions():
    ids, lab = _two_rounds()
    s = layout_sample(ids, lab, num_image_tokens=9, query_len=4)
    # first placeholder (the LATENT slot) takes the 9 image tokens; the IMAGE slot gets latent block 0
    np.testing.assert_array_equal(s.image_pos, np.arange(1, 10))
    np.testing.assert_array_equal(s.latent_pos, list(range(10, 14)) + list(range(18, 22)))
    assert s.length == spliced_length(ids, num_image_tokens=9, query_len=4) == 9 + 8 + 8
    np.testing.assert_array_equal(s.instruct_pos, [15, 23])
    assert (s.labels[s.instruct_pos] == IGN).all() and s.labels[16] == 20


def test_text_only_sample_latents_everywhere():
    ids = np.array([1, LAT, 10, 11, 20])
    s = layout_sample(ids, np.array([IGN, IGN, IGN, INS, 20]), num_image_tokens=9, query_len=4)
    assert not s.has_image and s.image_pos.size == 0
    np.testing.assert_array_equal(s.latent_pos, [1, 2, 3, 4])


def test_truncation_drops_whole_question_rounds():
    ids, lab = _two_rounds()
    s = layout_sample(ids, lab, num_image_tokens=9, query_len=4, max_length=20)
    assert s.length == 20
    np.testing.assert_array_equal(s.instruct_pos, [15])          # question 2's marker (23) is cut
    np.testing.assert_array_equal(s.latent_pos, [10, 11, 12, 13])  # and so is its latent block
    np.testing.assert_array_equal(s.latent_fill_pos, [10, 11, 12, 13, 18, 19])  # rows still in the sequence


def test_inference_marks_last_token_and_refines_first_block_only():
    ids, _ = _two_rounds()
    s = layout_sample(ids[:7], None, num_image_tokens=9, query_len=4)
    assert list(s.instruct_pos) == [s.length - 1]
    lay = build_layout([ids], None, [np.array([10, 12])], num_image_tokens=9, query_len=4,
                       max_questions=1)
    assert (lay["instruct_pos"][0] >= 0).sum() == 1 and (lay["latent_pos"][0] >= 0).sum() == 4
    # both latent blocks still receive the initial latents (reference splicing)
    np.testing.assert_array_equal(lay["latent_fill_pos"][0], list(range(10, 14)) + list(range(18, 22)))
    with pytest.raises(ValueError, match="latent blocks > max_latent_blocks=1"):
        build_layout([ids], None, [np.array([10])], num_image_tokens=9, query_len=4, max_questions=1,
                     max_latent_blocks=1)


def test_batch_arrays_fixed_shapes_and_padding():
    ids, lab = _two_rounds()
    lay = build_layout([ids, ids[:7]], [lab, lab[:7]], [np.array([10, 11, 12]), np.array([10])],
                       num_image_tokens=9, query_len=4, max_questions=3, seq_len=32, instruct_len=4)
    assert lay["token_ids"].shape == (2, 32) and lay["latent_pos"].shape == (2, 12)
    assert lay["instruct_pos"].shape == (2, 3) and lay["instructs"].shape == (2, 4)
    assert lay["attention_mask"][1].sum() == 7 - 2 + 9 + 4
    assert (lay["latent_pos"][1, 4:] == -1).all() and (lay["instruct_pos"][1, 1:] == -1).all()
    np.testing.assert_array_equal(lay["instruct_mask"][1], [True, False, False, False])
    np.testing.assert_array_equal(lay["position_ids"][0], np.arange(32))


def test_bucket_errors_name_the_sample():
    ids, lab = _two_rounds()
    with pytest.raises(ValueError, match="sample 1: spliced length"):
        build_layout([ids[:3], ids], [lab[:3], lab], [np.array([1]), np.array([1])],
                     num_image_tokens=9, query_len=4, max_questions=2, seq_len=16)
    with pytest.raises(ValueError, match="sample 0: 2 questions"):
        build_layout([ids], [lab], [np.array([1])], num_image_tokens=9, query_len=4, max_questions=1)
