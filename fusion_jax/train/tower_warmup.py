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
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from fusion_jax.config import FusionConfig
from fusion_jax.data.images import decode_image, main_view_uint8, normalize_crops, read_image_file
from fusion_jax.vision import SiglipVisionTower

SCENES = os.path.join("meta", "train_scenes.jsonl")


SIDE_MARGIN = 0.04       # an object centre this close to a centre line gets no side label on that axis
BACKGROUND_SLOTS = 4     # side_tags: background patches per image labelled "no object here"


def tag_targets(rows: list, grid: int, side_tags: bool = False, dense: bool = False) -> dict:
    """Per image, one slot per object (per covered patch with ``dense``) and one per text item, padded with -1.

    Each slot holds a patch (by default the one under the item's centre); objects get a shape id
    and a colour id, text items a word id. Returns {patch, shape, color, word: [N, S] int32, shapes, colors, words}.
    ``side_tags`` adds ``side_x`` / ``side_y`` (0 left / top, 1 right / bottom, 2 not an object)
    and ``BACKGROUND_SLOTS`` more slots per image on patches clear of every object and text item,
    labelled 2: the side is bound to the object's patches, not spread over the image like a
    position code (docs/ablations.md, session 14). ``dense``: every patch whose centre lies inside an
    object's disc gets that object's labels (the topmost object where discs overlap), not just the
    patch under its centre: identity on all of an object's tokens, which is what the LLM needs to
    find the object a question names (session 15)."""
    objs = [list(r["scene"]["objects"]) for r in rows]
    texts = [list(r["scene"].get("texts", [])) for r in rows]
    shapes = sorted({o["shape"] for ob in objs for o in ob})
    colors = sorted({o["color"] for ob in objs for o in ob})
    words = sorted({t["text"] for ts in texts for t in ts})
    c = (np.arange(grid) + 0.5) / grid
    cy, cx = (a.ravel() for a in np.meshgrid(c, c, indexing="ij"))
    half = 0.5 / grid

    def at(x, y):
        gy, gx = (min(max(int(v * grid), 0), grid - 1) for v in (y, x))
        return gy * grid + gx

    def covered(ob):
        """(patch, object index) slots: each centre patch, and with ``dense`` every patch inside a disc"""
        if not dense:
            return [(at(o["x"], o["y"]), j) for j, o in enumerate(ob)]
        owner = np.full(grid * grid, -1)
        for j, o in enumerate(ob):  # later objects are drawn on top
            owner[np.hypot(cx - o["x"], cy - o["y"]) <= o.get("r", 0.0)] = j
        for j, o in enumerate(ob):  # a small object still owns the patch under its centre
            owner[at(o["x"], o["y"])] = j
        return [(int(p), int(owner[p])) for p in np.nonzero(owner >= 0)[0]]

    slots = [covered(ob) for ob in objs]
    k0 = max([len(a) + len(b) for a, b in zip(slots, texts)] + [1])
    k = k0 + (BACKGROUND_SLOTS if side_tags else 0)
    names = ("shape", "color", "word") + (("side_x", "side_y") if side_tags else ())
    out = {n: np.full((len(rows), k), -1, np.int32) for n in names}
    out["patch"] = np.zeros((len(rows), k), np.int32)

    def side(v):
        return -1 if abs(v - 0.5) < SIDE_MARGIN else int(v > 0.5)

    for i, (ob, ts) in enumerate(zip(objs, texts)):
        for j, (p, oi) in enumerate(slots[i]):
            o = ob[oi]
            out["patch"][i, j] = p
            out["shape"][i, j], out["color"][i, j] = shapes.index(o["shape"]), colors.index(o["color"])
            if side_tags:
                out["side_x"][i, j], out["side_y"][i, j] = side(o["x"]), side(o["y"])
        for j, t in enumerate(ts, len(slots[i])):
            out["patch"][i, j] = at((t["x0"] + t["x1"]) / 2, (t["y0"] + t["y1"]) / 2)
            out["word"][i, j] = words.index(t["text"])
            if side_tags:
                out["side_x"][i, j] = out["side_y"][i, j] = 2
        if side_tags:
            clear = np.ones(grid * grid, bool)  # patch squares that touch no object disc or text box
            for o in ob:
                clear &= np.hypot(np.maximum(np.abs(cx - o["x"]) - half, 0),
                                  np.maximum(np.abs(cy - o["y"]) - half, 0)) > o.get("r", 0.0)
            for t in ts:
                clear &= ~((cx + half > t["x0"]) & (cx - half < t["x1"]) & (cy + half > t["y0"]) & (cy - half < t["y1"]))
            cand = np.nonzero(clear)[0]
            if len(cand):
                pick = cand[np.linspace(0, len(cand) - 1, min(BACKGROUND_SLOTS, len(cand))).astype(int)]
                sl = slice(k0, k0 + len(pick))
                out["patch"][i, sl], out["side_x"][i, sl], out["side_y"][i, sl] = pick, 2, 2
    return {**out, "shapes": shapes, "colors": colors, "words": words}


def region_targets(rows: list, shapes: list, colors: list, bands: int = 3) -> np.ndarray:
    """[N, (S + C) * 2 * bands] float32 multi-hot, per image: for each shape (then colour) and each
    column band and row band, whether an object of it has its centre in that band."""
    names = list(shapes) + list(colors)
    out = np.zeros((len(rows), len(names), 2, bands), np.float32)
    for i, r in enumerate(rows):
        for o in r["scene"]["objects"]:
            bx, by = (min(max(int(v * bands), 0), bands - 1) for v in (o["x"], o["y"]))
            for k in (names.index(o["shape"]), names.index(o["color"])):
                out[i, k, 0, bx] = out[i, k, 1, by] = 1.0
    return out.reshape(len(rows), -1)


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
    path = os.path.join(data_dir, SCENES)
    if not os.path.isfile(path):
        raise ValueError(f"config.vision_warmup: {path} not found (the warm-up needs the synthesized "
                         f"scene descriptions: data.source = 'synth')")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
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
    def __init__(self, cfg: FusionConfig, n_out: int, rngs: nnx.Rngs, n_region: int = 0):
        v = cfg.vision
        self.tower = SiglipVisionTower(v, rngs=rngs, early_mask_mode=cfg.early_mask_mode, remat_policy="none",
                                       scan=cfg.scan_layers, attn_impl=cfg.attention_impl,
                                       posemb_init=cfg.vision_posemb_init, param_dtype=cfg.param_dtype,
                                       dtype=cfg.compute_dtype)
        self.head = nnx.Linear(3 * v.hidden_size, n_out, rngs=rngs)
        # image-level, from the patch mean: which band each shape / colour sits in. A linear read of
        # a pool asks one patch feature to say "circle, top band", identity and place bound together
        # where the LLM pools (docs/ablations.md)
        self.region_head = nnx.Linear(3 * v.hidden_size, n_region, rngs=rngs) if n_region else None

    def __call__(self, pixels, patch):
        feats, _, _ = self.tower(pixels)  # the features the projector reads: 3 layers concatenated
        tags = self.head(jnp.take_along_axis(feats, patch[..., None], axis=1).astype(jnp.float32))
        if self.region_head is None:
            return tags, None
        return tags, self.region_head(feats.mean(axis=1).astype(jnp.float32))


def _masked_mean(x, w):
    return (x * w).sum() / jnp.maximum(w.sum(), 1.0)


def warm_start_tower(cfg: FusionConfig, data_dir: str, tower_params: dict, *, steps: int, lr: float,
                     batch_size: int, seed: int, text_images: int = 0, image_size: int = 384,
                     difficulty: str = "full", region_bands: int = 0, region_weight: float = 1.0,
                     side_tags: bool = False, dense_tags: bool = False, log=print) -> tuple[dict, dict]:
    """Train the tower (starting from ``tower_params``) on object and text tagging: (new params, stats).

    Each step sees ``batch_size`` training images and, with ``text_images`` > 0, as many images of a
    text corpus rendered at ``image_size`` / ``difficulty`` (see ``render_text_corpus``). With
    ``region_bands`` > 0 the patch mean also predicts ``region_targets`` (sigmoid
    cross-entropy, scaled by ``region_weight``; ``region_acc_last`` is its balanced accuracy).
    ``side_tags``: each object's centre patch also names its half of the image on each axis, and
    background patches "no object" (``tag_targets``; ``side_acc_last`` is that accuracy).
    ``dense_tags``: every patch of an object carries its labels (``tag_targets(dense=True)``)."""
    t0 = time.time()
    rows = read_scenes(data_dir)
    size = cfg.vision.image_size
    views = []
    for r in rows:
        path = os.path.join(data_dir, r["image"])
        views.append(main_view_uint8(decode_image(read_image_file(path), name=path), size))
    n_data = len(rows)
    if text_images > 0:
        extra_rows, extra_pil = render_text_corpus(text_images, image_size, difficulty, seed)
        rows, views = rows + extra_rows, views + [main_view_uint8(im, size) for im in extra_pil]
    images = normalize_crops(np.stack(views))  # the main view, as the model sees it
    tg = tag_targets(rows, cfg.vision.grid, side_tags=side_tags, dense=dense_tags)
    ns, nc, nw = len(tg["shapes"]), len(tg["colors"]), len(tg["words"])
    nsd = 6 if side_tags else 0  # x: left / right / none, y: top / bottom / none
    regions = region_targets(rows, tg["shapes"], tg["colors"], region_bands) if region_bands > 0 else None
    nr = 0 if regions is None else regions.shape[1]
    model = _Tagger(cfg, ns + nc + nw + nsd, nnx.Rngs(seed), n_region=nr)
    nnx.update(model.tower, jax.tree.map(jnp.asarray, tower_params))
    sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(1, int(0.03 * steps)), steps)
    opt = nnx.Optimizer(model, optax.adamw(sched, weight_decay=0.0), wrt=nnx.Param)

    def ce(logits, y):
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))

    @nnx.jit
    def step(model, opt, x, p, s, c, w, sx, sy, reg):
        def loss_fn(model):
            out, reg_logits = model(x, p)
            ls, lc, lw = out[..., :ns], out[..., ns:ns + nc], out[..., ns + nc:ns + nc + nw]
            obj, txt = (s >= 0).astype(jnp.float32), (w >= 0).astype(jnp.float32)
            loss = _masked_mean(ce(ls, s) + ce(lc, c), obj) + (_masked_mean(ce(lw, w), txt) if nw else 0.0)
            side_acc = 0.0
            if nsd:
                hits, n = 0.0, 0.0
                for lg, y in ((out[..., -6:-3], sx), (out[..., -3:], sy)):
                    m = (y >= 0).astype(jnp.float32)
                    loss = loss + _masked_mean(ce(lg, y), m)
                    hits, n = hits + ((lg.argmax(-1) == y) * m).sum(), n + m.sum()
                side_acc = hits / jnp.maximum(n, 1.0)
            reg_acc = 0.0
            if nr:
                # summed over one name's 2 * bands bits, averaged over names: as heavy as one tag
                # (region_weight 1); binding is learnt slower than tags, so a heavier weight helps it
                bce = optax.sigmoid_binary_cross_entropy(reg_logits, reg).mean() * 2 * region_bands
                loss = loss + bce * region_weight
                hit, pos = (reg_logits > 0).astype(jnp.float32), (reg > 0.5).astype(jnp.float32)
                reg_acc = (_masked_mean(hit, pos) + _masked_mean(1 - hit, 1 - pos)) / 2  # balanced
            acc = jnp.stack([_masked_mean((ls.argmax(-1) == s).astype(jnp.float32), obj),
                             _masked_mean((lw.argmax(-1) == w).astype(jnp.float32), txt) if nw else 0.0,
                             jnp.asarray(reg_acc, jnp.float32), jnp.asarray(side_acc, jnp.float32)])
            return loss, acc
        (loss, acc), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc

    rng = np.random.default_rng(seed)
    hist = []
    for _ in range(steps):
        idx = rng.integers(0, n_data, batch_size)
        if len(rows) > n_data:
            idx = np.concatenate([idx, rng.integers(n_data, len(rows), batch_size)])
        reg = regions[idx] if nr else np.zeros((len(idx), 0), np.float32)
        sides = [jnp.asarray(tg[k][idx]) if side_tags else jnp.zeros((len(idx), 0), jnp.int32)
                 for k in ("side_x", "side_y")]
        hist.append(step(model, opt, jnp.asarray(images[idx]),
                         *(jnp.asarray(tg[k][idx]) for k in ("patch", "shape", "color", "word")),
                         *sides, jnp.asarray(reg)))
    hist = np.asarray([np.concatenate([np.ravel(loss), acc]) for loss, acc in jax.device_get(hist)], np.float64)
    k = max(1, min(50, steps // 4))
    n_text = len(rows) - n_data
    stats = {"steps": steps, "images": n_data, "text_images": n_text, "shapes": tg["shapes"],
             "colors": tg["colors"], "words": tg["words"], "loss_first": float(hist[:k, 0].mean()),
             "loss_last": float(hist[-k:, 0].mean()), "shape_acc_last": float(hist[-k:, 1].mean()),
             "word_acc_last": float(hist[-k:, 2].mean()), "region_acc_last": float(hist[-k:, 3].mean()),
             "region_bands": region_bands, "region_weight": region_weight, "side_tags": bool(side_tags),
             "dense_tags": bool(dense_tags),
             "side_acc_last": float(hist[-k:, 4].mean()),
             "seconds": time.time() - t0}
    log(f"vision warm-up: {steps} steps tagging {ns} shapes, {nc} colours and {nw} words on {n_data} "
        f"training images and {n_text} rendered text images; loss {stats['loss_first']:.3f} -> "
        f"{stats['loss_last']:.3f}, shape accuracy {stats['shape_acc_last']:.3f}, word accuracy "
        f"{stats['word_acc_last']:.3f}" + (f", region balanced accuracy {stats['region_acc_last']:.3f}"
                                             if nr else "")
        + (f", side accuracy {stats['side_acc_last']:.3f}" if side_tags else "")
        + f" (last {k} batches); {stats['seconds']:.1f}s")
    return jax.tree.map(np.asarray, nnx.state(model.tower, nnx.Param).to_pure_dict()), stats
