"""Templates, labels, instructs and image preprocessing against the reference's semantics."""

import numpy as np
import pytest
from PIL import Image

from fusion_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, INSTRUCT_INDEX, LATENT_IMAGE_TOKEN_INDEX
from fusion_jax.data import images as L
from fusion_jax.data.records import Skip, conversation_rounds
from fusion_jax.data.templates import encode_conversation, get_template, render
from fusion_jax.data.testing import encode, gradient_image, make_tokenizer_folder
from fusion_jax.data.tokenizer import load_tokenizer

VS, VE, LAT = "<vision_start>", "<vision_end>", "<latent_image>"


@pytest.fixture(scope="module", params=[True, False], ids=["bos", "nobos"])
def tok(request, tmp_path_factory):
    return load_tokenizer(make_tokenizer_folder(str(tmp_path_factory.mktemp("tok")), add_bos=request.param))


def _rounds(rec, has_image=True):
    return conversation_rounds(rec, has_image=has_image)[0]


REC = {"conversations": [{"from": "human", "value": "What is in the image?\n<image>"},
                         {"from": "gpt", "value": "A cat."},
                         {"from": "human", "value": "How many?"},
                         {"from": "gpt", "value": "Three."}]}


def test_prompt_strings_match_reference():
    rounds = _rounds(REC)
    img = f"{VS}<image>{VE}\nWhat is in the image?"
    assert render(get_template("phi_3"), rounds)[0] == (
        "<|system|>\nYou are a helpful AI assistant.<|end|>"
        f"\n<|user|>\n{VS}{LAT}{VE}{img}<|end|>\n<|assistant|>\nA cat.<|end|>"
        f"\n<|user|>\n{VS}{LAT}{VE}How many?<|end|>\n<|assistant|>\nThree.<|end|>")
    llama = render(get_template("llama_3"), rounds)[0]
    assert llama.startswith("<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, highly")
    assert llama.endswith(
        f"<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{VS}{LAT}{VE}{img}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nA cat.<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{VS}{LAT}{VE}How many?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nThree.<|eot_id|>")
    qwen = render(get_template("qwen_2"), rounds)[0]
    assert qwen.endswith(f"questions. User: {VS}{LAT}{VE}{img} Assistant: A cat.<|im_end|>"
                         f"User: {VS}{LAT}{VE}How many? Assistant: Three.<|im_end|>")
    assert render(get_template("plain"), rounds[:1])[0] == "<image>A cat.\n"


@pytest.mark.parametrize("name", ["phi_3", "llama_3", "qwen_2"])
def test_labels_and_instructs(tok, name):
    enc = encode_conversation(tok, get_template(name), _rounds(REC), has_image=True)
    ids, lab = enc["input_ids"], enc["labels"]
    assert ids.shape == lab.shape
    # One latent placeholder per question, one image placeholder, image right after the first latent.
    assert (ids == LATENT_IMAGE_TOKEN_INDEX).sum() == 2 and (ids == IMAGE_TOKEN_INDEX).sum() == 1
    assert np.nonzero(ids == LATENT_IMAGE_TOKEN_INDEX)[0][0] < np.nonzero(ids == IMAGE_TOKEN_INDEX)[0][0]
    if tok.add_bos:
        assert ids[0] == tok.bos_id and (ids == tok.bos_id).sum() == 1
    # Supervised = answers + the separator closing them; markers right before each answer.
    sep = get_template(name).sep2 or get_template(name).sep
    sup = tok.decode(lab[lab >= 0]).replace(" ", "")
    assert sup == f"Acat.{sep}Three.{sep}".replace(" ", "")
    marks = np.nonzero(lab == INSTRUCT_INDEX)[0]
    assert len(marks) == 2 and all(lab[m + 1] >= 0 and lab[m - 1] == IGNORE_INDEX for m in marks)
    assert lab[:marks[0]].max() == IGNORE_INDEX
    # instructs: tokenizer(concatenated stripped questions).input_ids
    assert enc["instructs"].tolist() == tok("What is in the image?How many?")


def test_text_only_and_plain(tok):
    rec = {"conversations": [{"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}]}
    enc = encode_conversation(tok, get_template("phi_3"), _rounds(rec, False), has_image=False)
    assert enc["instructs"].tolist() == [0]
    assert (enc["input_ids"] == IMAGE_TOKEN_INDEX).sum() == 0
    assert (enc["input_ids"] == LATENT_IMAGE_TOKEN_INDEX).sum() == 1
    plain = encode_conversation(tok, get_template("plain"), _rounds(REC)[:1], has_image=True)
    ids, lab = plain["input_ids"], plain["labels"]
    n_pre = 2 if tok.add_bos else 1  # len(tokenizer_image_token("<image>"))
    assert ids[n_pre - 1] == IMAGE_TOKEN_INDEX and (lab[:n_pre] == IGNORE_INDEX).all()
    assert (lab[n_pre:] == ids[n_pre:]).all() and not (lab == INSTRUCT_INDEX).any()


@pytest.mark.parametrize("conv,reason", [
    ([{"from": "human", "value": None}, {"from": "gpt", "value": "x"}], "bad_value"),
    ([{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}], "bad_value"),
    ([{"from": "system", "value": "s"}, {"from": "gpt", "value": "x"}], "unknown_role"),
    ([{"from": "human", "value": "q"}, {"from": "human", "value": "q"}], "broken_conversation"),
    ([{"from": "gpt", "value": "a"}], "no_answer_round"),
    ([{"from": "human", "value": "q"}, {"from": "gpt", "value": "<image> a"}], "bad_image_tag"),
])
def test_broken_conversations(conv, reason):
    with pytest.raises(Skip) as e:
        conversation_rounds({"conversations": conv}, has_image=True)
    assert e.value.reason == reason


def test_conversation_repairs():
    conv = [{"from": "gpt", "value": "lead"}, {"from": "human", "value": "<image>q1"},
            {"from": "gpt", "value": "a1"}, {"from": "human", "value": "q2"}, {"from": "gpt", "value": "a2"},
            {"from": "human", "value": "dangling"}]
    rounds, repairs = conversation_rounds({"conversations": conv}, has_image=True, max_questions=1)
    assert rounds == [(f"{VS}<image>{VE}\nq1", "a1")]
    assert repairs == ["leading_answer_dropped", "trailing_question_dropped", "questions_truncated"]


def test_static_hd_matches_transformers_siglip():
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    S = 24
    proc = SiglipImageProcessorPil(do_resize=True, size={"height": S, "width": S},
                                   resample=Image.Resampling.BICUBIC, do_rescale=True, rescale_factor=1 / 255,
                                   do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    for w, h in [(53, 41), (20, 90)]:
        img = gradient_image(w, h, seed=w)
        ours = L.static_hd_crops(img, S)
        big = img.resize((2 * S, 2 * S), Image.Resampling.BICUBIC)
        crops = [big.crop((x, y, x + S, y + S)) for y in (0, S) for x in (0, S)] + [img]
        ref = np.stack([proc(c, return_tensors="np")["pixel_values"][0] for c in crops])
        assert ours.shape == (5, 3, S, S) and ours.dtype == np.float32
        np.testing.assert_array_equal(ours, ref)
    # Row-major tiles: tile 1 (top-right) of a left-dark / right-bright image is brighter than tile 0.
    lr = Image.fromarray(np.repeat(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], 64, 0).repeat(3, 2))
    c = L.static_hd_crops(lr, 16)
    assert c[1].mean() > c[0].mean() and np.isclose(c[0].mean(), c[2].mean())


def test_image_modes_are_converted():
    base = gradient_image(40, 30)
    for mode in ["CMYK", "RGBA", "LA", "P", "L"]:
        img = L.decode_image(encode(base.convert(mode), "TIFF" if mode == "CMYK" else "PNG"))
        assert img.mode == "RGB" and img.size == (40, 30)
    a16 = (np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50)
    im16 = Image.fromarray(a16)
    assert im16.mode.startswith("I;16")
    img16 = L.decode_image(encode(im16))
    got = np.asarray(img16)[..., 0].astype(int)
    np.testing.assert_allclose(got, np.round(a16 / 257.0), atol=1)  # scaled, not clipped at 255
    # EXIF orientation 6 (rotate 90 CW to display): a 40x30 stored image shows as 30x40.
    exif = Image.Exif()
    exif[0x0112] = 6
    img = L.decode_image(encode(base, "JPEG", exif=exif.tobytes()))
    assert img.size == (30, 40)
    assert L.decode_image(encode(base, "JPEG", exif=exif.tobytes()), exif_transpose=False).size == (40, 30)


def test_bad_images_raise_with_reason(tmp_path):
    ok = encode(gradient_image(64, 64))
    cases = {"empty_image": b"", "not_an_image": b"hello world", "truncated_image": encode(
        gradient_image(64, 64), "JPEG")[:300]}
    for reason, data in cases.items():
        with pytest.raises(L.ImageError) as e:
            L.decode_image(data)
        assert e.value.reason == reason, (reason, e.value)
    # Huge dimensions in the header: rejected before decoding (the pixel data is absent anyway).
    huge = bytearray(encode(Image.new("L", (1, 1))))
    assert huge[12:16] == b"IHDR"
    huge[16:24] = (100_000).to_bytes(4, "big") + (100_000).to_bytes(4, "big")
    import zlib
    huge[29:33] = zlib.crc32(bytes(huge[12:29])).to_bytes(4, "big")
    with pytest.raises(L.ImageError) as e:
        L.decode_image(bytes(huge), max_pixels=10_000_000)
    assert e.value.reason == "image_too_large"
    assert L.decode_image(ok, max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(L.ImageError) as e:
        L.decode_image(ok, max_pixels=64 * 64 - 1)
    assert e.value.reason == "image_too_large"


@pytest.mark.parametrize("rel,reason", [("/etc/passwd", "unsafe_image_path"), ("a/../../x.png", "unsafe_image_path"),
                                        ("..\\x.png", "unsafe_image_path"), ("nope.png", "missing_image")])
def test_image_paths(tmp_path, rel, reason):
    with pytest.raises(L.ImageError) as e:
        L.read_image_file(L.resolve_image_path(str(tmp_path), rel))
    assert e.value.reason == reason
