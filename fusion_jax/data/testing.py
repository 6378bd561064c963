"""Offline fixtures for tests and the benchmark: a tiny BPE tokenizer folder and sample images."""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

from fusion_jax.data.tokenizer import train_bpe, write_tokenizer_folder

CORPUS = [
    "What is in the image? A cat sitting on a red mat.",
    "Describe the picture in detail. There are two dogs playing in the park.",
    "How many apples are on the table? Three apples.",
    "You are a helpful AI assistant. Answer the question briefly.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "system user assistant image latent vision start end colour count scene spatial text",
]


def make_tokenizer_folder(path: str, *, add_bos: bool = True, vocab_size: int = 400) -> str:
    """Train a byte-level BPE in memory and save it as an HF tokenizer folder."""
    return write_tokenizer_folder(train_bpe(CORPUS * 5, vocab_size), path, add_bos=add_bos)


def gradient_image(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)),
                    rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
    img = Image.fromarray(rgb, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def write_dataset(root: str, n: int = 16, *, size: int = 64, bad: bool = False) -> tuple[str, str]:
    """A JSONL file plus image folder; with bad=True also one record of each failure kind."""
    imgdir = os.path.join(root, "images")
    os.makedirs(imgdir, exist_ok=True)
    lines = []
    for i in range(n):
        name = f"img{i}.jpg" if i % 2 else f"img{i}.png"
        gradient_image(size + 8 * i, size, seed=i).save(os.path.join(imgdir, name))
        conv = [{"from": "human", "value": "<image>\nWhat is in the image?"},
                {"from": "gpt", "value": "A cat sitting on a red mat." * (1 + i % 3)}]
        if i % 4 == 3:
            conv += [{"from": "human", "value": "How many apples?"}, {"from": "gpt", "value": "Three."}]
        rec = {"id": f"s{i}", "conversations": conv}
        if i % 5 != 4:
            rec["image"] = name
        else:
            conv[0]["value"] = "What is in the image?"
        lines.append(json.dumps(rec))
    if bad:
        with open(os.path.join(imgdir, "empty.png"), "wb"):
            pass
        with open(os.path.join(imgdir, "trunc.png"), "wb") as f:
            f.write(encode(gradient_image(64, 64))[:200])
        with open(os.path.join(imgdir, "text.png"), "wb") as f:
            f.write(b"this is not an image")
        good = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cat."}]
        for rid, extra in [("b_missing", {"image": "nope.png"}), ("b_empty", {"image": "empty.png"}),
                           ("b_trunc", {"image": "trunc.png"}), ("b_text", {"image": "text.png"}),
                           ("b_abs", {"image": "/etc/passwd"}), ("b_dotdot", {"image": "../x.png"})]:
            lines.append(json.dumps({"id": rid, "conversations": good, **extra}))
        lines.append('{"id": "b_json", "conversations": [')
        lines.append(json.dumps({"id": "b_null", "image": "img0.png",
                                 "conversations": [{"from": "human", "value": None}, good[1]]}))
        lines.append(json.dumps({"id": "b_role", "image": "img0.png",
                                 "conversations": [good[0], {"from": "robot", "value": "x"}]}))
        lines.append(json.dumps({"id": "b_noans", "image": "img0.png", "conversations": [good[0]]}))
    path = os.path.join(root, "data.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, imgdir


def path_train_config(path: str, image_folder: str, tokenizer: str, **overrides):
    """The tiny preset reading a `write_dataset` folder, shrunk to train in seconds on a mesh of CPU
    devices (the single-device CPU choices off); `overrides`: flattened keys ("data.max_length": 96)."""
    from fusion_jax.train.presets import tiny_train_config
    tc = tiny_train_config()
    with tc.unlocked():
        del tc["heldout_eval"]   # answers the synthesized held-out split; this data has none
        tc.vision_warmup.steps = 0
        tc.data.update(dict(source="path", path=path, image_folder=image_folder, tokenizer=tokenizer,
                            max_length=160, seq_buckets=(160,), instruct_buckets=(32,), max_instruct_len=32))
        tc.update(dict(global_batch_size=8, log_every=1))
        tc.model.update(dict(scan_layers=True, linear_2d=False, ce_skip_empty_chunks=False, attention_impl="auto",
                             num_sampler_layers=1, sampler_stride=2, sampler_heads=2))
        tc.model.tiny.update(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  vision_hidden_size=16, vision_intermediate_size=32, vision_layers=3,
                                  vision_heads=2, image_size=16, patch_size=4))
        tc.update_from_flattened_dict(overrides)
    return tc
