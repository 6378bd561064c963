"""Stage 1: scene descriptions, their natural-language captions, and the stage protocols.

A :class:`Scene` is the *language-first* description of one sample: a background, a list of
objects (shape, colour, size class, position, rotation) and a list of rendered text strings.
Coordinates are normalized to the unit square (x to the right, y downwards) so a description
does not depend on the image size it is later rendered at. Everything downstream (the image,
the QA pairs, the filters) is derived from this description.

The three pluggable stages are :class:`CaptionWriter`, :class:`ImageGenerator` and
:class:`QAWriter` (``typing.Protocol``). The built-in implementations are procedural
(:class:`TemplateCaptionWriter` here, ``sampler.ProceduralSceneSampler``, ``render.ProceduralRenderer``,
``qa.TemplateQAWriter``); an LLM captioner or a text-to-image model can replace any of them.
The vocabulary scenes are drawn from lives in ``palette``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .palette import Palette

KINDS = ("color", "count", "spatial", "existence", "text", "scene")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


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
