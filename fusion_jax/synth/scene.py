"""Stage 1: scene descriptions, their natural-language captions, and the stage protocols.

A :class:`Scene` is the *language-first* description of one sample: a background, a list of
objects (shape, colour, size class, position, rotation) and a list of rendered text strings.
Coordinates are normalized to the unit square (x to the right, y downwards) so a description
does not depend on the image size it is later rendered at. Everything downstream (the image,
the QA pairs, the filters) is derived from this description.

The three pluggable stages are :class:`CaptionWriter`, :class:`ImageGenerator` and
:class:`QAWriter` (``typing.Protocol``). The built-in implementations are procedural
(:class:`TemplateCaptionWriter` here, ``render.ProceduralRenderer``, ``qa.TemplateQAWriter``);
an LLM captioner or a text-to-image model can replace any of them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

KINDS = ("color", "count", "spatial", "existence", "text", "scene")

# Well separated colours. Names are the answers; RGB is the rendered value (before jitter).
COLORS_FULL = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (240, 215, 30),
    "green": (35, 160, 55),
    "blue": (35, 75, 215),
    "purple": (135, 55, 185),
    "pink": (245, 120, 185),
    "brown": (125, 75, 35),
    "black": (20, 20, 20),
    "white": (248, 248, 248),
    "gray": (128, 128, 128),
}
COLORS_EASY = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 225),
    "yellow": (240, 220, 20),
    "purple": (150, 40, 200),
    "black": (15, 15, 15),
}
SHAPES_FULL = ("circle", "square", "triangle", "star", "hexagon", "cross")
SHAPES_EASY = ("circle", "square", "triangle")

# Backgrounds: name -> RGB. Names appear in captions.
BACKGROUNDS_FULL = {
    "white": (250, 250, 250),
    "light gray": (215, 215, 215),
    "beige": (235, 222, 195),
    "light blue": (200, 222, 240),
    "pale green": (210, 235, 205),
    "pale yellow": (248, 243, 200),
    "dark gray": (70, 70, 75),
    "navy": (30, 40, 80),
}
BACKGROUNDS_EASY = {
    "white": (250, 250, 250),
    "light gray": (222, 222, 222),
    "beige": (238, 228, 205),
}
BACKGROUND_STYLES_FULL = ("solid", "gradient", "stripes", "checker")
BACKGROUND_STYLES_EASY = ("solid",)

# Size classes: name -> (min, max) radius as a fraction of the image side.
SIZES_FULL = {"small": (0.055, 0.07), "medium": (0.085, 0.105), "large": (0.125, 0.15)}
SIZES_EASY = {"large": (0.15, 0.18)}

WORDS_FULL = (
    "CAT", "DOG", "SUN", "MOON", "STAR", "TREE", "BOOK", "FISH", "BIRD", "LAMP", "CAKE", "SHIP",
    "OPEN", "STOP", "EXIT", "SALE", "CAFE", "HOTEL", "TAXI", "BANK", "PARK", "ZOO", "MILK",
    "RAIN", "SNOW", "WIND", "FIRE", "GOLD", "RICE", "TEA", "JAZZ", "ROCK", "BLUE", "KING",
    "Hello", "Music", "Pizza", "River", "Garden", "Market", "Coffee", "Window", "Orange",
    "Planet", "Silver", "Ticket", "Museum", "Bakery", "Forest", "Castle", "2024", "42", "77",
)
WORDS_EASY = ("CAT", "DOG", "SUN", "BOX", "CAR", "HAT", "CUP", "BUS", "PEN", "KEY", "MAP", "EGG")

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


@dataclasses.dataclass(frozen=True)
class Palette:
    """The vocabulary a scene is drawn from (``easy`` or ``full``)."""

    name: str
    colors: dict
    shapes: tuple
    backgrounds: dict
    background_styles: tuple
    sizes: dict
    words: tuple
    max_objects: int
    max_count: int
    rotate: bool
    color_jitter: int
    noise_sigma: tuple  # (min, max) gaussian noise std in 0..255 units
    outline_prob: float
    text_height: tuple  # text box height as a fraction of the side
    extra_text_prob: float  # probability of a (distractor) text item in non-text scenes


EASY = Palette(
    name="easy", colors=COLORS_EASY, shapes=SHAPES_EASY, backgrounds=BACKGROUNDS_EASY,
    background_styles=BACKGROUND_STYLES_EASY, sizes=SIZES_EASY, words=WORDS_EASY,
    max_objects=4, max_count=4, rotate=False, color_jitter=0, noise_sigma=(0.0, 2.0),
    outline_prob=0.0, text_height=(0.26, 0.32), extra_text_prob=0.0,
)
FULL = Palette(
    name="full", colors=COLORS_FULL, shapes=SHAPES_FULL, backgrounds=BACKGROUNDS_FULL,
    background_styles=BACKGROUND_STYLES_FULL, sizes=SIZES_FULL, words=WORDS_FULL,
    max_objects=8, max_count=7, rotate=True, color_jitter=12, noise_sigma=(1.0, 5.0),
    outline_prob=0.25, text_height=(0.08, 0.16), extra_text_prob=0.2,
)
PALETTES = {"easy": EASY, "full": FULL}


def get_palette(difficulty: str | Palette) -> Palette:
    if isinstance(difficulty, Palette):
        return difficulty
    try:
        return PALETTES[difficulty]
    except KeyError:
        raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {sorted(PALETTES)}")


@dataclasses.dataclass
class SceneObject:
    id: str
    shape: str
    color: str
    size: str
    x: float  # centre, fraction of width
    y: float  # centre, fraction of height
    r: float  # circumradius, fraction of the side
    rotation: float = 0.0  # degrees
    rgb: tuple = (0, 0, 0)
    outline: bool = False


@dataclasses.dataclass
class TextItem:
    id: str
    text: str
    color: str
    x0: float
    y0: float
    x1: float
    y1: float
    rgb: tuple = (0, 0, 0)
    stroke: int = 0  # 0 = regular, 1 = bold (stroke)
    font: int = 0  # index into the renderer's font list


@dataclasses.dataclass
class Background:
    name: str
    style: str
    rgb: tuple
    rgb2: tuple  # second colour for gradient / stripes / checker (equal to rgb for solid)
    period: float = 0.1  # stripe / checker period as a fraction of the side


@dataclasses.dataclass
class Scene:
    background: Background
    objects: list
    texts: list
    noise_sigma: float = 0.0
    kind: str = ""
    difficulty: str = "full"

    def to_dict(self) -> dict:
        return _round_floats(dataclasses.asdict(self))

    @staticmethod
    def from_dict(d: dict) -> Scene:
        d = dict(d)
        bg = d.pop("background")
        bg = Background(**{**bg, "rgb": tuple(bg["rgb"]), "rgb2": tuple(bg["rgb2"])})
        objs = [SceneObject(**{**o, "rgb": tuple(o["rgb"])}) for o in d.pop("objects")]
        texts = [TextItem(**{**t, "rgb": tuple(t["rgb"])}) for t in d.pop("texts")]
        return Scene(background=bg, objects=objs, texts=texts, **d)


def _round_floats(x):
    if isinstance(x, float):
        return round(x, 5)
    if isinstance(x, dict):
        return {k: _round_floats(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_round_floats(v) for v in x]
    return x


# ----------------------------------------------------------------------------------------------
# Geometry helpers shared by captions, QA and filters.

def region_of(x: float, y: float) -> str:
    """Coarse position phrase of a point: 'top left', 'center', 'bottom', ..."""
    h = "left" if x < 1 / 3 else ("right" if x > 2 / 3 else "")
    v = "top" if y < 1 / 3 else ("bottom" if y > 2 / 3 else "")
    if h and v:
        return f"{v} {h}"
    return h or v or "center"


def location_phrase(x: float, y: float) -> str:
    """'in the top left corner', 'on the right', 'at the bottom', 'in the center'."""
    r = region_of(x, y)
    if " " in r:
        return f"in the {r} corner"
    if r in ("left", "right"):
        return f"on the {r}"
    if r in ("top", "bottom"):
        return f"at the {r}"
    return "in the center"


def plural(shape: str, n: int) -> str:
    if n == 1:
        return shape
    if shape.endswith(("s", "x", "ch", "sh")):
        return shape + "es"
    return shape + "s"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def matches(obj: SceneObject, sel: dict) -> bool:
    """Does ``obj`` satisfy a selector like {'shape': 'circle', 'color': 'red'} (None = any)?"""
    return all(v is None or getattr(obj, k) == v for k, v in sel.items())


def select(scene: Scene, sel: dict) -> list:
    return [o for o in scene.objects if matches(o, sel)]


def noun_phrase(sel: dict, article: str = "the", n: int = 1) -> str:
    """'the large red circle' for {'size': 'large', 'color': 'red', 'shape': 'circle'}."""
    words = [sel.get("size"), sel.get("color"), plural(sel.get("shape") or "object", n)]
    phrase = " ".join(w for w in words if w)
    if article == "a":
        article = "an" if phrase[0] in "aeiou" else "a"
    return f"{article} {phrase}".strip() if article else phrase


def unique_selector(scene: Scene, obj: SceneObject, exclude: Sequence[str] = ()) -> dict | None:
    """Shortest selector (by attributes, never mentioning ``exclude``) that picks out only obj."""
    attrs = [a for a in ("color", "size") if a not in exclude]
    candidates = [()]
    for a in attrs:
        candidates.append((a,))
    if len(attrs) == 2:
        candidates.append(tuple(attrs))
    for extra in candidates:
        sel = {"shape": obj.shape, **{a: getattr(obj, a) for a in extra}}
        if len(select(scene, sel)) == 1:
            return sel
    return None


# ----------------------------------------------------------------------------------------------
# The protocols.

@runtime_checkable
class CaptionWriter(Protocol):
    """Writes the natural-language description of a scene (an LLM can implement this)."""

    def caption(self, scene: Scene, rng: np.random.Generator) -> str: ...


@runtime_checkable
class ImageGenerator(Protocol):
    """Turns a description into an RGB PIL image of ``size`` x ``size`` pixels.

    A text-to-image model may ignore ``scene`` and use ``caption`` only; the procedural
    renderer uses the structured scene. It must be deterministic for a given rng state for the
    dataset to be reproducible."""

    def generate(self, scene: Scene, caption: str, size: int, rng: np.random.Generator) -> Any: ...


@runtime_checkable
class QAWriter(Protocol):
    """Derives candidate QA pairs (``qa.QAPair``) of one kind from the description."""

    def write(self, scene: Scene, caption: str, kind: str, rng: np.random.Generator,
              palette: Palette) -> list: ...


@runtime_checkable
class SceneSampler(Protocol):
    def sample(self, kind: str, rng: np.random.Generator, palette: Palette) -> Scene: ...


# ----------------------------------------------------------------------------------------------
# Built-in scene sampler.

def _jitter(rgb, amount, rng):
    if not amount:
        return tuple(int(c) for c in rgb)
    d = rng.integers(-amount, amount + 1, size=3)
    return tuple(int(min(255, max(0, c + int(e)))) for c, e in zip(rgb, d))


def color_distance(a, b) -> float:
    return float(math.sqrt(sum((int(x) - int(y)) ** 2 for x, y in zip(a, b))))


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
        for i, ((shape, color, size), r, (x, y)) in enumerate(zip(specs, radii, pos)):
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
                specs = [(p.shapes[s], colors[c], sizes[0]) for s, c in zip(shapes, cols)]
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


# ----------------------------------------------------------------------------------------------
# Built-in caption writer.

class TemplateCaptionWriter:
    """A rich, deterministic (given the rng) description assembled from templates."""

    def caption(self, scene: Scene, rng: np.random.Generator) -> str:
        bg = scene.background
        n = len(scene.objects)
        style = {"solid": "plain", "gradient": "softly shaded", "stripes": "striped",
                 "checker": "checkered"}[bg.style]
        parts = []
        if n == 0:
            parts.append(f"The image shows a {style} {bg.name} background.")
        else:
            count = number_word(n)
            opener = ("The image shows {c} {o} on a {s} {b} background.",
                      "On a {s} {b} background there {be} {c} {o}.",
                      "This picture contains {c} {o} drawn over a {s} {b} background.")[int(rng.integers(3))]
            parts.append(opener.format(c=count, o=plural("shape", n), s=style, b=bg.name,
                                       be="is" if n == 1 else "are"))
        # group identical objects
        groups: dict = {}
        for o in scene.objects:
            groups.setdefault((o.size, o.color, o.shape), []).append(o)
        for (size, color, shape), objs in groups.items():
            if len(objs) == 1:
                o = objs[0]
                parts.append(f"{noun_phrase({'size': size, 'color': color, 'shape': shape}, 'a').capitalize()} "
                             f"is {location_phrase(o.x, o.y)}.")
            else:
                where = sorted({region_of(o.x, o.y) for o in objs})
                where = where[0] if len(where) == 1 else ", ".join(where[:-1]) + " and " + where[-1]
                parts.append(f"There are {number_word(len(objs))} "
                             f"{noun_phrase({'size': size, 'color': color, 'shape': shape}, '', len(objs))} "
                             f"(around the {where}).")
        # a couple of relations between uniquely describable objects
        uniq = [(o, unique_selector(scene, o)) for o in scene.objects]
        uniq = [(o, s) for o, s in uniq if s is not None]
        rels = []
        for i in range(len(uniq)):
            for j in range(i + 1, len(uniq)):
                (a, sa), (b, sb) = uniq[i], uniq[j]
                if abs(a.x - b.x) >= 0.15:
                    left, right = (a, sa), (b, sb)
                    if a.x > b.x:
                        left, right = right, left
                    rels.append(f"{noun_phrase(left[1]).capitalize()} is to the left of {noun_phrase(right[1])}.")
                elif abs(a.y - b.y) >= 0.15:
                    up, down = (a, sa), (b, sb)
                    if a.y > b.y:
                        up, down = down, up
                    rels.append(f"{noun_phrase(up[1]).capitalize()} is above {noun_phrase(down[1])}.")
        if rels:
            k = min(len(rels), 2)
            idx = sorted(rng.choice(len(rels), size=k, replace=False).tolist())
            parts.extend(rels[i] for i in idx)
        for t in scene.texts:
            parts.append(f'The text "{t.text}" is written in {t.color} letters '
                         f"{location_phrase((t.x0 + t.x1) / 2, (t.y0 + t.y1) / 2)}.")
        return " ".join(parts)
