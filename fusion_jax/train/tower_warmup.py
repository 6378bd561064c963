"""Vision-tower warm start for synthesized data: the tiny demo's stand-in for SigLIP pretraining.

FUSION starts from a pretrained SigLIP tower; the tiny demo's tower starts from random weights.
Trained end to end from there, it learns colours but not shapes within the CPU budget (a linear
probe of its features finds no more shape information than at initialisation; docs/ablations.md).
This trains the tower alone, before the main run, to name the shape and colour under each
object's centre patch and the word under each text item's centre patch. Labels come from the
synthesized scene descriptions (``meta/train_scenes.jsonl``, training split only) and from an
optional rendered text corpus; inputs are the main view exactly as the model sees it. Only the
tower's weights are kept; the classifier head is dropped.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx

from fusion_jax import paths
from fusion_jax.config import FusionConfig
from fusion_jax.data.images import decode_image, main_view_uint8, normalize_crops, read_image_file
from fusion_jax.vision import SiglipVisionTower

SCENES = "meta/train_scenes.jsonl"


def tag_targets(rows: list, grid: int) -> dict:
    """Per image, one slot per object and one per text item, padded with -1.

    Each slot holds the patch under the item's centre; objects get a shape id and a colour id,
    text items a word id. Returns {patch, shape, color, word: [N, S] int32, shapes, colors, words}."""
    objs = [list(r["scene"]["objects"]) for r in rows]
    texts = [list(r["scene"].get("texts", [])) for r in rows]
    shapes = sorted({o["shape"] for ob in objs for o in ob})
    colors = sorted({o["color"] for ob in objs for o in ob})
    words = sorted({t["text"] for ts in texts for t in ts})

    def at(x, y):
        gy, gx = (min(max(int(v * grid), 0), grid - 1) for v in (y, x))
        return gy * grid + gx

    k = max([len(a) + len(b) for a, b in zip(objs, texts, strict=True)] + [1])
    out = {n: np.full((len(rows), k), -1, np.int32) for n in ("shape", "color", "word")}
    out["patch"] = np.zeros((len(rows), k), np.int32)
    for i, (ob, ts) in enumerate(zip(objs, texts, strict=True)):
        for j, o in enumerate(ob):
            out["patch"][i, j] = at(o["x"], o["y"])
            out["shape"][i, j], out["color"][i, j] = shapes.index(o["shape"]), colors.index(o["color"])
        for j, t in enumerate(ts, len(ob)):
            out["patch"][i, j] = at((t["x0"] + t["x1"]) / 2, (t["y0"] + t["y1"]) / 2)
            out["word"][i, j] = words.index(t["text"])
    return {**out, "shapes": shapes, "colors": colors, "words": words}


def render_text_corpus(n: int, image_size: int, difficulty: str, seed: int) -> tuple[list, list]:
    """``n`` freshly rendered text scenes (rows like ``read_scenes``'s, and their images).

    900 text images of a 6000-sample set teach the tiny tower to read 12 words at 0.58 held-out;
    6900 teach it to 0.93 (docs/ablations.md). Pretraining corpora are separate from the QA set."""
    from fusion_jax.synth.pipeline import SynthConfig, SynthPipeline
    pipe = SynthPipeline(SynthConfig(image_size=image_size, difficulty=difficulty))
    rng = np.random.default_rng([seed, 0x7E47])
    rows, images = [], []
    for _ in range(n):
        scene = pipe.scene_sampler.sample("text", rng, pipe.palette)
        images.append(pipe.image_generator.generate(scene, "", image_size, rng).convert("RGB"))
        rows.append({"scene": scene.to_dict()})
    return rows, images


def read_scenes(data_dir: str) -> list:
    path = paths.join(data_dir, SCENES)
    if not paths.isfile(path):
        raise ValueError(f"config.vision_warmup: {path} not found (the warm-up needs the synthesized "
                         f"scene descriptions: data.source = 'synth')")
    rows = []
    for n, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise ValueError(f"config.vision_warmup: {path}:{n} is not JSON ({e})") from None
        ok = isinstance(r, dict) and isinstance(r.get("image"), str) and isinstance(r.get("scene"), dict)
        if not ok or not {"objects", "texts"} <= r["scene"].keys():
            raise ValueError(f"config.vision_warmup: {path}:{n} is not a scene record "
                             f"(needs image, scene.objects and scene.texts)")
        rows.append(r)
    if not any(r["scene"]["objects"] for r in rows):
        raise ValueError(f"config.vision_warmup: no objects in {path}")
    return rows


class _Tagger(nnx.Module):
    def __init__(self, cfg: FusionConfig, n_out: int, rngs: nnx.Rngs):
        v = cfg.vision
        self.tower = SiglipVisionTower(v, rngs=rngs, early_mask_mode=cfg.early_mask_mode, remat_policy="none",
                                       scan=cfg.scan_layers, attn_impl=cfg.attention_impl, linear_2d=cfg.linear_2d,
                                       param_dtype=cfg.param_dtype, dtype=cfg.compute_dtype)
        self.head = nnx.Linear(3 * v.hidden_size, n_out, rngs=rngs)

    def __call__(self, pixels, patch):
        feats, _, _ = self.tower(pixels)  # the features the projector reads: 3 layers concatenated
        return self.head(jnp.take_along_axis(feats, patch[..., None], axis=1).astype(jnp.float32))


def _masked_mean(x, w):
    return (x * w).sum() / jnp.maximum(w.sum(), 1.0)


def _ce(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))


def _make_step(ns: int, nc: int, nw: int):
    """The jitted update: shape + colour CE on object slots, word CE on text slots; (loss, [shape, word] acc)."""
    @nnx.jit
    def step(model, opt, x, p, s, c, w):
        def loss_fn(model):
            out = model(x, p)
            ls, lc, lw = out[..., :ns], out[..., ns:ns + nc], out[..., ns + nc:ns + nc + nw]
            obj, txt = (s >= 0).astype(jnp.float32), (w >= 0).astype(jnp.float32)
            loss = _masked_mean(_ce(ls, s) + _ce(lc, c), obj) + (_masked_mean(_ce(lw, w), txt) if nw else 0.0)
            acc = jnp.stack([_masked_mean((ls.argmax(-1) == s).astype(jnp.float32), obj),
                             _masked_mean((lw.argmax(-1) == w).astype(jnp.float32), txt) if nw else 0.0])
            return loss, acc
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc
    return step


def _load_images(cfg: FusionConfig, data_dir: str, text_images: int, image_size: int, difficulty: str,
                 seed: int):
    """(scene rows, normalized main views, training image count): the split's, then the text corpus."""
    rows = read_scenes(data_dir)
    size = cfg.vision.image_size
    views = []
    for r in rows:
        path = paths.join(data_dir, r["image"])
        views.append(main_view_uint8(decode_image(read_image_file(path), name=path), size))
    n_data = len(rows)
    if text_images > 0:
        extra_rows, extra_pil = render_text_corpus(text_images, image_size, difficulty, seed)
        rows, views = rows + extra_rows, views + [main_view_uint8(im, size) for im in extra_pil]
    return rows, normalize_crops(np.stack(views)), n_data


def warm_start_tower(cfg: FusionConfig, data_dir: str, tower_params: dict, *, steps: int, lr: float,
                     batch_size: int, seed: int, text_images: int = 0, image_size: int = 384,
                     difficulty: str = "full", log=print) -> tuple[dict, dict]:
    """Train the tower (starting from ``tower_params``) on object and text tagging: (new params, stats).

    Each step sees ``batch_size`` training images and, with ``text_images`` > 0, as many images of a
    text corpus rendered at ``image_size`` / ``difficulty`` (see ``render_text_corpus``)."""
    t0 = time.time()
    rows, images, n_data = _load_images(cfg, data_dir, text_images, image_size, difficulty, seed)
    tg = tag_targets(rows, cfg.vision.grid)
    ns, nc, nw = len(tg["shapes"]), len(tg["colors"]), len(tg["words"])
    model = _Tagger(cfg, ns + nc + nw, nnx.Rngs(seed))
    nnx.update(model.tower, jax.tree.map(jnp.asarray, tower_params))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(0.03 * steps)), steps)
    opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.0), wrt=nnx.Param)
    step = _make_step(ns, nc, nw)
    rng = np.random.default_rng(seed)
    hist = []
    for _ in range(steps):
        idx = rng.integers(0, n_data, batch_size)
        if len(rows) > n_data:
            idx = np.concatenate([idx, rng.integers(n_data, len(rows), batch_size)])
        hist.append(step(model, opt, jnp.asarray(images[idx]),
                         *(jnp.asarray(tg[k][idx]) for k in ("patch", "shape", "color", "word"))))
    hist = np.asarray([np.concatenate([np.ravel(loss), acc]) for loss, acc in jax.device_get(hist)], np.float64)
    k = max(1, min(50, steps // 4))
    stats = {"steps": steps, "images": n_data, "text_images": len(rows) - n_data, "shapes": tg["shapes"],
             "colors": tg["colors"], "words": tg["words"], "loss_first": float(hist[:k, 0].mean()),
             "loss_last": float(hist[-k:, 0].mean()), "shape_acc_last": float(hist[-k:, 1].mean()),
             "word_acc_last": float(hist[-k:, 2].mean()), "seconds": time.time() - t0}
    log(f"vision warm-up: {steps} steps tagging {ns} shapes, {nc} colours and {nw} words on {n_data} "
        f"training images and {stats['text_images']} rendered text images; loss {stats['loss_first']:.3f} -> "
        f"{stats['loss_last']:.3f}, shape accuracy {stats['shape_acc_last']:.3f}, word accuracy "
        f"{stats['word_acc_last']:.3f} (last {k} batches); {stats['seconds']:.1f}s")
    return jax.tree.map(np.asarray, nnx.state(model.tower, nnx.Param).to_pure_dict()), stats
