"""Stage 2: the built-in procedural image generator (PIL).

Deterministic: the image depends only on the scene, the size, the font list and the rng
state. Shapes are drawn on a supersampled canvas and box-reduced (anti-aliasing that stays
legible at 32-64 px); light gaussian noise is added at the final resolution.

Fonts: by default only PIL's bundled font (``ImageFont.load_default(size=...)``, PIL >= 10.1)
is used, with varied sizes and stroke weights, so output is identical on every machine with
the same Pillow. ``fonts="system"`` adds TrueType fonts found under the usual system folders
(more variety, output then depends on the installed fonts).
"""
from __future__ import annotations

import glob
import io
import math
import os
from functools import cache, lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .scene import Scene, SceneObject, TextItem

SYSTEM_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts", "/Library/Fonts",
                    "/System/Library/Fonts", "C:/Windows/Fonts")


def _supersample(size: int) -> int:
    if size <= 96:
        return 4
    return 2


def shape_polygon(obj: SceneObject, size: float):
    """Polygon vertices (pixels, canvas of side ``size``) of a non-circle shape."""
    cx, cy, r = obj.x * size, obj.y * size, obj.r * size
    rot = math.radians(obj.rotation)

    def ring(n, radius, phase):
        return [(cx + radius * math.cos(phase + rot + 2 * math.pi * k / n),
                 cy + radius * math.sin(phase + rot + 2 * math.pi * k / n)) for k in range(n)]

    if obj.shape == "square":
        return ring(4, r, math.pi / 4)
    if obj.shape == "triangle":
        # equilateral, pointing up before rotation; centred on its centroid (slightly larger)
        return ring(3, r * 1.1, -math.pi / 2)
    if obj.shape == "hexagon":
        return ring(6, r, 0.0)
    if obj.shape == "star":
        pts = []
        for k in range(10):
            rad = r * 1.05 if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + rot + math.pi * k / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if obj.shape == "cross":
        a, b = r * 0.95, r * 0.34
        base = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
                (-a, b), (-a, -b), (-b, -b)]
        c, s = math.cos(rot), math.sin(rot)
        return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in base]
    raise ValueError(f"unknown shape {obj.shape!r}")


def draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, size: float, fill, outline=None,
                width: int = 0):
    if obj.shape == "circle":
        cx, cy, r = obj.x * size, obj.y * size, obj.r * size
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(shape_polygon(obj, size), fill=fill, outline=outline, width=width)


def object_masks(scene: Scene, res: int = 96) -> np.ndarray:
    """Boolean masks [n_objects, res, res] of every object's full silhouette."""
    out = np.zeros((len(scene.objects), res, res), dtype=bool)
    for i, o in enumerate(scene.objects):
        m = Image.new("L", (res, res), 0)
        draw_object(ImageDraw.Draw(m), o, res, fill=255)
        out[i] = np.asarray(m) > 127
    return out


def visible_fractions(scene: Scene, res: int = 96) -> np.ndarray:
    """Fraction of each object's silhouette not covered by objects drawn after it."""
    masks = object_masks(scene, res)
    n = len(masks)
    fr = np.ones(n)
    above = np.zeros((res, res), dtype=bool)
    for i in range(n - 1, -1, -1):
        area = masks[i].sum()
        fr[i] = (masks[i] & ~above).sum() / area if area else 0.0
        above |= masks[i]
    return fr


@cache
def _system_font_files() -> tuple:
    files = []
    for d in SYSTEM_FONT_DIRS:
        if os.path.isdir(d):
            files += glob.glob(os.path.join(d, "**", "*.ttf"), recursive=True)
    # plain faces only (no symbol / extra-light / oblique fonts that hurt legibility)
    bad = ("Oblique", "Italic", "ExtraLight", "Light", "Symbol", "Emoji", "Thin")
    return tuple(sorted(f for f in files if not any(b in os.path.basename(f) for b in bad)))


@lru_cache(maxsize=512)
def _font(font_id: str, px: int):
    if font_id == "builtin":
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1: fixed bitmap font
            return ImageFont.load_default()
    return ImageFont.truetype(font_id, px)


class ProceduralRenderer:
    """``ImageGenerator`` drawing the structured scene with PIL."""

    def __init__(self, fonts: str = "builtin"):
        if fonts not in ("builtin", "system"):
            raise ValueError("fonts must be 'builtin' or 'system'")
        self.fonts = fonts

    def font_ids(self) -> list:
        ids = ["builtin"]
        if self.fonts == "system":
            ids += list(_system_font_files())
        return ids

    # -- background ----------------------------------------------------------------------------
    def _background(self, scene: Scene, side: int) -> Image.Image:
        bg = scene.background
        img = Image.new("RGB", (side, side), tuple(bg.rgb))
        if bg.style == "solid":
            return img
        a = np.array(bg.rgb, dtype=np.float32)
        b = np.array(bg.rgb2, dtype=np.float32)
        if bg.style == "gradient":
            t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
            col = np.rint(a * (1 - t) + b * t).astype(np.uint8)  # [side, 1, 3]
            arr = np.broadcast_to(col, (side, side, 3))
        else:
            period = max(2, int(round(bg.period * side)))
            idx = np.arange(side) // period
            if bg.style == "stripes":
                sel = np.broadcast_to(idx[None, :] % 2 == 1, (side, side))
            else:
                sel = (idx[None, :] + idx[:, None]) % 2 == 1
            arr = np.where(sel[..., None], b.astype(np.uint8), a.astype(np.uint8))
        return Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8), "RGB")

    # -- text ----------------------------------------------------------------------------------
    def _draw_text(self, draw: ImageDraw.ImageDraw, t: TextItem, side: int):
        fonts = self.font_ids()
        font_id = fonts[t.font % len(fonts)]
        bw, bh = (t.x1 - t.x0) * side, (t.y1 - t.y0) * side
        stroke = max(1, int(round(bh * 0.05))) if t.stroke else 0
        px = max(4, int(bh))
        for _ in range(40):
            font = _font(font_id, px)
            left, top, right, bottom = draw.textbbox((0, 0), t.text, font=font, stroke_width=stroke)
            if (right - left) <= bw and (bottom - top) <= bh or px <= 4:
                break
            px = max(4, int(px * 0.92))
        cx, cy = (t.x0 + t.x1) / 2 * side, (t.y0 + t.y1) / 2 * side
        x = cx - (right - left) / 2 - left
        y = cy - (bottom - top) / 2 - top
        draw.text((x, y), t.text, fill=tuple(t.rgb), font=font, stroke_width=stroke,
                  stroke_fill=tuple(t.rgb))

    # -- protocol ------------------------------------------------------------------------------
    def generate(self, scene: Scene, caption: str, size: int, rng: np.random.Generator) -> Image.Image:
        ss = _supersample(size)
        side = size * ss
        img = self._background(scene, side)
        draw = ImageDraw.Draw(img)
        for o in scene.objects:
            if o.outline:
                dark = tuple(max(0, int(c * 0.45)) for c in o.rgb)
                draw_object(draw, o, side, fill=tuple(o.rgb), outline=dark, width=max(1, side // 150))
            else:
                draw_object(draw, o, side, fill=tuple(o.rgb))
        for t in scene.texts:
            self._draw_text(draw, t, side)
        if ss > 1:
            img = img.reduce(ss)
        if scene.noise_sigma > 0:
            arr = np.asarray(img, dtype=np.float32)
            noise = rng.normal(0.0, scene.noise_sigma, size=arr.shape).astype(np.float32)
            img = Image.fromarray(np.clip(np.rint(arr + noise), 0, 255).astype(np.uint8), "RGB")
        return img


def png_bytes(img: Image.Image) -> bytes:
    """Deterministic PNG encoding (no metadata, fixed fast compression: noisy
    images barely compress, level 1 is ~5x faster than the default for ~10% more bytes)."""
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=1)
    return buf.getvalue()
