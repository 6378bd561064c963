"""Vision-tower warm start for synthesized data: the tiny demo's stand-in for SigLIP pretraining.

FUSION starts from a pretrained SigLIP tower; the tiny demo's tower starts from random weights.
Trained end to end from there, it learns colours but not shapes within the CPU budget (a linear
probe of its features finds no more shape information than at initialisation; docs/ablations.md).
This trains the tower alone, before the main run, to name the shape and colour of every object
from the patch under the object's centre. The labels come from the synthesized scene descriptions
(``meta/train_scenes.jsonl``, training split only) and the inputs are the main view exactly as
the model sees it. Only the tower's weights are kept; the classifier head is dropped.
"""
from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from PIL import Image

from fusion_jax.config import FusionConfig
from fusion_jax.data.images import static_hd_crops
from fusion_jax.vision import SiglipVisionTower

SCENES = os.path.join("meta", "train_scenes.jsonl")


def object_targets(rows: list, grid: int):
    """Per image, up to K objects: (patch index under the centre, shape id, colour id); -1 pads.

    Returns (patch [N, K], shape [N, K], colour [N, K], shape names, colour names)."""
    shapes = sorted({o["shape"] for r in rows for o in r["scene"]["objects"]})
    colors = sorted({o["color"] for r in rows for o in r["scene"]["objects"]})
    k = max([len(r["scene"]["objects"]) for r in rows] + [1])
    patch = np.zeros((len(rows), k), np.int32)
    shape = np.full((len(rows), k), -1, np.int32)
    color = np.full((len(rows), k), -1, np.int32)
    for i, r in enumerate(rows):
        for j, o in enumerate(r["scene"]["objects"]):
            gy, gx = (min(max(int(o[a] * grid), 0), grid - 1) for a in ("y", "x"))
            patch[i, j] = gy * grid + gx
            shape[i, j], color[i, j] = shapes.index(o["shape"]), colors.index(o["color"])
    return patch, shape, color, shapes, colors


def read_scenes(data_dir: str) -> list:
    path = os.path.join(data_dir, SCENES)
    if not os.path.isfile(path):
        raise ValueError(f"config.vision_warmup: {path} not found (the warm-up needs the synthesized "
                         f"scene descriptions: data.source = 'synth')")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not any(r["scene"]["objects"] for r in rows):
        raise ValueError(f"config.vision_warmup: no objects in {path}")
    return rows


class _Tagger(nnx.Module):
    def __init__(self, cfg: FusionConfig, n_shapes: int, n_colors: int, rngs: nnx.Rngs):
        v = cfg.vision
        self.tower = SiglipVisionTower(v, rngs=rngs, early_mask_mode=cfg.early_mask_mode, remat_policy="none",
                                       scan=cfg.scan_layers, attn_impl=cfg.attention_impl,
                                       param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        self.head = nnx.Linear(3 * v.hidden_size, n_shapes + n_colors, rngs=rngs)
        self.n_shapes = n_shapes

    def __call__(self, pixels, patch):
        feats, _, _ = self.tower(pixels)  # the features the projector reads: 3 layers concatenated
        return self.head(jnp.take_along_axis(feats, patch[..., None], axis=1).astype(jnp.float32))


def warm_start_tower(cfg: FusionConfig, data_dir: str, tower_params: dict, *, steps: int, lr: float,
                     batch_size: int, seed: int, log=print) -> tuple[dict, dict]:
    """Train the tower (starting from ``tower_params``) on object tagging: (new params, stats)."""
    t0 = time.time()
    rows = read_scenes(data_dir)
    size = cfg.vision.image_size
    images = np.stack([static_hd_crops(Image.open(os.path.join(data_dir, r["image"])).convert("RGB"), size)[4]
                       for r in rows])
    patch, shape, color, shapes, colors = object_targets(rows, cfg.vision.grid)
    model = _Tagger(cfg, len(shapes), len(colors), nnx.Rngs(seed))
    nnx.update(model.tower, jax.tree.map(jnp.asarray, tower_params))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(0.03 * steps)), steps)
    opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.0), wrt=nnx.Param)
    ns = len(shapes)

    @nnx.jit
    def step(model, opt, x, p, s, c):
        def loss_fn(model):
            logits = model(x, p)
            ce = (optax.softmax_cross_entropy_with_integer_labels(logits[..., :ns], jnp.maximum(s, 0))
                  + optax.softmax_cross_entropy_with_integer_labels(logits[..., ns:], jnp.maximum(c, 0)))
            w = (s >= 0).astype(jnp.float32)
            hit = (logits[..., :ns].argmax(-1) == s).astype(jnp.float32)
            return (ce * w).sum() / w.sum(), (hit * w).sum() / w.sum()
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc

    rng = np.random.default_rng(seed)
    hist = []
    for _ in range(steps):
        idx = rng.integers(0, len(rows), batch_size)
        hist.append(step(model, opt, jnp.asarray(images[idx]), jnp.asarray(patch[idx]),
                         jnp.asarray(shape[idx]), jnp.asarray(color[idx])))
    hist = np.asarray(jax.device_get(hist), np.float64).reshape(-1, 2)
    k = max(1, min(50, steps // 4))
    stats = {"steps": steps, "images": len(rows), "shapes": shapes, "colors": colors,
             "loss_first": float(hist[:k, 0].mean()), "loss_last": float(hist[-k:, 0].mean()),
             "shape_acc_last": float(hist[-k:, 1].mean()), "seconds": time.time() - t0}
    log(f"vision warm-up: {steps} steps tagging {len(shapes)} shapes and {len(colors)} colours on "
        f"{len(rows)} images; loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}, shape accuracy "
        f"{stats['shape_acc_last']:.3f} (last {k} batches); {stats['seconds']:.1f}s")
    return jax.tree.map(np.asarray, nnx.state(model.tower, nnx.Param).to_pure_dict()), stats
