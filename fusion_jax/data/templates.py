"""Chat templates and tokenization with placeholders, as the reference's `preprocess_*`.

Prompt strings are byte-identical to `fusion/conversation.py: get_prompt()`. Labels are
computed from character spans instead of the reference's per-template length arithmetic
(which is tuned to each real tokenizer and zeroes the whole sample on any mismatch): a token
is supervised when it overlaps an answer (answer text plus the separator that closes it), and
the token right before each answer (the last token of the assistant header) carries
INSTRUCT_INDEX. For the tokenizers the reference was tuned on, this is what it computes.

Deviation, documented: the reference's `qwen_2` style inserts no latent placeholder and marks
no question ends (FUSION training cannot run with it); here `qwen_2` keeps its prompt format
and adds the latent block after "User: ", like the reference's other FUSION templates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fusion_jax.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    DEFAULT_LATENT_IMAGE_TOKEN,
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    INSTRUCT_INDEX,
    LATENT_IMAGE_TOKEN_INDEX,
)

LATENT_BLOCK = DEFAULT_IM_START_TOKEN + DEFAULT_LATENT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN


@dataclass(frozen=True)
class Template:
    name: str
    style: str          # "header" (phi_3 / llama_3: MPT / LLAMA_3 styles), "qwen_2", "plain"
    system: str
    user: str
    assistant: str
    sep: str
    sep2: str = ""


TEMPLATES = {
    "phi_3": Template("phi_3", "header", "<|system|>\nYou are a helpful AI assistant.",
                      "\n<|user|>\n", "\n<|assistant|>\n", "<|end|>"),
    "llama_3": Template(
        "llama_3", "header",
        "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful, highly intelligent language "
        "and vision assistant. You are able to understand the visual content that the user provides, "
        "and assist the user with a variety of tasks using natural language. Whenever an image is "
        "present in the conversation, very carefully examine it and consider its content when "
        "formulating your response.",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "qwen_2": Template(
        "qwen_2", "qwen_2",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        "User", "Assistant", " ", "<|im_end|>"),
    "plain": Template("plain", "plain", "", "", "", "\n"),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def render(template: Template, rounds: list[tuple[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(question, answer) rounds -> prompt string and each answer's supervised char span."""
    t = template
    spans = []
    if t.style == "plain":
        # preprocess_plain: the human turn becomes a bare <image>; answer + "\n" is supervised.
        if len(rounds) != 1:
            raise ValueError("plain template needs exactly one question/answer round")
        ret = DEFAULT_IMAGE_TOKEN
        start = len(ret)
        ret += rounds[0][1] + t.sep
        return ret, [(start, len(ret))]
    if t.style == "header":
        ret = t.system + t.sep
        for q, a in rounds:
            ret += t.user + LATENT_BLOCK + q + t.sep + t.assistant
            start = len(ret)
            ret += a + t.sep
            spans.append((start, len(ret)))
        return ret, spans
    if t.style == "qwen_2":
        ret = t.system + t.sep
        for q, a in rounds:
            ret += t.user + ": " + LATENT_BLOCK + q + t.sep + t.assistant + ": "
            start = len(ret)
            ret += a + t.sep2
            spans.append((start, len(ret)))
        return ret, spans
    raise ValueError(f"unknown template style {t.style!r}")


def _join(chunks, sep_id: int, sep_span, bos_id):
    """mm_utils.insert_separator: keep chunk 0's BOS, drop every later chunk's first token."""
    off = 1 if chunks and chunks[0][0] and bos_id is not None and chunks[0][0][0] == bos_id else 0
    ids, offs = [], []
    if off:
        ids.append(chunks[0][0][0])
        offs.append(chunks[0][1][0])
    for k, (c_ids, c_offs) in enumerate(chunks):
        if k > 0:
            ids.append(sep_id)
            offs.append(sep_span[k - 1])
        ids.extend(c_ids[off:])
        offs.extend(c_offs[off:])
    return ids, offs


def _split_with_spans(text: str, tag: str, base: int):
    parts, spans, pos = [], [], 0
    for piece in text.split(tag):
        parts.append((piece, base + pos))
        pos += len(piece)
        spans.append((base + pos, base + pos + len(tag)))
        pos += len(tag)
    return parts, spans[:-1]


def tokenize_prompt(tokenizer, prompt: str) -> tuple[np.ndarray, np.ndarray]:
    """`tokenizer_image_token`: -200 at <image>, -300 at <latent_image>; returns ids and [n, 2] offsets."""
    bos = getattr(tokenizer, "bos_id", None)
    img_parts, img_spans = _split_with_spans(prompt, DEFAULT_IMAGE_TOKEN, 0)
    img_chunks = []
    for piece, base in img_parts:
        lat_parts, lat_spans = _split_with_spans(piece, DEFAULT_LATENT_IMAGE_TOKEN, base)
        lat_chunks = []
        for sub, sub_base in lat_parts:
            ids, offs = tokenizer.encode_with_offsets(sub)
            lat_chunks.append((ids, [(s + sub_base, e + sub_base) for s, e in offs]))
        img_chunks.append(_join(lat_chunks, LATENT_IMAGE_TOKEN_INDEX, lat_spans, bos))
    ids, offs = _join(img_chunks, IMAGE_TOKEN_INDEX, img_spans, bos)
    return np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2)


def make_labels(ids: np.ndarray, offsets: np.ndarray, spans, *, mark_instruct: bool = True) -> np.ndarray:
    labels = np.full(ids.shape, IGNORE_INDEX, np.int64)
    for a0, a1 in spans:
        hit = (offsets[:, 0] < a1) & (offsets[:, 1] > a0) & (ids >= 0)
        idx = np.nonzero(hit)[0]
        if idx.size == 0:
            continue
        labels[idx] = ids[idx]
        if mark_instruct and idx[0] > 0:
            labels[idx[0] - 1] = INSTRUCT_INDEX
    return labels


def strip_tags(text: str) -> str:
    return (text.replace(DEFAULT_IMAGE_TOKEN, "").replace(DEFAULT_IM_START_TOKEN, "")
            .replace(DEFAULT_IM_END_TOKEN, "").strip())


def encode_conversation(tokenizer, template: Template, rounds: list[tuple[str, str]], *,
                        has_image: bool) -> dict:
    """Rounds (already through preprocess_multimodal) -> input_ids, labels, instructs, prompt."""
    prompt, spans = render(template, rounds)
    ids, offsets = tokenize_prompt(tokenizer, prompt)
    labels = make_labels(ids, offsets, spans, mark_instruct=template.style != "plain")
    if template.style == "plain":
        instruct_text = strip_tags(rounds[0][0])
    else:
        instruct_text = "".join(strip_tags(q) for q, _ in rounds)
    # Text-only samples get instructs [0] (preprocess_phi_3 / preprocess_llama_3).
    instructs = np.asarray(tokenizer(instruct_text), np.int64) if has_image else np.zeros(1, np.int64)
    return {"prompt": prompt, "input_ids": ids, "labels": labels, "instructs": instructs,
            "offsets": offsets, "spans": spans}
