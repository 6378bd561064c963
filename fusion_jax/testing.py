"""Synthetic laid-out batches for tests, benchmarks and demos (no tokenizer needed)."""
from __future__ import annotations

import numpy as np

from fusion_jax.config import FusionConfig
from fusion_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, INSTRUCT_INDEX, LATENT_IMAGE_TOKEN_INDEX, NUM_CROPS
from fusion_jax.layout import build_layout


def random_conversation(rng, vocab: int, n_rounds: int, image: bool):
    """Reference-style ids/labels/instructs: [bos] per round: LAT (IMG) question INS answer."""
    ids, lab, ins = [1], [IGNORE_INDEX], []
    for r in range(n_rounds):
        ph = [LATENT_IMAGE_TOKEN_INDEX] + ([IMAGE_TOKEN_INDEX] if (image and r == 0) else [])
        q = list(rng.integers(3, vocab, size=int(rng.integers(2, 5))))
        a = list(rng.integers(3, vocab, size=int(rng.integers(1, 4))))
        ids += ph + q + [4] + a
        lab += [IGNORE_INDEX] * (len(ph) + len(q)) + [INSTRUCT_INDEX] + a
        ins += q
    return np.array(ids), np.array(lab), np.array(ins)


def random_batch(cfg: FusionConfig, *, batch: int = 2, query_len: int | None = None, seq_len: int = 128,
                 max_questions: int = 2, instruct_len: int = 8, seed: int = 0, text_only=(),
                 inference: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    q = query_len or cfg.query_len[0]
    convs = [random_conversation(rng, cfg.llm.vocab_size, int(rng.integers(1, max_questions + 1)),
                                 image=b not in text_only) for b in range(batch)]
    lay = build_layout([c[0] for c in convs], None if inference else [c[1] for c in convs],
                       [c[2][:instruct_len] for c in convs], num_image_tokens=cfg.num_image_tokens,
                       query_len=q, max_questions=max_questions, seq_len=seq_len,
                       instruct_len=instruct_len, max_length=cfg.max_length)
    S = cfg.vision.image_size
    imgs = rng.uniform(-1, 1, size=(batch, NUM_CROPS, cfg.vision.num_channels, S, S)).astype(np.float32)
    for b in text_only:
        imgs[b] = 0
    lay["images"] = imgs
    return lay
