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
from fusion_jax.sharding import under_sharded_mesh


def target_weights(tg, power: float = 0.0):
    """Weight of each target of `tg` ([B, T] shifted labels): n ** -power, n the length of the run
    of consecutive targets it sits in (one answer turn). 0: every token 1 (HF's token mean);
    1: every answer turn counts once, so a one-word answer weighs as much as a long description."""
    valid = tg != IGNORE_INDEX
    if not power:
        return valid.astype(jnp.float32)
    B, T = tg.shape
    prev = jnp.pad(valid, ((0, 0), (1, 0)))[:, :-1]
    run = jnp.cumsum(valid & ~prev, axis=1) - 1              # run index along the row
    run = jnp.where(valid, run, T)                            # T: a dropped slot
    lengths = jnp.zeros((B, T + 1), jnp.float32).at[jnp.arange(B)[:, None], run].add(1.0)
    n = jnp.take_along_axis(lengths, run, axis=1)
    return jnp.where(valid, jnp.maximum(n, 1.0) ** -float(power), 0.0)


def cross_entropy(logits, labels, power: float = 0.0):
    """Mean CE of logits[:, :-1] against labels[:, 1:], ignoring IGNORE_INDEX, each target weighted
    by `target_weights(power)` (0: plain mean). Returns (loss, count of targets)."""
    lg = logits[:, :-1].astype(jnp.float32)
    tg = labels[:, 1:]
    valid = tg != IGNORE_INDEX
    w = target_weights(tg, power)
    logz = jax.nn.logsumexp(lg, axis=-1)
    picked = jnp.take_along_axis(lg, jnp.where(valid, tg, 0)[..., None], axis=-1)[..., 0]
    nll = jnp.where(valid, logz - picked, 0.0)
    n, wsum = valid.sum(), w.sum()
    return jnp.where(n > 0, jnp.sum(w * nll) / jnp.maximum(wsum, 1e-12), 0.0), n


def chunked_cross_entropy(h, labels, head, chunk: int, power: float = 0.0):
    """`cross_entropy(head(h), labels, power)` without materialising [B, S, V] logits.

    Rows with a target are moved to the front of each sample (stable), then `head` + CE run
    per chunk of `chunk` rows under remat; on one device, chunks without any target are skipped
    at run time (`lax.cond`), so the head costs ~#targets rows instead of S, with one program.
    """
    B, S, D = h.shape
    tg = jnp.concatenate([labels[:, 1:], jnp.full((B, 1), IGNORE_INDEX, labels.dtype)], 1)
    w = target_weights(tg, power)
    order = jnp.argsort(tg == IGNORE_INDEX, axis=1, stable=True)
    hs = jnp.take_along_axis(h, order[..., None], axis=1)
    ts = jnp.take_along_axis(tg, order, axis=1)
    ws = jnp.take_along_axis(w, order, axis=1)
    C = max(1, min(int(chunk), S))
    n_chunks = -(-S // C)
    pad = n_chunks * C - S
    hs = jnp.pad(hs, ((0, 0), (0, pad), (0, 0)))
    ts = jnp.pad(ts, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
    ws = jnp.pad(ws, ((0, 0), (0, pad)))
    hs = jnp.swapaxes(hs.reshape(B, n_chunks, C, D), 0, 1)
    ts = jnp.swapaxes(ts.reshape(B, n_chunks, C), 0, 1)
    ws = jnp.swapaxes(ws.reshape(B, n_chunks, C), 0, 1)

    def nll_sum(hc, tc, wc):
        lg = head(hc).astype(jnp.float32)
        valid = tc != IGNORE_INDEX
        logz = jax.nn.logsumexp(lg, axis=-1)
        picked = jnp.take_along_axis(lg, jnp.where(valid, tc, 0)[..., None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(valid, wc * (logz - picked), 0.0))

    # Skipping is per device under SPMD: devices holding different rows could take different
    # branches around the head's collectives and deadlock, so sharded runs compute every chunk.
    skip = not under_sharded_mesh()

    def body(total, xs):
        hc, tc, wc = xs
        if not skip:
            return total + nll_sum(hc, tc, wc), None
        s = jax.lax.cond(jnp.any(tc != IGNORE_INDEX), nll_sum, lambda *_: jnp.float32(0.0), hc, tc, wc)
        return total + s, None

    total, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), jnp.float32(0.0), (hs, ts, ws))
    n = jnp.sum(tg != IGNORE_INDEX)
    return jnp.where(n > 0, total / jnp.maximum(w.sum(), 1e-12), 0.0), n


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
