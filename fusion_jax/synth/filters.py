"""Stage 4: filters that keep only QA pairs whose answer is derivable and unambiguous.

A filter is any callable ``f(scene, qa, ctx) -> Optional[str]`` returning ``None`` to keep
the pair or a short rejection reason. :class:`FilterChain` applies them in order.

Built-in rule filters (the description is the ground truth, the image size decides what is
visible): :class:`DerivableFilter`, :class:`VisibilityFilter`, :class:`CountOverlapFilter`,
:class:`SpatialMarginFilter`, :class:`TextLegibilityFilter`.

Model-based hook: :class:`ModelScoreFilter` wraps any :class:`QAScorer`, e.g. a function that
loads a fusion_jax checkpoint and returns the probability (or a 0/1 correctness) the model
assigns to the answer given the image and question; pairs scoring below the threshold are
dropped. :func:`load_scorer` builds one from a ``"module:factory"`` string (CLI ``--scorer``).
"""
from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .qa import Ambiguous, QAPair, evaluate, referenced_objects
from .render import object_masks, visible_fractions
from .sampler import color_distance, contrast_ratio, text_overlaps_objects
from .scene import Scene, select


@dataclasses.dataclass
class FilterContext:
    image_size: int
    image: Any = None  # the rendered PIL image (for model-based filters)
    cache: dict = dataclasses.field(default_factory=dict)

    def _cached(self, name, scene, fn):
        key = (name, id(scene), len(scene.objects))
        hit = self.cache.get(key)
        if hit is None or hit[0] is not scene:
            hit = self.cache[key] = (scene, fn(scene))
        return hit[1]

    def visible(self, scene: Scene) -> np.ndarray:
        return self._cached("visible", scene, visible_fractions)

    def masks(self, scene: Scene) -> np.ndarray:
        return self._cached("masks", scene, object_masks)


class DerivableFilter:
    """The answer recomputed from the description equals the stated one (and is unique)."""

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        try:
            truth = evaluate(scene, qa.spec)
        except Ambiguous as e:
            return f"ambiguous: {e}"
        if truth != qa.answer_text:
            return f"not derivable: description says {truth!r}, answer is {qa.answer_text!r}"
        if qa.style == "mc":
            if not qa.choices or qa.choices.count(qa.answer_text) != 1:
                return "multiple choice: answer not exactly once among the options"
            if "ABCDEFGH"[qa.choices.index(qa.answer_text)] != qa.answer:
                return "multiple choice: wrong letter"
        return None


class VisibilityFilter:
    """Objects a question is about must be visible: large enough in pixels, contrasting with the
    background, and not mostly hidden by objects drawn on top of them."""

    def __init__(self, min_radius_px: float = 3.0, min_visible: float = 0.6,
                 min_bg_distance: float = 60.0):
        self.min_radius_px = min_radius_px
        self.min_visible = min_visible
        self.min_bg_distance = min_bg_distance

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        objs = referenced_objects(scene, qa.spec)
        if not objs:
            return None
        vis = ctx.visible(scene)
        index = {id(o): i for i, o in enumerate(scene.objects)}
        bg = scene.background
        for o in objs:
            if o.r * ctx.image_size < self.min_radius_px:
                return f"object {o.id} too small ({o.r * ctx.image_size:.1f} px)"
            if vis[index[id(o)]] < self.min_visible:
                return f"object {o.id} occluded ({vis[index[id(o)]]:.2f} visible)"
            if min(color_distance(o.rgb, bg.rgb), color_distance(o.rgb, bg.rgb2)) < self.min_bg_distance:
                return f"object {o.id} blends into the background"
        return None


class CountOverlapFilter:
    """No counting of heavily overlapping objects: every counted object must be separable from
    every other object (overlap below ``max_overlap`` of the smaller silhouette), and the count
    must not exceed ``max_count``."""

    def __init__(self, max_overlap: float = 0.1, max_count: int = 10):
        self.max_overlap = max_overlap
        self.max_count = max_count

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        if qa.spec["op"] not in ("count", "objects"):
            return None
        counted = select(scene, qa.spec["sel"]) if qa.spec["op"] == "count" else list(scene.objects)
        if len(counted) > self.max_count:
            return f"too many objects to count ({len(counted)})"
        if not counted:
            return None
        masks = ctx.masks(scene)
        index = {id(o): i for i, o in enumerate(scene.objects)}
        for o in counted:
            i = index[id(o)]
            for j in range(len(scene.objects)):
                if j == i:
                    continue
                inter = np.logical_and(masks[i], masks[j]).sum()
                if not inter:
                    continue
                smaller = min(masks[i].sum(), masks[j].sum())
                if smaller and inter / smaller > self.max_overlap:
                    return f"objects {o.id} and {scene.objects[j].id} overlap ({inter / smaller:.2f})"
        return None


class SpatialMarginFilter:
    """Left/right (above/below) only when the centres differ by at least ``margin`` (a fraction
    of the image side) along that axis and the two objects do not overlap."""

    def __init__(self, margin: float = 0.12):
        self.margin = margin

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        op = qa.spec["op"]
        if op not in ("lr", "ab", "rel_is"):
            return None
        try:
            a = select(scene, qa.spec["a"])[0]
            b = select(scene, qa.spec["b"])[0]
        except IndexError:
            return "missing referent"
        axis = qa.spec.get("axis") or ("x" if op == "lr" else "y")
        d = abs(a.x - b.x) if axis == "x" else abs(a.y - b.y)
        if d < self.margin:
            return f"relation too close to call ({d:.3f} < {self.margin})"
        if math.hypot(a.x - b.x, a.y - b.y) < (a.r + b.r):
            return "referents overlap"
        return None


class TextLegibilityFilter:
    """No reading of illegible text: glyphs at least ``min_height_px`` tall and
    ``min_char_px`` wide at the final image size, contrast ratio >= ``min_contrast`` against the
    background, fully inside the image and not covered by objects."""

    def __init__(self, min_height_px: float = 8.0, min_char_px: float = 4.5,
                 min_contrast: float = 3.0):
        self.min_height_px = min_height_px
        self.min_char_px = min_char_px
        self.min_contrast = min_contrast

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        if qa.spec["op"] not in ("read_text", "text_color"):
            return None
        for t in scene.texts:
            h = (t.y1 - t.y0) * ctx.image_size
            w = (t.x1 - t.x0) * ctx.image_size / max(1, len(t.text))
            if h < self.min_height_px:
                return f"text {t.text!r} too small ({h:.1f} px tall)"
            if w < self.min_char_px:
                return f"text {t.text!r} too narrow ({w:.1f} px per character)"
            bg = scene.background
            c = min(contrast_ratio(t.rgb, bg.rgb), contrast_ratio(t.rgb, bg.rgb2))
            if c < self.min_contrast:
                return f"text {t.text!r} low contrast ({c:.2f})"
            if t.x0 < 0 or t.y0 < 0 or t.x1 > 1 or t.y1 > 1:
                return f"text {t.text!r} cut off"
            if text_overlaps_objects(scene, t):
                return f"text {t.text!r} covered by an object"
        return None


@runtime_checkable
class QAScorer(Protocol):
    """Scores how well an answer is supported: ``score(image, question, answer) -> float``.

    A fusion_jax checkpoint plugs in here: load the model once in the factory, and return e.g.
    exp(mean log-likelihood) of ``answer`` after the templated ``question`` with the image."""

    def __call__(self, image: Any, question: str, answer: str) -> float: ...


class ModelScoreFilter:
    """Drops pairs that a model (a :class:`QAScorer`) scores below ``threshold``."""

    def __init__(self, scorer: Callable[[Any, str, str], float], threshold: float = 0.5):
        self.scorer = scorer
        self.threshold = threshold

    def __call__(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        if ctx.image is None:
            return None
        s = float(self.scorer(ctx.image, qa.question, qa.answer))
        if s < self.threshold:
            return f"model score {s:.3f} < {self.threshold}"
        return None


def load_scorer(spec: str, **kwargs) -> QAScorer:
    """``"package.module:factory"`` -> ``factory(**kwargs)`` (e.g. a checkpoint path kwarg)."""
    mod, _, name = spec.partition(":")
    if not name:
        raise ValueError("scorer must be given as 'module:factory'")
    return getattr(importlib.import_module(mod), name)(**kwargs)


def default_filters() -> list:
    return [DerivableFilter(), VisibilityFilter(), CountOverlapFilter(), SpatialMarginFilter(),
            TextLegibilityFilter()]


class FilterChain:
    def __init__(self, filters: Sequence | None = None):
        self.filters = list(default_filters() if filters is None else filters)

    def reject_reason(self, scene: Scene, qa: QAPair, ctx: FilterContext) -> str | None:
        for f in self.filters:
            r = f(scene, qa, ctx)
            if r is not None:
                return f"{type(f).__name__}: {r}"
        return None

    def apply(self, scene: Scene, qas: Sequence[QAPair], ctx: FilterContext):
        kept, rejected = [], []
        for qa in qas:
            r = self.reject_reason(scene, qa, ctx)
            if r is None:
                kept.append(qa)
            else:
                rejected.append((qa, r))
        return kept, rejected
