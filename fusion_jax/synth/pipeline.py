"""The language-first pipeline for one sample: description -> caption -> QA -> filter -> image.

Every sample is a pure function of ``(seed, split, index)``: its rng is
``np.random.default_rng(SeedSequence([seed, split_code, index]))`` and its kind is
``kinds[index % len(kinds)]`` within its split. That makes the dataset independent of how
the work is spread over processes.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from .filters import FilterChain, FilterContext, ModelScoreFilter
from .qa import SHORT_SUFFIX, SPATIAL_ORDERS, SPATIAL_REFS, SPATIAL_YESNO_FRACTION, QAPair, TemplateQAWriter, qa_to_dict
from .render import ProceduralRenderer, png_bytes
from .scene import (
    KINDS,
    CaptionWriter,
    ImageGenerator,
    ProceduralSceneSampler,
    QAWriter,
    TemplateCaptionWriter,
    get_palette,
)

SPLITS = {"train": 0, "eval": 1}
IMAGE_TOKEN = "<image>"


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    kinds: tuple = KINDS
    image_size: int = 384
    difficulty: str = "full"  # 'easy' (tiny models) or 'full'
    max_turns: int | None = None  # turns per training conversation (default: easy 2, full 4)
    mc_fraction: float | None = None  # default: easy 0.15, full 0.25
    long_fraction: float | None = None  # default: easy 0.0, full 0.3
    # probability that a training conversation ends with "Which shapes are in the image?"
    # (all objects by colour and shape; needs a QA writer with ``describe``)
    describe_fraction: float = 0.0
    # the describe turn also gives each object's location ('a red circle in the top left corner')
    describe_positions: bool = False
    # probability that a training conversation with objects also asks which half of the image
    # one object lies in (needs a QA writer with ``locate``), before any describe turn
    locate_fraction: float = 0.0
    # how spatial questions name objects: "shape" ('the circle'), "color" ('the red object') or
    # "mixed" (the object asked about by colour, the other by shape)
    spatial_refs: str = "shape"
    # where relation questions name the object asked about: "subject_first" | "subject_last"
    spatial_order: str = "subject_first"
    # share of relation questions asked in the yes / no form ('Is the circle to the left of the square?')
    spatial_yesno_fraction: float = SPATIAL_YESNO_FRACTION
    fonts: str = "builtin"
    max_attempts: int = 40

    def resolved(self) -> SynthConfig:
        easy = self.difficulty == "easy"
        get_palette(self.difficulty)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"unknown kinds {bad}; choose from {','.join(KINDS)}")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        for name in ("describe_fraction", "locate_fraction", "spatial_yesno_fraction", "mc_fraction",
                     "long_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if (self.mc_fraction or 0.0) + (self.long_fraction or 0.0) > 1.0:
            raise ValueError(f"mc_fraction + long_fraction must be <= 1, got {self.mc_fraction} + "
                             f"{self.long_fraction}")
        if self.describe_positions and not self.describe_fraction:
            raise ValueError("describe_positions changes the describe turn; it needs describe_fraction > 0")
        if self.spatial_refs not in SPATIAL_REFS:
            raise ValueError(f"spatial_refs must be one of {SPATIAL_REFS}, got {self.spatial_refs!r}")
        if self.spatial_order not in SPATIAL_ORDERS:
            raise ValueError(f"spatial_order must be one of {SPATIAL_ORDERS}, got {self.spatial_order!r}")
        return dataclasses.replace(
            self,
            kinds=tuple(self.kinds),
            max_turns=self.max_turns if self.max_turns is not None else (2 if easy else 4),
            mc_fraction=self.mc_fraction if self.mc_fraction is not None else (0.15 if easy else 0.25),
            long_fraction=self.long_fraction if self.long_fraction is not None else (0.0 if easy else 0.3),
        )


@dataclasses.dataclass
class Sample:
    split: str
    index: int
    kind: str
    scene: object
    caption: str
    image: object  # PIL image
    qas: list  # kept QA pairs, in conversation order (eval: exactly one)
    rejections: dict  # filter name -> count, over all attempts
    attempts: int


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed), SPLITS[split], int(index)]))


class SynthPipeline:
    """Holds the (pluggable) stages. Components must be picklable to use ``workers > 1``."""

    def __init__(self, config: SynthConfig = SynthConfig(), *, caption_writer: CaptionWriter | None = None,
                 image_generator: ImageGenerator | None = None, qa_writer: QAWriter | None = None,
                 filters: Sequence | None = None, scene_sampler=None, scorer=None,
                 scorer_threshold: float = 0.5):
        self.config = config.resolved()
        c = self.config
        self.palette = get_palette(c.difficulty)
        self.scene_sampler = scene_sampler or ProceduralSceneSampler(
            allow_overlap_prob=0.0 if c.difficulty == "easy" else 0.15, image_size=c.image_size)
        self.caption_writer = caption_writer or TemplateCaptionWriter()
        self.image_generator = image_generator or ProceduralRenderer(fonts=c.fonts)
        self.qa_writer = qa_writer or TemplateQAWriter(
            mc_fraction=c.mc_fraction, long_fraction=c.long_fraction,
            short_suffix="" if c.difficulty == "easy" else SHORT_SUFFIX,
            varied=c.difficulty != "easy", spatial_refs=c.spatial_refs,
            describe_positions=c.describe_positions, spatial_order=c.spatial_order,
            spatial_yesno_fraction=c.spatial_yesno_fraction)
        self.filters = FilterChain(filters)
        self.model_filter = ModelScoreFilter(scorer, scorer_threshold) if scorer is not None else None

    def kind_of(self, index: int) -> str:
        return self.config.kinds[index % len(self.config.kinds)]

    def make_sample(self, seed: int, split: str, index: int) -> Sample:
        c = self.config
        kind = self.kind_of(index)
        rng = sample_rng(seed, split, index)
        rejections: dict = {}
        for attempt in range(1, c.max_attempts + 1):
            scene = self.scene_sampler.sample(kind, rng, self.palette)
            caption = self.caption_writer.caption(scene, rng)
            cands = self.qa_writer.write(scene, caption, kind, rng, self.palette)
            ctx = FilterContext(image_size=c.image_size)
            kept = self._filter(scene, cands, ctx, rejections)
            if split == "eval":
                kept = [q for q in kept if q.style in ("short", "mc")]
            kept = _dedupe(kept)
            if not kept:
                continue
            image = self.image_generator.generate(scene, caption, c.image_size, rng)
            if self.model_filter is not None:
                ctx.image = image
                scored = []
                for q in kept:
                    r = self.model_filter(scene, q, ctx)
                    if r is None:
                        scored.append(q)
                    else:
                        rejections["ModelScoreFilter"] = rejections.get("ModelScoreFilter", 0) + 1
                kept = scored
                if not kept:
                    continue
            if split == "eval":
                qas = kept[:1]
            else:
                n = int(rng.integers(1, c.max_turns + 1))
                qas = kept[:n]
                extra = []  # optional turns after the kind's own; describe last, so no earlier
                for name, frac in (("locate", c.locate_fraction), ("describe", c.describe_fraction)):
                    if frac > 0 and rng.random() < frac:  # answer can be copied from it
                        extra += self._extra(scene, rng, ctx, rejections, name)
                if extra:
                    qas = qas[:max(1, c.max_turns - len(extra))] + extra
            return Sample(split, index, kind, scene, caption, image, qas, rejections, attempt)
        raise RuntimeError(f"no QA pair of kind {kind!r} survived the filters in {c.max_attempts} "
                           f"attempts (split={split}, index={index}, image_size={c.image_size})")

    def _extra(self, scene, rng, ctx, rejections, name) -> list:
        """The QA writer's optional `describe` / `locate` turn, filtered ([] when absent)."""
        make = getattr(self.qa_writer, name, None)
        qa = make(scene, rng) if make is not None else None
        return [] if qa is None else self._filter(scene, [qa], ctx, rejections)

    def _filter(self, scene, cands, ctx, rejections) -> list:
        """The candidates the filters keep; rejections counted by reason."""
        kept, rejected = self.filters.apply(scene, cands, ctx)
        for _, reason in rejected:
            name = reason.split(":", 1)[0]
            rejections[name] = rejections.get(name, 0) + 1
        return kept


def _dedupe(qas: list) -> list:
    seen, out = set(), []
    for q in qas:
        key = q.question.split("\n", 1)[0]
        if key in seen:
            continue
        seen.add(key)
        out.append(q)
    return out


def image_relpath(split: str, index: int) -> str:
    return f"images/{split}/{index:07d}.png"


def sample_id(sample: Sample) -> str:
    return f"synth_{sample.split}_{sample.index:07d}_{sample.kind}"


def conversation(qas: Sequence[QAPair]) -> list:
    conv = []
    for i, q in enumerate(qas):
        text = f"{IMAGE_TOKEN}\n{q.question}" if i == 0 else q.question
        conv.append({"from": "human", "value": text})
        conv.append({"from": "gpt", "value": q.answer})
    return conv


def encode_sample(pipeline: SynthPipeline, seed: int, split: str, index: int) -> dict:
    """Everything the writer needs for one sample, as plain (picklable) data."""
    s = pipeline.make_sample(seed, split, index)
    return {
        "split": split, "index": index, "kind": s.kind, "id": sample_id(s),
        "image": image_relpath(split, index), "png": png_bytes(s.image),
        "scene": s.scene.to_dict(), "caption": s.caption,
        "qas": [qa_to_dict(q) for q in s.qas], "rejections": s.rejections, "attempts": s.attempts,
    }
