"""Synthesized language-driven QA data (FUSION's SLAD), fully offline.

Language first: a structured description (``scene``) and its caption are written, the image is
generated from the description (``render``), QA pairs are derived from the description (``qa``),
pairs that are not derivable or are ambiguous are filtered out (``filters``), and the set is
written as FUSION-format training JSON + YAML mixture and held-out questions in LLaVA's
model_vqa format with answers kept apart (``writers``).

    from fusion_jax.synth import SynthConfig, generate_dataset
    summary = generate_dataset("/tmp/synth", SynthConfig(num=2000, seed=0, image_size=48, difficulty="easy"))

CLI: ``python -m fusion_jax.synth --out DIR --num N --seed S [--kinds ...] [--image-size 384]
[--workers K] [--difficulty easy|full]``, one flag per :class:`SynthConfig` field.
"""
from .engine import generate_dataset, split_sizes
from .filters import (
                      CountOverlapFilter,
                      DerivableFilter,
                      FilterChain,
                      FilterContext,
                      ModelScoreFilter,
                      QAScorer,
                      SpatialMarginFilter,
                      TextLegibilityFilter,
                      VisibilityFilter,
                      default_filters,
                      load_scorer,
)
from .palette import get_palette
from .pipeline import SynthConfig, SynthPipeline
from .qa import Ambiguous, QAPair, TemplateQAWriter, evaluate
from .render import ProceduralRenderer
from .sampler import ProceduralSceneSampler
from .scene import (
                      KINDS,
                      Background,
                      CaptionWriter,
                      ImageGenerator,
                      QAWriter,
                      Scene,
                      SceneObject,
                      TemplateCaptionWriter,
                      TextItem,
)
from .writers import load_answers

__all__ = [
    "generate_dataset", "split_sizes", "SynthConfig", "SynthPipeline", "KINDS",
    "Scene", "SceneObject", "TextItem", "Background", "get_palette",
    "CaptionWriter", "ImageGenerator", "QAWriter", "QAScorer",
    "ProceduralSceneSampler", "TemplateCaptionWriter", "ProceduralRenderer", "TemplateQAWriter",
    "QAPair", "evaluate", "Ambiguous",
    "FilterChain", "FilterContext", "DerivableFilter", "VisibilityFilter", "CountOverlapFilter",
    "SpatialMarginFilter", "TextLegibilityFilter", "ModelScoreFilter", "default_filters", "load_scorer",
    "load_answers",
]
