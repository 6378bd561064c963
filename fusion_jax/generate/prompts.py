"""Host side: requests -> token ids and a laid-out batch, generated ids -> answer strings.

Prompts exactly like the reference's `model_vqa_loader.py` / `serve/cli.py`:
`encode_request` -> `layout_padded` -> `generate` -> `decode_outputs`; `answer()` does all four.
Two instruct conventions: "eval" (default; no labels, the last prompt token is the only
instruct position, so only the first latent block is refined) and "chat" (the last token
of every user turn's assistant header is marked, so every block is refined).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.constants import (
    DEFAULT_IM_END_TOKEN,
    DEFAULT_IM_START_TOKEN,
    DEFAULT_IMAGE_TOKEN,
    IGNORE_INDEX,
    INSTRUCT_INDEX,
)
from fusion_jax.generate.decoding import generate
from fusion_jax.layout import build_layout, spliced_length

FAMILY_TEMPLATE = {"phi3": "phi_3", "llama": "llama_3", "qwen2": "qwen_2"}
CONVENTIONS = ("eval", "chat")


def default_template(cfg) -> str:
    return FAMILY_TEMPLATE.get(cfg.llm.family, "phi_3")


def _template(template):
    from fusion_jax.data.templates import get_template
    return get_template(template) if isinstance(template, str) else template


def image_question(text: str) -> str:
    """The first user message of an image sample (mm_use_im_start_end, as the reference)."""
    return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + text


def render_prompt(template, turns) -> str:
    """`Conversation.get_prompt()` for (question, answer) turns whose last answer is None."""
    from fusion_jax.data.templates import render
    if not turns or turns[-1][1] is not None:
        raise ValueError("the last turn must be a question without answer (answer=None)")
    prompt, _ = render(template, [(q, "" if a is None else a) for q, a in turns])
    if template.style == "qwen_2":
        return prompt[: len(prompt) - len(template.sep2)].rstrip(" ")
    return prompt[: len(prompt) - len(template.sep)]           # header, plain


def encode_request(tokenizer, template, turns, *, has_image: bool = True,
                   convention: str = "eval", instructs: str | None = None) -> dict:
    """(question, answer) turns (last answer None) -> input_ids, labels, instructs, prompt.

    The first question gets the image tag when `has_image`. labels is None for the eval
    convention; for "chat", INSTRUCT_INDEX sits on the last prompt token of every turn
    (what `fusion/serve/cli.py` passes). `instructs`, when given, is the text the vision tower
    reads instead of the questions (some reference benchmark scripts pass their own: MMMU the
    whole rendered prompt, ScienceQA the question even without an image).
    """
    from fusion_jax.data.templates import strip_tags, tokenize_prompt
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    template = _template(template)
    turns = list(turns)
    if has_image:
        turns[0] = (image_question(turns[0][0]), turns[0][1])
    prompt = render_prompt(template, turns)
    ids, _ = tokenize_prompt(tokenizer, prompt)
    labels = None
    if convention == "chat":
        labels = np.full(ids.shape, IGNORE_INDEX, np.int64)
        for k in range(len(turns)):
            sub = turns[:k] + [(turns[k][0], None)]
            n = tokenize_prompt(tokenizer, render_prompt(template, sub))[0].shape[0]
            labels[min(n, ids.shape[0]) - 1] = INSTRUCT_INDEX
    if instructs is None and has_image:  # serve/cli.py: user messages concatenated, tags stripped
        instructs = strip_tags("".join(q for q, _ in turns))
    ins = np.asarray(tokenizer(instructs), np.int64) if instructs is not None else None
    if ins is None or ins.size == 0:
        ins = np.zeros(1, np.int64)
    return {"prompt": prompt, "input_ids": ids, "labels": labels, "instructs": ins}


def round_up(n: int, b: int) -> int:
    """n rounded up to a multiple of the bucket b (0: unbucketed): fewer distinct shapes, fewer compiles."""
    return n if not b else -(-n // b) * b


def pick_query_len(cfg, query_len=None) -> int:
    if query_len is None:
        return max(cfg.query_len)
    q = int(query_len)
    if q not in cfg.query_len:
        raise ValueError(f"query_len {q} is not among the configured choices {list(cfg.query_len)}")
    return q


def _unpad(input_ids, attention_mask, labels):
    """Per-sample 1-D ids (and labels, None when no sample has any) with padding removed."""
    if attention_mask is not None:
        m = np.asarray(attention_mask, bool)
        input_ids = [np.asarray(x)[mm] for x, mm in zip(np.asarray(input_ids), m, strict=True)]
        if labels is not None:
            labels = [np.asarray(x)[mm] for x, mm in zip(np.asarray(labels), m, strict=True)]
    input_ids = [np.asarray(x, np.int64).reshape(-1) for x in input_ids]
    if labels is None or all(x is None for x in labels):
        return input_ids, None
    last_only = [np.where(np.arange(len(i)) == len(i) - 1, INSTRUCT_INDEX, IGNORE_INDEX) for i in input_ids]
    return input_ids, [np.asarray(x, np.int64) if x is not None else d
                       for x, d in zip(labels, last_only, strict=True)]


def check_context(cfg, lengths, max_new_tokens: int = 0):
    """A prompt the model cannot hold is an error naming the lengths, never a silent cut: each
    prompt (after image / latent expansion) fits max_length, and with the new tokens the
    positions stay below max_position_embeddings."""
    worst = int(np.argmax(lengths))
    n = int(lengths[worst])
    if cfg.max_length is not None and n > cfg.max_length:
        raise ValueError(f"prompt {worst} is {n} tokens (image and latent tokens included), longer than the "
                         f"model's max_length {cfg.max_length}; shorten it")
    limit = cfg.llm.max_position_embeddings
    if n + max_new_tokens > limit:
        raise ValueError(f"prompt {worst} is {n} tokens; with max_new_tokens {max_new_tokens} that is "
                         f"{n + max_new_tokens} positions, more than the model's max_position_embeddings {limit}")


def layout_padded(cfg, input_ids, instructs, images, *, attention_mask=None, labels=None,
                  query_len=None, seq_bucket: int = 0, instruct_bucket: int = 0, pad_id: int = 0,
                  max_new_tokens: int = 0):
    """Device batch for generation from reference-style inputs.

    input_ids: a list of 1-D arrays, or a 2-D array with `attention_mask` (left *or* right
    padding: padding is removed first, so the last real token of every sample is its
    instruct position under the eval convention). labels: None (eval convention) or
    per-sample label arrays with INSTRUCT_INDEX markers (chat convention).
    seq_bucket / instruct_bucket round the padded sizes up (fewer compilations; note that
    in the reference early-attention mode the instruct padding width nudges the numbers).
    A prompt too long for the model (`check_context`, with `max_new_tokens`) is a ValueError.
    """
    q = pick_query_len(cfg, query_len)
    input_ids, labels = _unpad(input_ids, attention_mask, labels)
    n_q = 1 if labels is None else max(1, max(int((x == INSTRUCT_INDEX).sum()) for x in labels))
    lengths = [spliced_length(x, num_image_tokens=cfg.num_image_tokens, query_len=q) for x in input_ids]
    check_context(cfg, lengths, max_new_tokens)
    need = max(lengths)
    ins = [np.asarray(x, np.int64).reshape(-1) for x in instructs]
    lay = build_layout(input_ids, labels, ins, num_image_tokens=cfg.num_image_tokens, query_len=q,
                       max_questions=n_q, seq_len=round_up(need, seq_bucket),
                       instruct_len=round_up(max(max(x.shape[0] for x in ins), 1), instruct_bucket),
                       pad_id=pad_id, max_length=cfg.max_length)
    lay.pop("labels", None)
    lay["images"] = np.asarray(images, np.float32)
    return lay


def load_image_crops(cfg, image) -> np.ndarray:
    """PIL image, path or None -> [5, 3, size, size] static_hd crops (zeros for None)."""
    from fusion_jax.data.images import static_hd_crops, zero_crops
    size = cfg.vision.image_size
    if image is None:
        return zero_crops(size)
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    return static_hd_crops(image.convert("RGB"), size)


def open_image(path):
    """A PIL image from a file; an ImageError naming the file when it is missing or not an image."""
    from fusion_jax.data.images import decode_image, read_image_file
    return decode_image(read_image_file(os.fspath(path)), name=os.fspath(path))


def stop_token_ids(cfg, tokenizer=None, template=None) -> tuple:
    """eos ids: the config's, the tokenizer's, and the template separator when it is one token."""
    eos = cfg.llm.eos_token_id
    ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer is not None:
        if getattr(tokenizer, "eos_id", None) is not None:
            ids.append(tokenizer.eos_id)
        if template is not None:
            t = _template(template)
            ids += [tokenizer.token_to_id(s) for s in (t.sep, t.sep2)
                    if s and s.strip() and tokenizer.token_to_id(s) is not None]
    return tuple(sorted({int(i) for i in ids}))


def stop_strings(template) -> tuple:
    t = _template(template)
    s = t.sep2 if t.style == "qwen_2" else t.sep
    return (s,) if s and s.strip() else ()


def cut_at_stop(text: str, stops) -> str:
    cut = len(text)
    for s in stops or ():
        i = text.find(s)
        if s and i >= 0:
            cut = min(cut, i)
    return text[:cut]


def decode_outputs(tokenizer, tokens, num_tokens, stops=(), *, skip_special_tokens=True) -> list:
    """Generated ids -> answer strings: decode, cut at the first stop string, strip."""
    tokens, num_tokens = np.asarray(tokens), np.asarray(num_tokens)
    out = []
    for b in range(tokens.shape[0]):
        ids = tokens[b, : int(num_tokens[b])].tolist()
        raw = tokenizer.decode(ids, skip_special_tokens=False)
        cut = cut_at_stop(raw, stops)
        if cut != raw:     # re-decode the ids before the stop to drop special tokens
            while ids and len(tokenizer.decode(ids, skip_special_tokens=False)) > len(cut):
                ids = ids[:-1]
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        out.append(cut_at_stop(text, stops).strip())
    return out


@dataclass
class GenerationConfig:
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    query_len: int | None = None
    convention: str = "eval"
    template: str | None = None
    stop: tuple | None = None          # None: the template separator
    seq_bucket: int = 64
    instruct_bucket: int = 0


def answer(model, tokenizer, requests, gcfg: GenerationConfig | None = None, *, rng=None,
           return_raw: bool = False):
    """requests: list of dicts {"turns": [(q, a), ..., (q, None)] or "question": str,
    "image": PIL image / path / None, optional "instructs": str (see `encode_request`)}.
    Returns the answer strings (and the raw outputs)."""
    gcfg = gcfg or GenerationConfig()
    cfg = model.cfg
    tmpl = gcfg.template or default_template(cfg)
    encs = [encode_request(tokenizer, tmpl, r.get("turns") or [(r["question"], None)],
                           has_image=r.get("image") is not None, convention=gcfg.convention,
                           instructs=r.get("instructs")) for r in requests]
    crops = np.stack([load_image_crops(cfg, r.get("image")) for r in requests])
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    lay = layout_padded(cfg, [e["input_ids"] for e in encs], [e["instructs"] for e in encs], crops,
                        labels=[e["labels"] for e in encs], query_len=gcfg.query_len,
                        seq_bucket=gcfg.seq_bucket, instruct_bucket=gcfg.instruct_bucket, pad_id=pad,
                        max_new_tokens=gcfg.max_new_tokens)
    out = generate(model, {k: jnp.asarray(v) for k, v in lay.items()}, max_new_tokens=gcfg.max_new_tokens,
                   temperature=float(gcfg.temperature), top_k=int(gcfg.top_k), top_p=float(gcfg.top_p),
                   eos_ids=stop_token_ids(cfg, tokenizer, tmpl), pad_id=pad,
                   rng=jax.random.PRNGKey(gcfg.seed) if rng is None else rng)
    stops = stop_strings(tmpl) if gcfg.stop is None else tuple(gcfg.stop)
    texts = decode_outputs(tokenizer, out["tokens"], out["num_tokens"], stops)
    if return_raw:
        return texts, {"prompts": [e["prompt"] for e in encs], **jax.tree.map(np.asarray, out)}
    return texts
