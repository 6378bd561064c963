"""Next-token cross entropy and DSM, the dual-supervised semantic mapping loss.

DSM = CosineEmbeddingLoss(+1) between L2-normalised pairs (torch formula, eps 1e-12):
  instruct term: embed_tokens(instructs) vs instruct_features, over valid instruct tokens;
  vision term:   patch embeddings (tower hidden_states[0]) vs aux_projector(image tokens).
Each term counts only where it has at least one element.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fusion_jax.constants import IGNORE_INDEX


def objective(cfg, ce, instruct_cos, vision_cos):
    """The one place the losses combine: (CE + dsm_weight * DSM, the named parts).

    DSM is the sum of its two cosine terms, or 0 with `cfg.use_dsm` off."""
    dsm = (instruct_cos + vision_cos) if cfg.use_dsm else jnp.float32(0.0)
    return ce + cfg.dsm_weight * dsm, {"ce_loss": ce, "instruct_cos_loss": instruct_cos,
                                       "vision_cos_loss": vision_cos, "dsm_loss": dsm}


def _nll(logits, targets):
    """Per-row -log p(target) in float32, 0 where the target is IGNORE_INDEX."""
    lg = logits.astype(jnp.float32)
    valid = targets != IGNORE_INDEX
    logz = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0)


def _mean(total, n):
    return jnp.where(n > 0, total / jnp.maximum(n, 1), 0.0)


def cross_entropy(logits, labels):
    """Mean CE of logits[:, :-1] against labels[:, 1:], ignoring IGNORE_INDEX: (loss, count of targets)."""
    n = jnp.sum(labels[:, 1:] != IGNORE_INDEX)
    return _mean(jnp.sum(_nll(logits[:, :-1], labels[:, 1:])), n), n


def chunked_cross_entropy(h, labels, head, chunk: int, skip_empty: bool = False):
    """`cross_entropy(head(h), labels)` without materialising [B, S, V] logits.

    Rows with a target are moved to the front of each sample (stable), then `head` + CE run
    per chunk of `chunk` rows under remat. `skip_empty` skips chunks without any target at run
    time (`lax.cond`): the head then costs ~#targets rows instead of S, with one program. It is a
    per-device branch, so a sharded run must not use it (devices would branch around collectives).
    """
    B, S, D = h.shape
    tg = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX, labels.dtype)], 1)
    order = jnp.argsort(tg == IGNORE_INDEX, axis=1, stable=True)
    C = max(1, min(int(chunk), S))
    n_chunks = -(-S // C)
    pad = n_chunks * C - S
    hs = jnp.pad(jnp.take_along_axis(h, order[..., None], axis=1), ((0, 0), (0, pad), (0, 0)))
    ts = jnp.pad(jnp.take_along_axis(tg, order, axis=1), ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    hs = jnp.swapaxes(hs.reshape(B, n_chunks, C, D), 0, 1)
    ts = jnp.swapaxes(ts.reshape(B, n_chunks, C), 0, 1)

    def nll_sum(hc, tc):
        return jnp.sum(_nll(head(hc), tc))

    def body(total, xs):
        hc, tc = xs
        if not skip_empty:
            return total + nll_sum(hc, tc), None
        return total + jax.lax.cond(jnp.any(tc != IGNORE_INDEX), nll_sum, lambda *_: jnp.float32(0.0), hc, tc), None

    total, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), jnp.float32(0.0), (hs, ts))
    n = jnp.sum(tg != IGNORE_INDEX)
    return _mean(total, n), n


def _normalize(x):
    x = x.astype(jnp.float32)
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def cosine_terms(a, b):
    """Per-token 1 - cos(normalize(a), normalize(b)), torch's cosine_embedding_loss formula."""
    a, b = _normalize(a), _normalize(b)
    prod = jnp.sum(a * b, -1)
    m1 = jnp.sum(a * a, -1) + 1e-12
    m2 = jnp.sum(b * b, -1) + 1e-12
    return 1.0 - prod / jnp.sqrt(m1 * m2)


def masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    n = mask.sum()
    return jnp.where(n > 0, jnp.sum(x * mask) / jnp.maximum(n, 1.0), 0.0), n


def dsm_loss(instruct_embeddings, instruct_features, instruct_mask, vision_embeddings, vision_features):
    """Returns (instruct_cos_loss, vision_cos_loss); either may be absent (None inputs -> 0)."""
    if instruct_features is not None:
        ins, _ = masked_mean(cosine_terms(instruct_embeddings, instruct_features), instruct_mask)
    else:
        ins = jnp.float32(0.0)
    vt = cosine_terms(vision_embeddings, vision_features)
    vis = jnp.mean(vt) if vt.size else jnp.float32(0.0)
    return ins, vis
