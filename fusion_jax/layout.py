"""Host-side multimodal layout: reference-style inputs -> fixed-size index arrays.

The reference splices image features into the sequence in Python, per sample
(`prepare_inputs_labels_for_multimodal`). Here the host decides *where* every
block goes and the device only gathers/scatters, so shapes depend on the bucket
alone. Semantics reproduced (see tests/golden/fusion_ref/README.md):

* splicing is order based: in a sample holding an IMAGE placeholder the first
  placeholder (IMAGE or LATENT) receives the P image tokens and every later one
  a block of q latent tokens; a sample without IMAGE gets zero latents at every
  placeholder (still listed as latent positions);
* INSTRUCT markers in the labels become instruct positions, then IGNORE;
  with no labels the last token is the single instruct position (eval mode);
* truncation to `max_length` keeps instruct positions < max_length and the
  first q * (#instructs) latent positions for refinement; every latent block
  still inside the sequence holds the initial latents (`latent_fill_pos`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_jax.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, INSTRUCT_INDEX, LATENT_IMAGE_TOKEN_INDEX


@dataclass
class SampleLayout:
    token_ids: np.ndarray      # [n] text ids at their final positions, -1 at vision rows
    labels: np.ndarray         # [n] labels after splicing (IGNORE at vision rows / markers)
    image_pos: np.ndarray      # [P] or [0]
    latent_pos: np.ndarray     # [L*q] rows the interaction layers refine (kept questions only)
    latent_fill_pos: np.ndarray  # rows of every latent block: all receive the initial latents
    instruct_pos: np.ndarray   # [L]
    has_image: bool

    @property
    def length(self) -> int:
        return int(self.token_ids.shape[0])


def _is_placeholder(ids: np.ndarray) -> np.ndarray:
    return (ids == IMAGE_TOKEN_INDEX) | (ids == LATENT_IMAGE_TOKEN_INDEX)


def spliced_length(input_ids, *, num_image_tokens: int, query_len: int) -> int:
    """Length of one sample after placeholder expansion (before truncation)."""
    ids = np.asarray(input_ids)
    n_ph = int(_is_placeholder(ids).sum())
    n_text = ids.shape[0] - n_ph
    if n_ph == 0:
        return int(n_text)
    if (ids == IMAGE_TOKEN_INDEX).any():
        return int(n_text + num_image_tokens + (n_ph - 1) * query_len)
    return int(n_text + n_ph * query_len)


def layout_sample(input_ids, labels=None, *, num_image_tokens: int, query_len: int,
                  max_length: int | None = None) -> SampleLayout:
    """Splice one unpadded sample the way the reference does."""
    ids = np.asarray(input_ids, dtype=np.int64)
    if labels is None:
        lab = np.full_like(ids, IGNORE_INDEX)
        if lab.shape[0]:
            lab[-1] = INSTRUCT_INDEX
    else:
        lab = np.asarray(labels, dtype=np.int64)
        if lab.shape != ids.shape:
            raise ValueError(f"labels shape {lab.shape} != input_ids shape {ids.shape}")
    ph = np.nonzero(_is_placeholder(ids))[0]
    has_image = bool((ids == IMAGE_TOKEN_INDEX).any())

    tok, lbl, image_pos, latent_pos = [], [], [], []
    cur, prev = 0, 0
    for k, p in enumerate(list(ph) + [ids.shape[0]]):
        seg = ids[prev:p]
        tok.append(seg)
        lbl.append(lab[prev:p])
        cur += seg.shape[0]
        if p == ids.shape[0]:
            break
        n = num_image_tokens if (has_image and k == 0) else query_len
        block = np.arange(cur, cur + n)
        (image_pos if (has_image and k == 0) else latent_pos).append(block)
        tok.append(np.full(n, -1, np.int64))
        lbl.append(np.full(n, IGNORE_INDEX, np.int64))
        cur += n
        prev = p + 1
    tok = np.concatenate(tok) if tok else np.zeros(0, np.int64)
    lbl = np.concatenate(lbl) if lbl else np.zeros(0, np.int64)
    image_pos = np.concatenate(image_pos) if image_pos else np.zeros(0, np.int64)
    latent_pos = np.concatenate(latent_pos) if latent_pos else np.zeros(0, np.int64)

    instruct_pos = np.nonzero(lbl == INSTRUCT_INDEX)[0]
    lbl = np.where(lbl == INSTRUCT_INDEX, IGNORE_INDEX, lbl)
    if max_length is not None:
        tok, lbl = tok[:max_length], lbl[:max_length]
        instruct_pos = instruct_pos[instruct_pos < max_length]
        image_pos = image_pos[image_pos < max_length]
    fill = latent_pos[latent_pos < tok.shape[0]]
    # The reference refines the first q * L latent positions (L = kept questions).
    latent_pos = latent_pos[: query_len * instruct_pos.shape[0]]
    latent_pos = latent_pos[latent_pos < tok.shape[0]]
    return SampleLayout(tok, lbl, image_pos, latent_pos, fill, instruct_pos, has_image)


def build_layout(input_ids, labels, instructs, *, num_image_tokens: int, query_len: int,
                 max_questions: int, seq_len: int | None = None, instruct_len: int | None = None,
                 pad_id: int = 0, max_length: int | None = None,
                 attention_mask=None, max_latent_blocks: int | None = None) -> dict[str, np.ndarray]:
    """Batch of reference-style samples -> fixed-shape arrays for the device.

    input_ids / labels / instructs: lists of 1-D arrays (or 2-D padded arrays with
    `attention_mask`, as the reference collator produces). `labels=None` means
    inference (last token is the instruct position).
    seq_len / instruct_len: bucket sizes; None = the batch maximum.
    max_latent_blocks: width of `latent_fill_pos` in blocks of q (None: max_questions, or
    more when a sample has more latent blocks than that, e.g. eval-convention prompts).
    Raises ValueError naming the sample when a bucket is too small.
    """
    B = len(input_ids)
    if attention_mask is not None and labels is None:
        # The reference marks the last *column* before removing padding, so a
        # right-padded shorter sample loses its instruct position.
        labels = [np.full(np.asarray(x).shape, IGNORE_INDEX, np.int64) for x in input_ids]
        for x in labels:
            if x.shape[0]:
                x[-1] = INSTRUCT_INDEX
    if attention_mask is not None:
        input_ids = [np.asarray(x)[np.asarray(m, bool)] for x, m in zip(input_ids, attention_mask, strict=True)]
        if labels is not None:
            labels = [np.asarray(x)[np.asarray(m, bool)] for x, m in zip(labels, attention_mask, strict=True)]
    lays = [layout_sample(input_ids[b], None if labels is None else labels[b],
                          num_image_tokens=num_image_tokens, query_len=query_len,
                          max_length=max_length) for b in range(B)]
    need = max((lay.length for lay in lays), default=1)
    S = need if seq_len is None else seq_len
    if need > S:
        worst = int(np.argmax([lay.length for lay in lays]))
        raise ValueError(f"sample {worst}: spliced length {need} exceeds seq_len bucket {S}")
    for b, lay in enumerate(lays):
        if lay.instruct_pos.shape[0] > max_questions:
            raise ValueError(f"sample {b}: {lay.instruct_pos.shape[0]} questions > max_questions="
                             f"{max_questions}")
    need_blocks = max((lay.latent_fill_pos.shape[0] // max(query_len, 1) for lay in lays), default=0)
    nb = max(max_questions, need_blocks) if max_latent_blocks is None else max_latent_blocks
    if need_blocks > nb:
        worst = int(np.argmax([lay.latent_fill_pos.shape[0] for lay in lays]))
        raise ValueError(f"sample {worst}: {need_blocks} latent blocks > max_latent_blocks={nb}")
    ins = [np.asarray(x, np.int64).reshape(-1) for x in instructs]
    T = max((x.shape[0] for x in ins), default=1) if instruct_len is None else instruct_len
    T = max(T, 1)
    for b, x in enumerate(ins):
        if x.shape[0] > T:
            raise ValueError(f"sample {b}: {x.shape[0]} instruct tokens > instruct_len {T}")

    out = {
        "token_ids": np.full((B, S), pad_id, np.int32),
        "labels": np.full((B, S), IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((B, S), bool),
        # padded rows keep running positions: the reference passes position_ids=None
        "position_ids": np.broadcast_to(np.arange(S, dtype=np.int32), (B, S)).copy(),
        "image_pos": np.full((B, num_image_tokens), -1, np.int32),
        "latent_pos": np.full((B, max_questions * query_len), -1, np.int32),
        "latent_fill_pos": np.full((B, nb * query_len), -1, np.int32),
        "instruct_pos": np.full((B, max_questions), -1, np.int32),
        "has_image": np.zeros((B,), bool),
        "instructs": np.zeros((B, T), np.int32),
    }
    for b, lay in enumerate(lays):
        n = lay.length
        out["token_ids"][b, :n] = np.where(lay.token_ids < 0, pad_id, lay.token_ids)
        out["labels"][b, :n] = lay.labels
        out["attention_mask"][b, :n] = True
        out["image_pos"][b, :lay.image_pos.shape[0]] = lay.image_pos
        out["latent_pos"][b, :lay.latent_pos.shape[0]] = lay.latent_pos
        out["latent_fill_pos"][b, :lay.latent_fill_pos.shape[0]] = lay.latent_fill_pos
        out["instruct_pos"][b, :lay.instruct_pos.shape[0]] = lay.instruct_pos
        out["has_image"][b] = lay.has_image
        out["instructs"][b, :ins[b].shape[0]] = ins[b]
    out["instruct_mask"] = out["instructs"] != 0
    return out
