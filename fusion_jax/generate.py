"""Generation: one jitted prefill (runs the interaction layers) plus a KV-cache decode loop.

Decode steps see the interaction-refined states only through the cache, as in the
reference. On the device, samples of different lengths are right padded and each
writes its new tokens at its own cache slot; left-padded (or right-padded) inputs
are accepted by `layout_padded`, which strips the padding on the host first.

Host side (prompts exactly like the reference's `model_vqa_loader.py` / `serve/cli.py`):
`encode_request` -> `collate` -> `generate` -> `decode_outputs`; `answer()` does all four.
Two instruct conventions: "eval" (default; no labels, the last prompt token is the only
instruct position, so only the first latent block is refined) and "chat" (the last token
of every user turn's assistant header is marked, so every block is refined).

CLI::

    python -m fusion_jax.generate --ckpt ORBAX_OR_HF_DIR --image PATH --prompt "..." \
        [--template phi_3] [--max-new-tokens N] [--query-len q] [--image-grid 12]
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.interaction import context_windows
from fusion_jax.llm import causal_keep, init_cache

TRACES = {"generate": 0, "decode_step": 0}   # Python-side trace counts (compile-count tests)


def prefill_inputs(model, batch):
    """(q, vision encodings, spliced input embeddings [B, S, D]).

    Every latent block (`latent_fill_pos`) holds the initial latents, refined or not
    (eval convention: only the first question's block is refined), as in the reference.
    """
    q = batch["latent_pos"].shape[1] // batch["instruct_pos"].shape[1]
    enc = model.encode(batch, q)
    return q, enc, model.splice(batch, enc)


def prefill(model, batch, max_new_tokens: int):
    """Returns (last-token logits [B, V], cache, kv_mask [B, Smax], lengths [B])."""
    cfg = model.cfg
    q, enc, x = prefill_inputs(model, batch)
    B, S, _ = x.shape
    smax = S + max_new_tokens
    cache = init_cache(cfg.llm, B, smax, cfg.compute_dtype)
    kv_mask = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, max_new_tokens)))
    keep = causal_keep(kv_mask, jnp.broadcast_to(jnp.arange(S), (B, S)))
    windows = (context_windows(enc["global_ctx"], q, cfg.window_size)
               if model.model.vision_sampler_layers is not None else None)
    h, cache, _ = model.decode(x, batch, windows, cache=cache,
                               cache_index=jnp.zeros((B,), jnp.int32), keep=keep)
    lengths = batch["attention_mask"].sum(-1).astype(jnp.int32)
    last = jnp.take_along_axis(h, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last), cache, kv_mask, lengths


def decode_step(model, token, cache, kv_mask, pos):
    """One token per sample at slot `pos` [B]; returns (logits [B, V], cache, kv_mask)."""
    TRACES["decode_step"] += 1
    B = token.shape[0]
    x = model.model.embed_tokens(token[:, None])
    kv_mask = kv_mask.at[jnp.arange(B), pos].set(True)
    keep = causal_keep(kv_mask, pos[:, None])
    h, cache, _ = model.decode(x, {}, None, cache=cache, cache_index=pos, keep=keep,
                               position_ids=pos[:, None])
    return model.logits(h[:, 0]), cache, kv_mask


def _pick(logits, rng, temperature, top_k, top_p):
    if temperature <= 0.0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    lg = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(lg, top_k)[0][:, -1:]
        lg = jnp.where(lg < kth, -jnp.inf, lg)
    if top_p < 1.0:
        srt = jnp.sort(lg, -1)[:, ::-1]
        cum = jnp.cumsum(jax.nn.softmax(srt, -1), -1)
        # smallest set whose mass reaches top_p; always keeps the best token
        cutoff_idx = jnp.sum(cum < top_p, -1, keepdims=True)
        cutoff = jnp.take_along_axis(srt, cutoff_idx, -1)
        lg = jnp.where(lg < cutoff, -jnp.inf, lg)
    return jax.random.categorical(rng, lg, -1).astype(jnp.int32)


MAX_EOS = 8


def generate(model, batch, *, max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, eos_ids=(), pad_id: int = 0, rng=None,
             return_logits: bool = False):
    """Greedy / sampled generation for a laid-out inference batch (`layout_padded`).

    The batch may use either instruct convention (it only changes instruct_pos/latent_pos).
    temperature <= 0 is greedy; otherwise top_k (0 = off) then top_p (1 = off) filtering
    and sampling from `rng`. eos_ids is data (up to 8 ids), not a compile-time constant.
    Compiles once per (shapes, max_new_tokens, sampling mode); the decode loop is a
    `lax.while_loop` that stops when every sample has emitted an eos id.

    Returns dict(tokens [B, N] (pad after eos), num_tokens [B] (eos included),
    step_logits [N, B, V] when return_logits).
    """
    eos = [int(e) for e in (eos_ids if isinstance(eos_ids, (tuple, list)) else [eos_ids])]
    if len(eos) > MAX_EOS:
        raise ValueError(f"at most {MAX_EOS} eos ids, got {len(eos)}")
    eos = jnp.asarray(eos + [-1] * (MAX_EOS - len(eos)), jnp.int32)
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, batch, eos, rng, max_new_tokens=int(max_new_tokens),
                     temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                     pad_id=int(pad_id), return_logits=bool(return_logits))


@partial(nnx.jit, static_argnames=("max_new_tokens", "temperature", "top_k", "top_p", "pad_id",
                                   "return_logits"))
def _generate(model, batch, eos, rng, *, max_new_tokens, temperature, top_k, top_p, pad_id,
              return_logits):
    TRACES["generate"] += 1
    logits, cache, kv_mask, lengths = prefill(model, batch, max_new_tokens)
    B, V = logits.shape
    toks = jnp.full((B, max_new_tokens), pad_id, jnp.int32)
    step_logits = jnp.zeros((max_new_tokens if return_logits else 0, B, V), jnp.float32)

    def emit(t, lg, toks, done, step_logits, rng):
        rng, sub = jax.random.split(rng)
        tok = _pick(lg, sub, temperature, top_k, top_p)
        tok = jnp.where(done, pad_id, tok)
        toks = toks.at[:, t].set(tok)
        if return_logits:
            step_logits = step_logits.at[t].set(lg)
        done = done | jnp.isin(tok, eos)
        return tok, toks, done, step_logits, rng

    done0 = jnp.zeros((B,), bool)
    tok, toks, done, step_logits, rng = emit(0, logits, toks, done0, step_logits, rng)

    def cond(s):
        t, _, _, _, done, _, _, _ = s
        return (t < max_new_tokens) & ~jnp.all(done)

    def body(s):
        t, tok, cache, kv_mask, done, toks, step_logits, rng = s
        pos = lengths + t - 1
        lg, cache, kv_mask = decode_step(model, tok, cache, kv_mask, pos)
        tok, toks, done2, step_logits, rng = emit(t, lg, toks, done, step_logits, rng)
        return t + 1, tok, cache, kv_mask, done2, toks, step_logits, rng

    state = (jnp.int32(1), tok, cache, kv_mask, done, toks, step_logits, rng)
    t, _, _, _, done, toks, step_logits, _ = jax.lax.while_loop(cond, body, state)
    is_eos = jnp.isin(toks, eos)
    first_eos = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, -1) + 1, max_new_tokens)
    out = {"tokens": toks, "num_tokens": jnp.minimum(first_eos, t)}
    if return_logits:
        out["step_logits"] = step_logits
    return out


# ----------------------------------------------------------------------------- no-cache baseline

@partial(nnx.jit, static_argnames=("max_new_tokens",))
def generate_nocache(model, batch, *, max_new_tokens: int):
    """Greedy decoding that recomputes the whole sequence every step (no KV cache).

    The benchmark's baseline. Each step is a teacher-forced full forward (interaction
    layers included), which the reference shows equals cached decoding, so the tokens
    match `generate(..., temperature=0)` (no eos handling: always `max_new_tokens`).
    """
    cfg = model.cfg
    q, enc, x = prefill_inputs(model, batch)
    B, S, D = x.shape
    N = max_new_tokens
    x = jnp.pad(x, ((0, 0), (0, N), (0, 0)))
    mask = jnp.pad(batch["attention_mask"].astype(bool), ((0, 0), (0, N)))
    full = dict(batch, attention_mask=mask,
                position_ids=jnp.broadcast_to(jnp.arange(S + N, dtype=jnp.int32), (B, S + N)))
    windows = (context_windows(enc["global_ctx"], q, cfg.window_size)
               if model.model.vision_sampler_layers is not None else None)
    lengths = batch["attention_mask"].sum(-1).astype(jnp.int32)
    rows = jnp.arange(B)

    def body(t, s):
        x, mask, toks = s
        h, _, _ = model.decode(x, dict(full, attention_mask=mask), windows)
        last = h[rows, lengths + t - 1]
        tok = jnp.argmax(model.logits(last), -1).astype(jnp.int32)
        x = x.at[rows, lengths + t].set(model.model.embed_tokens(tok).astype(x.dtype))
        mask = mask.at[rows, lengths + t].set(True)
        return x, mask, toks.at[:, t].set(tok)

    _, _, toks = jax.lax.fori_loop(0, N, body, (x, mask, jnp.zeros((B, N), jnp.int32)))
    return toks


# ----------------------------------------------------------------------------- host side: prompts

FAMILY_TEMPLATE = {"phi3": "phi_3", "llama": "llama_3", "qwen2": "qwen_2"}
CONVENTIONS = ("eval", "chat")


def default_template(cfg) -> str:
    return FAMILY_TEMPLATE.get(cfg.llm.family, "phi_3")


def image_question(text: str) -> str:
    """The first user message of an image sample (mm_use_im_start_end, as the reference)."""
    from fusion_jax.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN
    return DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + text


def render_prompt(template, turns) -> str:
    """`Conversation.get_prompt()` for (question, answer) turns whose last answer is None."""
    from fusion_jax.data.templates import render
    if not turns or turns[-1][1] is not None:
        raise ValueError("the last turn must be a question without answer (answer=None)")
    rounds = [(q, "" if a is None else a) for q, a in turns]
    prompt, _ = render(template, rounds)
    if template.style == "header":
        return prompt[: len(prompt) - len(template.sep)]
    if template.style == "qwen_2":
        return prompt[: len(prompt) - len(template.sep2)].rstrip(" ")
    return prompt[: len(prompt) - len(template.sep)]           # plain


def encode_request(tokenizer, template, turns, *, has_image: bool = True,
                   convention: str = "eval") -> dict:
    """(question, answer) turns (last answer None) -> input_ids, labels, instructs, prompt.

    The first question gets the image tag when `has_image`. labels is None for the eval
    convention; for "chat", INSTRUCT_INDEX sits on the last prompt token of every turn
    (what `fusion/serve/cli.py` passes).
    """
    from fusion_jax.constants import IGNORE_INDEX, INSTRUCT_INDEX
    from fusion_jax.data.templates import get_template, strip_tags, tokenize_prompt
    if convention not in CONVENTIONS:
        raise ValueError(f"convention={convention!r}: expected one of {CONVENTIONS}")
    template = get_template(template) if isinstance(template, str) else template
    turns = [(q, a) for q, a in turns]
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
    # serve/cli.py: user messages concatenated, then tags stripped (eval: one question)
    instruct_text = strip_tags("".join(q for q, _ in turns))
    instructs = np.asarray(tokenizer(instruct_text), np.int64) if has_image else np.zeros(1, np.int64)
    if instructs.size == 0:
        instructs = np.zeros(1, np.int64)
    return {"prompt": prompt, "input_ids": ids, "labels": labels, "instructs": instructs}


def _bucket(n: int, b: int) -> int:
    return n if not b else -(-n // b) * b


def pick_query_len(cfg, query_len=None) -> int:
    if query_len is None:
        return max(cfg.query_len)
    q = int(query_len)
    if q not in cfg.query_len:
        raise ValueError(f"query_len {q} is not among the configured choices {list(cfg.query_len)}")
    return q


def layout_padded(cfg, input_ids, instructs, images, *, attention_mask=None, labels=None,
                  query_len=None, seq_bucket: int = 0, instruct_bucket: int = 0, pad_id: int = 0):
    """Device batch for generation from reference-style inputs.

    input_ids: a list of 1-D arrays, or a 2-D array with `attention_mask` (left *or* right
    padding: padding is removed first, so the last real token of every sample is its
    instruct position under the eval convention). labels: None (eval convention) or
    per-sample label arrays with INSTRUCT_INDEX markers (chat convention).
    seq_bucket / instruct_bucket round the padded sizes up (fewer compilations; note that
    in the reference early-attention mode the instruct padding width nudges the numbers).
    """
    from fusion_jax.constants import INSTRUCT_INDEX
    from fusion_jax.layout import build_layout, spliced_length
    q = pick_query_len(cfg, query_len)
    if attention_mask is not None:
        m = np.asarray(attention_mask, bool)
        input_ids = [np.asarray(x)[mm] for x, mm in zip(np.asarray(input_ids), m)]
        if labels is not None:
            labels = [np.asarray(x)[mm] for x, mm in zip(np.asarray(labels), m)]
    input_ids = [np.asarray(x, np.int64).reshape(-1) for x in input_ids]
    if labels is not None and all(x is None for x in labels):
        labels = None
    if labels is not None:
        from fusion_jax.constants import IGNORE_INDEX
        labels = [np.asarray(x, np.int64) if x is not None else
                  np.where(np.arange(len(i)) == len(i) - 1, INSTRUCT_INDEX, IGNORE_INDEX)
                  for x, i in zip(labels, input_ids)]
        n_q = max(1, max(int((x == INSTRUCT_INDEX).sum()) for x in labels))
    else:
        n_q = 1
    need = max(spliced_length(x, num_image_tokens=cfg.num_image_tokens, query_len=q) for x in input_ids)
    if cfg.max_length is not None:
        need = min(need, cfg.max_length)
    ins = [np.asarray(x, np.int64).reshape(-1) for x in instructs]
    lay = build_layout(input_ids, labels, ins, num_image_tokens=cfg.num_image_tokens, query_len=q,
                       max_questions=n_q, seq_len=_bucket(need, seq_bucket),
                       instruct_len=_bucket(max(max(x.shape[0] for x in ins), 1), instruct_bucket),
                       pad_id=pad_id, max_length=cfg.max_length)
    lay.pop("labels", None)
    lay["images"] = np.asarray(images, np.float32)
    return lay


def load_image_crops(cfg, image) -> np.ndarray:
    """PIL image, path or None -> [5, 3, S, S] static_hd crops (zeros for None)."""
    from fusion_jax.data.images import decode_image, read_image_file, static_hd_crops, zero_crops
    S = cfg.vision.image_size
    if image is None:
        return zero_crops(S)
    if isinstance(image, (str, os.PathLike)):
        image = decode_image(read_image_file(os.fspath(image)), name=os.fspath(image))
    return static_hd_crops(image.convert("RGB"), S)


def stop_token_ids(cfg, tokenizer=None, template=None) -> tuple:
    """eos ids: the config's, the tokenizer's, and the template separator when it is one token."""
    from fusion_jax.data.templates import get_template
    ids = []
    eos = cfg.llm.eos_token_id
    ids += list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if tokenizer is not None:
        if getattr(tokenizer, "eos_id", None) is not None:
            ids.append(tokenizer.eos_id)
        if template is not None:
            t = get_template(template) if isinstance(template, str) else template
            for s in (t.sep, t.sep2):
                if s and s.strip() and tokenizer.token_to_id(s) is not None:
                    ids.append(tokenizer.token_to_id(s))
    return tuple(sorted(set(int(i) for i in ids)))


def stop_strings(template) -> tuple:
    from fusion_jax.data.templates import get_template
    t = get_template(template) if isinstance(template, str) else template
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
        if stops:
            cut = cut_at_stop(raw, stops)
            if cut != raw:     # re-decode the ids before the stop to drop special tokens
                keep = len(ids)
                while keep > 0 and len(tokenizer.decode(ids[:keep], skip_special_tokens=False)) > len(cut):
                    keep -= 1
                ids = ids[:keep]
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
    stop: tuple = field(default=None)
    seq_bucket: int = 64
    instruct_bucket: int = 0


def answer(model, tokenizer, requests, gcfg: GenerationConfig | None = None, *, rng=None,
           return_raw: bool = False):
    """requests: list of dicts {"turns": [(q, a), ..., (q, None)] or "question": str,
    "image": PIL image / path / None}. Returns the answer strings (and the raw outputs)."""
    import jax.numpy as jnp
    gcfg = gcfg or GenerationConfig()
    cfg = model.cfg
    tmpl = gcfg.template or default_template(cfg)
    encs, crops = [], []
    for r in requests:
        turns = r.get("turns") or [(r["question"], None)]
        img = r.get("image")
        encs.append(encode_request(tokenizer, tmpl, turns, has_image=img is not None,
                                   convention=gcfg.convention))
        crops.append(load_image_crops(cfg, img))
    pad = int(getattr(tokenizer, "pad_id", 0) or 0)
    lay = layout_padded(cfg, [e["input_ids"] for e in encs], [e["instructs"] for e in encs],
                        np.stack(crops), labels=[e["labels"] for e in encs], query_len=gcfg.query_len,
                        seq_bucket=gcfg.seq_bucket, instruct_bucket=gcfg.instruct_bucket, pad_id=pad)
    batch = {k: jnp.asarray(v) for k, v in lay.items()}
    eos = stop_token_ids(cfg, tokenizer, tmpl)
    if rng is None:
        rng = jax.random.PRNGKey(gcfg.seed)
    out = generate(model, batch, max_new_tokens=gcfg.max_new_tokens, temperature=float(gcfg.temperature),
                   top_k=int(gcfg.top_k), top_p=float(gcfg.top_p), eos_ids=eos, pad_id=pad, rng=rng)
    stops = stop_strings(tmpl) if gcfg.stop is None else tuple(gcfg.stop)
    texts = decode_outputs(tokenizer, out["tokens"], out["num_tokens"], stops)
    if return_raw:
        return texts, {"prompts": [e["prompt"] for e in encs], **jax.tree.map(np.asarray, out)}
    return texts


# ----------------------------------------------------------------------------- checkpoints

def find_tokenizer_dir(ckpt: str, tokenizer: str | None = None) -> str:
    cands = [tokenizer] if tokenizer else [ckpt, os.path.join(ckpt, "tokenizer")]
    if not tokenizer and _train_step_dir(ckpt) is not None:
        from fusion_jax.train.checkpoint import tokenizer_dir_of
        cands.append(tokenizer_dir_of(_train_step_dir(ckpt)))
    for c in cands:
        if c and os.path.isfile(os.path.join(c, "tokenizer.json")):
            return c
    raise FileNotFoundError(f"no tokenizer.json in {' or '.join(c for c in cands if c)} "
                            f"(pass --tokenizer DIR)")


def _train_step_dir(ckpt: str):
    """The step dir when `ckpt` is a train.py workdir / checkpoints dir / step dir, else None."""
    from fusion_jax.convert.orbax_io import is_orbax_dir
    if is_orbax_dir(ckpt):
        return None
    try:
        from fusion_jax.train.checkpoint import resolve_step_dir
        return resolve_step_dir(ckpt)
    except (ImportError, FileNotFoundError):
        return None


def load_model(ckpt: str, **overrides):
    """Orbax or HF folder (converted on the fly), or a train.py workdir / step dir -> model."""
    if _train_step_dir(ckpt) is not None:
        from fusion_jax.train.checkpoint import load_params
        return load_params(ckpt, **overrides)[0]
    try:
        from fusion_jax import from_pretrained
    except ImportError:
        from fusion_jax.hf_io import from_pretrained
    return from_pretrained(ckpt, **overrides)


def load_for_cli(a):
    """(tokenizer, model) for the generate/eval CLIs from their shared --ckpt/--tokenizer options."""
    from fusion_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(find_tokenizer_dir(a.ckpt, a.tokenizer))
    model = load_model(a.ckpt, **model_overrides(a))
    pick_query_len(model.cfg, a.query_len)
    return tok, model


def model_overrides(args) -> dict:
    ov = {}
    if getattr(args, "image_grid", None):
        ov["image_token_grid"] = int(args.image_grid)
    if getattr(args, "early_mask_mode", None):
        ov["early_mask_mode"] = args.early_mask_mode
    return ov


def add_generation_args(ap):
    ap.add_argument("--ckpt", required=True, help="Orbax folder or reference HF folder")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    ap.add_argument("--template", default=None, help="chat template (default: from the LLM family)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--query-len", type=int, default=None,
                    help="latent tokens per question, one of the configured choices (default: largest)")
    ap.add_argument("--image-grid", type=int, default=None,
                    help="FUSION-L: resize the image tokens to this grid (12 -> 144 tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string (repeatable; default: the template separator)")
    ap.add_argument("--convention", choices=CONVENTIONS, default="eval",
                    help="instruct positions: eval (last prompt token) or chat (every user turn)")
    ap.add_argument("--early-mask-mode", choices=("reference", "intended"), default=None)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            query_len=args.query_len, convention=args.convention,
                            template=args.template, stop=tuple(args.stop) if args.stop else None)


def main(argv=None) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.generate",
                                 description="Answer a question about an image with a FUSION checkpoint.")
    add_generation_args(ap)
    ap.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    ap.add_argument("--prompt", required=True, action="append",
                    help="question; repeat for a multi-turn conversation (earlier turns are "
                         "answered by the model in order)")
    ap.add_argument("--show-prompt", action="store_true")
    a = ap.parse_args(argv)
    from fusion_jax.data.templates import TEMPLATES
    if a.template is not None and a.template not in TEMPLATES:
        print(f"unknown template {a.template!r}; choose one of {sorted(TEMPLATES)}", file=sys.stderr)
        return 2
    try:
        tok, model = load_for_cli(a)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gcfg = generation_config(a)
    turns = []
    for k, p in enumerate(a.prompt):
        turns.append((p, None))
        texts, raw = answer(model, tok, [{"turns": turns, "image": a.image}], gcfg, return_raw=True)
        if a.show_prompt:
            print(f"--- prompt {k}:\n{raw['prompts'][0]}\n---", file=sys.stderr)
        turns[-1] = (p, texts[0])
        if len(a.prompt) > 1:
            print(f"USER: {p}\nASSISTANT: {texts[0]}")
        else:
            print(texts[0])
    return 0


if __name__ == "__main__":
    from fusion_jax.generate import main as _main
    sys.exit(_main())
