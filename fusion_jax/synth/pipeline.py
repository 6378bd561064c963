"""The language-first pipeline for one sample: description -> caption -> QA -> filter -> image.

Every sample is a pure function of ``(seed, split, index)``: its rng is
``np.random.default_rng(SeedSequence([seed, split_code, index]))`` and its kind is
``kinds[index % len(kinds)]`` within its split. That makes the dataset independent of how
the work is spread over processes.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import numpy as np

from .filters import FilterChain, FilterContext, ModelScoreFilter
from .palette import get_palette
from .qa import SHORT_SUFFIX, QAPair, TemplateQAWriter, qa_to_dict
from .render import ProceduralRenderer, png_bytes
from .sampler import ProceduralSceneSampler
from .scene import KINDS, CaptionWriter, ImageGenerator, QAWriter, TemplateCaptionWriter

SPLITS = {"train": 0, "eval": 1}
IMAGE_TOKEN = "<image>"
RUN_ONLY = "run_only"  # field metadata: changes how a set is made, never its bytes (so not in the cache key)
_CAST = {"int": int, "float": float}  # ConfigDict / CLI values: 0 for 0.0, numpy scalars


def _opt(default, help: str, run_only: bool = False):
    return dataclasses.field(default=default, metadata={"help": help, RUN_ONLY: run_only})


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Every synthesis option, spelled once: the CLI's flags and the cache key are derived from these
    fields. A train config passes ``SynthConfig(**config.data.synth)`` (missing keys: defaults)."""

    num: int = _opt(1000, "number of samples (train + held-out)")
    seed: int = _opt(0, "seed of the whole set")
    heldout_fraction: float = _opt(0.1, "share of the samples written as held-out questions")
    kinds: tuple = _opt(KINDS, f"comma list from {','.join(KINDS)} (empty: all)")
    image_size: int = _opt(384, "image side in pixels")
    difficulty: str = _opt("full", "easy: 6 colours, 3 large shapes, short answers (for tiny models / small "
                                   "images) | full")
    max_turns: int | None = _opt(None, "turns per training conversation (default: easy 2, full 4)")
    mc_fraction: float | None = _opt(None, "share of multiple-choice pairs (default: easy 0.15, full 0.25)")
    long_fraction: float | None = _opt(None, "share of sentence answers (default: easy 0, full 0.3)")
    describe_fraction: float = _opt(0.0, "probability that a training conversation ends with 'Which shapes are "
                                         "in the image?' (every object by colour and shape)")
    fonts: str = _opt("builtin", "builtin | system (adds the installed TrueType fonts)")
    max_attempts: int = _opt(40, "scene draws per sample before giving up")
    workers: int = _opt(1, "worker processes (the bytes do not depend on it)", run_only=True)
    progress: bool = _opt(False, "show a progress bar", run_only=True)

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds) or KINDS)
        for f in dataclasses.fields(self):
            cast, v = _CAST.get(f.type.split(" |")[0]), getattr(self, f.name)
            if cast is not None and v is not None:
                object.__setattr__(self, f.name, cast(v))

    def resolved(self) -> SynthConfig:
        """Validated, with the difficulty's defaults filled in."""
        easy = self.difficulty == "easy"
        get_palette(self.difficulty)
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown kinds {bad}; choose from {','.join(KINDS)}")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        for name in ("describe_fraction", "mc_fraction", "long_fraction"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if (self.mc_fraction or 0.0) + (self.long_fraction or 0.0) > 1.0:
            raise ValueError(f"mc_fraction + long_fraction must be <= 1, got {self.mc_fraction} + "
                             f"{self.long_fraction}")
        return dataclasses.replace(
            self,
            max_turns=self.max_turns if self.max_turns is not None else (2 if easy else 4),
            mc_fraction=self.mc_fraction if self.mc_fraction is not None else (0.15 if easy else 0.25),
            long_fraction=self.long_fraction if self.long_fraction is not None else (0.0 if easy else 0.3),
        )

    def cache_key(self) -> dict:
        """What the set's bytes depend on (the resolved fields but the run-only ones), as JSON stores it."""
        c = self.resolved()
        return json.loads(json.dumps({f.name: getattr(c, f.name) for f in dataclasses.fields(c)
                                      if not f.metadata[RUN_ONLY]}))


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
            varied=c.difficulty != "easy")
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
                extra = []  # the describe turn comes last, so no earlier answer can be copied from it
                if c.describe_fraction > 0 and rng.random() < c.describe_fraction:
                    extra = self._describe(scene, rng, ctx, rejections)
                if extra:
                    qas = qas[:max(1, c.max_turns - len(extra))] + extra
            return Sample(split, index, kind, scene, caption, image, qas, rejections, attempt)
        raise RuntimeError(f"no QA pair of kind {kind!r} survived the filters in {c.max_attempts} "
                           f"attempts (split={split}, index={index}, image_size={c.image_size})")

    def _describe(self, scene, rng, ctx, rejections) -> list:
        """The QA writer's optional `describe` turn, filtered ([] when absent)."""
        make = getattr(self.qa_writer, "describe", None)
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
