"""Log-likelihood of a continuation given a (context, image) prompt, from one teacher-forced
forward of our model: the prompt is the eval-convention prompt `generate` answers (image tag,
template, assistant header; the last prompt token is the instruct position; instructs = the
context without tags), followed by the continuation's tokens. The score is the sum of the
continuation tokens' log-probabilities; is_greedy says whether each was the argmax.

Differences from the reference's lmms-eval adapter (`scripts/lmms-eval/fusion_*.py`): it
returns the mean token loss (a positive number, not a log-probability), includes the template
separator after the continuation in it, and crashes on image tasks; here the separator is not
scored and images work.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fusion_jax.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, INSTRUCT_INDEX
from fusion_jax.generate.prompts import round_up


def clean_context(context: str) -> str:
    """The adapter's question text: `<image>` tags removed, stripped (the image tag is added back)."""
    return context.replace(DEFAULT_IMAGE_TOKEN, "").strip()


def encode_pair(tokenizer, template, context: str, continuation: str, has_image: bool) -> dict:
    """ids, labels (INSTRUCT at the last prompt token, continuation ids after it), instructs."""
    from fusion_jax.data.templates import tokenize_prompt
    from fusion_jax.generate.prompts import encode_request
    enc = encode_request(tokenizer, template, [(clean_context(context), None)], has_image=has_image)
    ctx = enc["input_ids"]
    full, _ = tokenize_prompt(tokenizer, enc["prompt"] + continuation)
    if np.array_equal(full[:ctx.shape[0]], ctx):
        cont = full[ctx.shape[0]:]
    else:                                   # a merge across the boundary: encode it on its own
        cont = np.asarray(tokenizer.tok.encode(continuation, add_special_tokens=False).ids, np.int64)
    labels = np.concatenate([np.full(ctx.shape, IGNORE_INDEX, np.int64), cont])
    labels[ctx.shape[0] - 1] = INSTRUCT_INDEX
    return {"input_ids": np.concatenate([ctx, cont]), "labels": labels, "instructs": enc["instructs"],
            "n_cont": int(cont.shape[0])}


@nnx.jit
def _score(model, batch):
    logits = model(batch)["logits"][:, :-1]
    tgt = batch["labels"][:, 1:]
    m = tgt >= 0
    lp = jax.nn.log_softmax(logits, -1)
    tok_lp = jnp.take_along_axis(lp, jnp.where(m, tgt, 0)[..., None], -1)[..., 0]
    greedy = (jnp.argmax(logits, -1) == tgt) | ~m
    return jnp.sum(jnp.where(m, tok_lp, 0.0), -1), jnp.all(greedy, -1)



def loglikelihoods(model, tokenizer, items, *, template=None, query_len=None, batch_size: int = 1,
                   seq_bucket: int = 64, instruct_bucket: int = 0) -> list:
    """items: [(context, continuation, image or None)] -> [(log-probability, is_greedy)]."""
    from fusion_jax.generate.prompts import check_context, default_template, load_image_crops, pick_query_len
    from fusion_jax.layout import build_layout, spliced_length
    cfg = model.cfg
    tmpl = template or default_template(cfg)
    q = pick_query_len(cfg, query_len)
    out = []
    for s in range(0, len(items), batch_size):
        chunk = list(items[s:s + batch_size])
        encs = [encode_pair(tokenizer, tmpl, c, x, img is not None) for c, x, img in chunk]
        pad = batch_size - len(chunk) if s else 0            # keep the compiled shape
        encs, imgs = encs + encs[-1:] * pad, [img for *_, img in chunk] + [chunk[-1][2]] * pad
        lengths = [spliced_length(e["input_ids"], num_image_tokens=cfg.num_image_tokens, query_len=q) for e in encs]
        check_context(cfg, lengths)
        lay = build_layout([e["input_ids"] for e in encs], [e["labels"] for e in encs],
                           [e["instructs"] for e in encs], num_image_tokens=cfg.num_image_tokens, query_len=q,
                           max_questions=1, seq_len=round_up(max(lengths), seq_bucket),
                           instruct_len=round_up(max(e["instructs"].shape[0] for e in encs), instruct_bucket),
                           pad_id=int(getattr(tokenizer, "pad_id", 0) or 0), max_length=cfg.max_length)
        lay["images"] = np.stack([load_image_crops(cfg, img) for img in imgs])
        lp, greedy = jax.device_get(_score(model, {k: jnp.asarray(v) for k, v in lay.items()}))
        out += [(float(a), bool(g)) for a, g in zip(lp[:len(chunk)], greedy[:len(chunk)], strict=True)]
    return out
