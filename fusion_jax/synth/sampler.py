"""The built-in scene sampler: random descriptions biased towards the QA kind they serve,
and the colour / placement geometry it shares with the filters."""
from __future__ import annotations

import math

import numpy as np

from .palette import Palette
from .scene import Background, Scene, SceneObject, TextItem


def _jitter(rgb, amount, rng):
    if not amount:
        return tuple(int(c) for c in rgb)
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(e)))) for c, e in zip(rgb, d, strict=True))


def color_distance(a, b) -> float:
    return float(math.sqrt(sum((int(x) - int(y)) ** 2 for x, y in zip(a, b, strict=True))))


def _luminance(rgb) -> float:
    def ch(c):
        c = c / 255.0
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (ch(c) for c in rgb)
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast_ratio(a, b) -> float:
    """WCAG contrast ratio between two colours (1 .. 21)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


MIN_OBJECT_BG_DISTANCE = 90.0


class ProceduralSceneSampler:
    """Samples a random description biased towards the QA kind it will serve.

    ``overlap`` is the largest allowed centre distance shrink between objects: 1.0 means
    objects never touch; smaller values let them overlap (the filters then drop QA pairs that
    become ambiguous)."""

    def __init__(self, allow_overlap_prob: float = 0.15, image_size: int | None = None,
                 min_text_px: float = 9.0, min_radius_px: float = 3.5):
        self.allow_overlap_prob = allow_overlap_prob
        # The description stays resolution-free, but when the target size is known we keep
        # text and objects large enough to be legible there (so fewer samples are filtered).
        self.min_text_frac = min_text_px / image_size if image_size else 0.0
        self.min_radius_frac = min_radius_px / image_size if image_size else 0.0

    # -- pieces --------------------------------------------------------------------------------
    def _background(self, rng, p: Palette) -> Background:
        names = list(p.backgrounds)
        name = names[int(rng.integers(len(names)))]
        rgb = p.backgrounds[name]
        style = p.background_styles[int(rng.integers(len(p.background_styles)))]
        if style == "solid":
            rgb2 = rgb
        else:
            # a second, close shade of the same colour (keeps the named colour accurate)
            delta = int(rng.integers(14, 30)) * (1 if sum(rgb) < 384 else -1)
            rgb2 = tuple(int(min(255, max(0, c + delta))) for c in rgb)
        period = float(rng.uniform(0.06, 0.16))
        return Background(name=name, style=style, rgb=tuple(rgb), rgb2=tuple(rgb2), period=period)

    def _colors_for(self, bg: Background, p: Palette) -> list:
        return [c for c, rgb in p.colors.items()
                if min(color_distance(rgb, bg.rgb), color_distance(rgb, bg.rgb2)) >= MIN_OBJECT_BG_DISTANCE]

    def _place(self, rng, radii, taken, allow_overlap, tries=60):
        """Positions for circles of the given radii, avoiding ``taken`` [(x, y, r)] boxes."""
        out = []
        occupied = list(taken)
        for r in radii:
            placed = None
            for _ in range(tries):
                x = float(rng.uniform(r + 0.02, 1 - r - 0.02))
                y = float(rng.uniform(r + 0.02, 1 - r - 0.02))
                ok = True
                for (ox, oy, orr) in occupied:
                    need = (r + orr) * (0.55 if allow_overlap else 1.08)
                    if math.hypot(x - ox, y - oy) < need:
                        ok = False
                        break
                if ok:
                    placed = (x, y)
                    break
            if placed is None:
                return None
            out.append(placed)
            occupied.append((placed[0], placed[1], r))
        return out

    def _make_objects(self, rng, p, colors, specs, taken, allow_overlap):
        """specs: list of (shape, color, size). Returns SceneObjects or None if placement failed."""
        radii = []
        for _, _, size in specs:
            lo, hi = p.sizes[size]
            radii.append(max(float(rng.uniform(lo, hi)), self.min_radius_frac))
        pos = self._place(rng, radii, taken, allow_overlap)
        if pos is None:
            return None
        objs = []
        for i, ((shape, color, size), r, (x, y)) in enumerate(zip(specs, radii, pos, strict=True)):
            rot = 0.0
            if p.rotate:
                if shape == "square" or shape == "cross":
                    rot = float(rng.uniform(-15, 15))
                elif shape != "circle":
                    rot = float(rng.uniform(0, 360))
            outline = bool(rng.random() < p.outline_prob)
            objs.append(SceneObject(id=f"o{i}", shape=shape, color=color, size=size, x=x, y=y, r=r,
                                    rotation=rot, rgb=_jitter(p.colors[color], p.color_jitter, rng),
                                    outline=outline))
        return objs

    def _text(self, rng, p: Palette, bg: Background, idx: int, taken) -> TextItem | None:
        word = p.words[int(rng.integers(len(p.words)))]
        lo, hi = p.text_height
        lo, hi = max(lo, self.min_text_frac), max(hi, min(0.4, self.min_text_frac * 1.3))
        h = float(rng.uniform(lo, hi))
        # glyph aspect of the built-in font is ~0.6 (width / height) per character
        w = min(0.9, h * 0.62 * len(word) + 0.02)
        cands = [c for c, rgb in p.colors.items()
                 if min(contrast_ratio(rgb, bg.rgb), contrast_ratio(rgb, bg.rgb2)) >= 3.0]
        if not cands:
            return None
        color = cands[int(rng.integers(len(cands)))]
        for _ in range(40):
            x0 = float(rng.uniform(0.03, 0.97 - w))
            y0 = float(rng.uniform(0.03, 0.97 - h))
            box = (x0, y0, x0 + w, y0 + h)
            if all(not _box_hits_circle(box, t) for t in taken):
                return TextItem(id=f"t{idx}", text=word, color=color, x0=x0, y0=y0, x1=x0 + w,
                                y1=y0 + h, rgb=tuple(p.colors[color]),
                                stroke=int(rng.random() < 0.3) if p.name == "full" else 1,
                                font=int(rng.integers(0, 1 << 16)))
        return None

    # -- main ----------------------------------------------------------------------------------
    def sample(self, kind: str, rng: np.random.Generator, palette: Palette) -> Scene:
        p = palette
        for _ in range(50):
            scene = self._try_sample(kind, rng, p)
            if scene is not None:
                return scene
        raise RuntimeError("could not sample a scene")  # pragma: no cover

    def _try_sample(self, kind, rng, p) -> Scene | None:
        bg = self._background(rng, p)
        colors = self._colors_for(bg, p)
        if len(colors) < 3:
            return None
        sizes = list(p.sizes)
        allow_overlap = bool(rng.random() < self.allow_overlap_prob) and p.name == "full"

        def rand_spec():
            return (p.shapes[int(rng.integers(len(p.shapes)))], colors[int(rng.integers(len(colors)))],
                    sizes[int(rng.integers(len(sizes)))])

        specs = []
        texts: list = []
        taken: list = []
        if kind == "text":
            t = self._text(rng, p, bg, 0, [])
            if t is None:
                return None
            texts.append(t)
            taken.append(("box", t.x0, t.y0, t.x1, t.y1))
            n_obj = int(rng.integers(0, 3 if p.name == "easy" else 4))
            specs = [rand_spec() for _ in range(n_obj)]
        elif kind == "count":
            n = int(rng.integers(1, p.max_count + 1))
            target = rand_spec()
            if p.name == "full" and rng.random() < 0.5:
                # same shape, possibly different colours or sizes: counted by shape only or by both
                specs = [(target[0], target[1] if rng.random() < 0.6 else colors[int(rng.integers(len(colors)))],
                          sizes[int(rng.integers(len(sizes)))]) for _ in range(n)]
            else:
                specs = [(target[0], target[1], target[2] if p.name == "easy" else sizes[int(rng.integers(len(sizes)))])
                         for _ in range(n)]
            n_other = int(rng.integers(0, max(1, p.max_objects - n) + 1))
            n_other = min(n_other, p.max_objects - n)
            specs += [rand_spec() for _ in range(max(0, n_other))]
            order = rng.permutation(len(specs))
            specs = [specs[i] for i in order]
        else:
            lo = 2 if kind == "spatial" else 1
            hi = p.max_objects if p.name == "full" else 3
            n = int(rng.integers(lo, hi + 1))
            specs = [rand_spec() for _ in range(n)]
            if p.name == "easy" and kind in ("color", "scene", "spatial"):
                # keep each shape (colour / spatial referents) unique so questions stay answerable
                shapes = list(rng.permutation(len(p.shapes)))[:n]
                cols = list(rng.permutation(len(colors)))[:n]
                specs = [(p.shapes[s], colors[c], sizes[0]) for s, c in zip(shapes, cols, strict=False)]
        tboxes = [b for b in taken]
        circles = []
        for b in tboxes:
            # approximate the text box by its circumscribed circle for placement
            _, x0, y0, x1, y1 = b
            circles.append(((x0 + x1) / 2, (y0 + y1) / 2, math.hypot(x1 - x0, y1 - y0) / 2))
        objs = self._make_objects(rng, p, colors, specs, circles, allow_overlap)
        if objs is None:
            return None
        if kind != "text" and rng.random() < p.extra_text_prob:
            t = self._text(rng, p, bg, 0, [(o.x, o.y, o.r) for o in objs])
            if t is not None:
                texts.append(t)
        sigma = float(rng.uniform(*p.noise_sigma))
        return Scene(background=bg, objects=objs, texts=texts, noise_sigma=sigma, kind=kind,
                     difficulty=p.name)


def _box_hits_circle(box, c) -> bool:
    if c and c[0] == "box":
        _, a0, b0, a1, b1 = c
        x0, y0, x1, y1 = box
        return not (x1 < a0 or a1 < x0 or y1 < b0 or b1 < y0)
    cx, cy, r = c
    x0, y0, x1, y1 = box
    nx = min(max(cx, x0), x1)
    ny = min(max(cy, y0), y1)
    return math.hypot(cx - nx, cy - ny) < r * 1.05


def text_overlaps_objects(scene: Scene, t: TextItem) -> bool:
    return any(_box_hits_circle((t.x0, t.y0, t.x1, t.y1), (o.x, o.y, o.r)) for o in scene.objects)

