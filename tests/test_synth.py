"""Tests for the synthesized-data engine (fusion_jax.synth)."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from fusion_jax.synth import (
    KINDS,
    Background,
    CaptionWriter,
    CountOverlapFilter,
    DerivableFilter,
    FilterChain,
    FilterContext,
    ImageGenerator,
    ModelScoreFilter,
    QAPair,
    QAWriter,
    Scene,
    SceneObject,
    SpatialMarginFilter,
    SynthConfig,
    SynthPipeline,
    TextItem,
    TextLegibilityFilter,
    VisibilityFilter,
    evaluate,
    generate_dataset,
    load_answers,
)
from fusion_jax.synth.qa import LETTERS, MC_SUFFIX, TemplateQAWriter
from fusion_jax.synth.scene import EASY, FULL, TemplateCaptionWriter

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def full_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth_full"))
    summary = generate_dataset(out, 48, seed=7, image_size=64, heldout_fraction=0.25)
    return out, summary


@pytest.fixture(scope="module")
def easy_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth_easy"))
    summary = generate_dataset(out, 36, seed=3, image_size=32, difficulty="easy", heldout_fraction=0.34)
    return out, summary


# ----------------------------------------------------------------------------------------------
# determinism

def test_byte_identical_across_runs_and_workers(tmp_path):
    kw = dict(num=14, seed=11, image_size=48, heldout_fraction=0.2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_dataset(a, **kw)
    generate_dataset(b, **kw)
    generate_dataset(c, workers=2, **kw)
    da, db, dc = tree_digest(a), tree_digest(b), tree_digest(c)
    assert da == db
    assert da == dc
    assert any(k.endswith(".png") for k in da)
    # the spawn start method (used when JAX is loaded in the parent) gives the same bytes
    from fusion_jax.synth import engine
    e = str(tmp_path / "e")
    orig = engine._start_method
    engine._start_method = lambda: "spawn"
    try:
        generate_dataset(e, workers=2, **kw)
    finally:
        engine._start_method = orig
    assert tree_digest(e) == da
    # a different seed gives a different set
    d = str(tmp_path / "d")
    generate_dataset(d, **{**kw, "seed": 12})
    assert tree_digest(d) != da


def test_cache_and_argument_mismatch(tmp_path):
    out = str(tmp_path / "s")
    s1 = generate_dataset(out, 6, seed=0, image_size=32, difficulty="easy")
    assert s1["cached"] is False
    s2 = generate_dataset(out, 6, seed=0, image_size=32, difficulty="easy")
    assert s2["cached"] is True and s2["train"] == s1["train"]
    with pytest.raises(ValueError):
        generate_dataset(out, 6, seed=1, image_size=32, difficulty="easy")
    s3 = generate_dataset(out, 6, seed=1, image_size=32, difficulty="easy", overwrite=True)
    assert s3["cached"] is False and s3["args"]["seed"] == 1
    assert "spatial_refs" not in s3["args"]  # the default leaves older cached sets valid
    assert "spatial_order" not in s3["args"] and "spatial_yesno_fraction" not in s3["args"]
    with pytest.raises(ValueError, match="overwrite"):
        generate_dataset(out, 6, seed=1, image_size=32, difficulty="easy", spatial_refs="color")


# ----------------------------------------------------------------------------------------------
# record validity

def _check_set(out, summary, kinds):
    with open(os.path.join(out, "mixture.yaml")) as f:
        mix = yaml.safe_load(f)
    paths = [d["json_path"] for d in mix["datasets"]]
    assert all(d["sampling_strategy"] == "all" for d in mix["datasets"])
    assert sorted(paths) == sorted(f"train/synth_{k}.json" for k in kinds)
    ids = set()
    for p in paths:
        kind = p[len("train/synth_"):-len(".json")]
        with open(os.path.join(out, p)) as f:  # relative to the YAML's folder
            recs = json.load(f)
        assert len(recs) == summary["train"]["per_kind"][kind] > 0
        for r in recs:
            assert set(r) == {"id", "image", "conversations"}
            assert r["id"] not in ids
            ids.add(r["id"])
            assert os.path.isfile(os.path.join(out, r["image"]))
            conv = r["conversations"]
            assert len(conv) >= 2 and len(conv) % 2 == 0
            for i, t in enumerate(conv):
                assert t["from"] == ("human" if i % 2 == 0 else "gpt")
                assert isinstance(t["value"], str) and t["value"].strip()
            assert conv[0]["value"].startswith("<image>\n")
            assert sum(t["value"].count("<image>") for t in conv) == 1
    qs = read_jsonl(os.path.join(out, "eval/questions.jsonl"))
    ans = load_answers(os.path.join(out, "eval/answers.jsonl"))
    assert len(qs) == len(ans) == summary["eval"]["questions"]
    assert {q["category"] for q in qs} == set(kinds)
    for q in qs:
        assert set(q) == {"question_id", "image", "text", "category"}  # no answer leaks
        assert os.path.isfile(os.path.join(out, q["image"]))
        assert q["image"].startswith("images/eval/")
        a = ans[q["question_id"]]
        assert a["category"] == q["category"]
        assert 0 < a["chance"] <= 0.5
        if a["style"] == "mc":
            assert q["text"].endswith(MC_SUFFIX)
            letter_lines = [ln for ln in q["text"].split("\n") if ln[:3] in {f"{c}. " for c in LETTERS}]
            assert [ln[3:] for ln in letter_lines] == a["choices"]
            assert a["choices"][LETTERS.index(a["answer"])] == a["answer_text"]
        else:
            assert a["answer"] == a["answer_text"]
    assert not any(r.startswith("images/eval/") for r in ids)


def test_full_set_records_valid(full_set):
    out, summary = full_set
    _check_set(out, summary, KINDS)
    assert set(summary["styles"]) == {"short", "long", "mc"}
    # multi-turn conversations exist
    recs = json.load(open(os.path.join(out, "train/synth_color.json")))
    assert any(len(r["conversations"]) > 2 for r in recs)


def test_easy_set_small_images(easy_set):
    out, summary = easy_set
    _check_set(out, summary, KINDS)
    from PIL import Image
    img = Image.open(os.path.join(out, "images/train/0000000.png"))
    assert img.size == (32, 32) and img.mode == "RGB"
    assert "long" not in summary["styles"]
    # short answers are single words
    for k in KINDS:
        for r in json.load(open(os.path.join(out, f"train/synth_{k}.json"))):
            for t in r["conversations"][1::2]:
                assert len(t["value"].split()) == 1, t


def test_answers_derivable_from_description(full_set, easy_set):
    for out, _ in (full_set, easy_set):
        for split in ("train", "eval"):
            for m in read_jsonl(os.path.join(out, f"meta/{split}_scenes.jsonl")):
                scene = Scene.from_dict(m["scene"])
                assert m["qas"]
                for qa in m["qas"]:
                    assert evaluate(scene, qa["spec"]) == qa["answer_text"]
                    if qa["style"] == "mc":
                        assert qa["choices"].count(qa["answer_text"]) == 1
                        assert LETTERS[qa["choices"].index(qa["answer_text"])] == qa["answer"]


def test_caption_mentions_objects_and_text():
    rng = np.random.default_rng(0)
    from fusion_jax.synth.scene import ProceduralSceneSampler
    s = ProceduralSceneSampler()
    for kind in KINDS:
        scene = s.sample(kind, rng, FULL)
        cap = TemplateCaptionWriter().caption(scene, rng)
        assert scene.background.name in cap
        for o in scene.objects:
            assert o.color in cap and o.shape in cap
        for t in scene.texts:
            assert f'"{t.text}"' in cap


# ----------------------------------------------------------------------------------------------
# filters, on hand-built ambiguous cases

def _bg():
    return Background(name="white", style="solid", rgb=(250, 250, 250), rgb2=(250, 250, 250))


def _obj(i, shape, color, x, y, r=0.1, rgb=None):
    from fusion_jax.synth.scene import COLORS_FULL
    return SceneObject(id=f"o{i}", shape=shape, color=color, size="medium", x=x, y=y, r=r,
                       rgb=rgb or COLORS_FULL[color])


def _qa(spec, answer, style="short", choices=None, letter=None):
    return QAPair(kind="x", qtype=spec["op"], question="q", answer=letter or answer, answer_text=answer,
                  style=style, spec=spec, choices=choices)


def test_count_rejects_heavily_overlapping_objects():
    ctx = FilterContext(image_size=64)
    overlapping = Scene(_bg(), [_obj(0, "circle", "red", 0.5, 0.5), _obj(1, "circle", "red", 0.53, 0.5)], [])
    qa = _qa({"op": "count", "sel": {"shape": "circle"}}, "2")
    assert CountOverlapFilter()(overlapping, qa, ctx) is not None
    assert FilterChain().reject_reason(overlapping, qa, ctx) is not None
    apart = Scene(_bg(), [_obj(0, "circle", "red", 0.25, 0.5), _obj(1, "circle", "red", 0.75, 0.5)], [])
    assert FilterChain().reject_reason(apart, qa, FilterContext(image_size=64)) is None


def test_text_rejects_illegible_text():
    def scene_with(h, rgb=(20, 20, 20), color="black", w=0.6):
        t = TextItem(id="t0", text="CAT", color=color, x0=0.1, y0=0.1, x1=0.1 + w, y1=0.1 + h, rgb=rgb)
        return Scene(_bg(), [], [t])
    qa = _qa({"op": "read_text"}, "CAT")
    f = TextLegibilityFilter()
    assert f(scene_with(0.15), qa, FilterContext(image_size=32)) is not None  # 4.8 px tall
    assert f(scene_with(0.15), qa, FilterContext(image_size=384)) is None
    assert f(scene_with(0.3, w=0.2), qa, FilterContext(image_size=32)) is not None  # too narrow
    assert f(scene_with(0.3, rgb=(240, 215, 30), color="yellow"), qa,
             FilterContext(image_size=384)) is not None  # yellow on white: low contrast
    covered = scene_with(0.3)
    covered.objects.append(_obj(0, "square", "red", 0.3, 0.25, r=0.15))
    assert f(covered, qa, FilterContext(image_size=384)) is not None
    two = scene_with(0.3)
    two.texts.append(TextItem(id="t1", text="DOG", color="black", x0=0.1, y0=0.6, x1=0.7, y1=0.9,
                              rgb=(20, 20, 20)))
    assert DerivableFilter()(two, qa, FilterContext(image_size=384)) is not None  # which text?


def test_ambiguous_reference_and_wrong_answers():
    ctx = FilterContext(image_size=128)
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.25, 0.5), _obj(1, "circle", "blue", 0.75, 0.5),
                          _obj(2, "square", "green", 0.5, 0.2)], [])
    d = DerivableFilter()
    assert d(scene, _qa({"op": "color_of", "sel": {"shape": "circle"}}, "red"), ctx) is not None
    assert d(scene, _qa({"op": "color_of", "sel": {"shape": "square"}}, "green"), ctx) is None
    assert d(scene, _qa({"op": "color_of", "sel": {"shape": "square"}}, "red"), ctx) is not None
    assert d(scene, _qa({"op": "count", "sel": {"shape": "circle"}}, "2"), ctx) is None
    assert d(scene, _qa({"op": "exists", "sel": {"shape": "star", "color": "red"}}, "no"), ctx) is None
    assert d(scene, _qa({"op": "exists", "sel": {"shape": "circle", "color": "red"}}, "no"), ctx) is not None
    mc = {"op": "color_of", "sel": {"shape": "square"}}
    assert d(scene, _qa(mc, "green", "mc", ["red", "green", "blue"], "B"), ctx) is None
    assert d(scene, _qa(mc, "green", "mc", ["red", "green", "blue"], "A"), ctx) is not None
    assert d(scene, _qa(mc, "green", "mc", ["green", "green", "blue"], "A"), ctx) is not None


def test_spatial_and_visibility_rejections():
    ctx = FilterContext(image_size=128)
    close = Scene(_bg(), [_obj(0, "circle", "red", 0.45, 0.2), _obj(1, "square", "blue", 0.5, 0.8)], [])
    lr = {"op": "lr", "a": {"shape": "circle"}, "b": {"shape": "square"}}
    assert evaluate(close, lr) == "left"
    assert SpatialMarginFilter()(close, _qa(lr, "left"), ctx) is not None
    ab = {"op": "ab", "a": {"shape": "circle"}, "b": {"shape": "square"}}
    assert SpatialMarginFilter()(close, _qa(ab, "above"), ctx) is None
    assert FilterChain().reject_reason(close, _qa(ab, "above"), ctx) is None
    # hidden under a later, larger object
    hidden = Scene(_bg(), [_obj(0, "circle", "red", 0.5, 0.5, r=0.05), _obj(1, "square", "blue", 0.5, 0.5, r=0.2)], [])
    q = _qa({"op": "color_of", "sel": {"shape": "circle"}}, "red")
    assert VisibilityFilter()(hidden, q, ctx) is not None
    # too small at this resolution, fine at a larger one
    tiny = Scene(_bg(), [_obj(0, "circle", "red", 0.5, 0.5, r=0.04)], [])
    assert VisibilityFilter()(tiny, q, FilterContext(image_size=32)) is not None
    assert VisibilityFilter()(tiny, q, FilterContext(image_size=384)) is None
    # white object on a white background
    ghost = Scene(_bg(), [_obj(0, "circle", "white", 0.5, 0.5)], [])
    assert VisibilityFilter()(ghost, _qa({"op": "color_of", "sel": {"shape": "circle"}}, "white"), ctx) is not None


def test_spatial_refs_by_colour():
    """`color` names an object by its colour when that colour is unique, else by shape; the
    answer stays derivable from the description. The built-in pipeline keeps shape references."""
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.5), _obj(1, "square", "blue", 0.8, 0.5),
                          _obj(2, "triangle", "blue", 0.5, 0.1)], [])
    rng = np.random.default_rng(0)
    qas = TemplateQAWriter(spatial_refs="color", mc_fraction=0, long_fraction=0).write(
        scene, "", "spatial", rng, EASY)
    refs = [q.spec[k] for q in qas for k in ("a", "b")]
    assert {"color": "red"} in refs and {"shape": "square"} in refs
    assert all(r != {"color": "blue"} for r in refs)
    assert any("the red object" in q.question for q in qas)
    assert all(evaluate(scene, q.spec) == q.answer_text for q in qas)
    shape_qas = TemplateQAWriter(mc_fraction=0, long_fraction=0).write(scene, "", "spatial",
                                                                        np.random.default_rng(0), EASY)
    assert all("shape" in q.spec[k] for q in shape_qas for k in ("a", "b"))
    for d in ("easy", "full"):
        pipe = SynthPipeline(SynthConfig(kinds=("spatial",), image_size=64, difficulty=d))
        assert pipe.qa_writer.spatial_refs == "shape"
    # the pipeline option (config.data.synth_spatial_refs, CLI --spatial-refs): easy spatial scenes
    # keep colours unique, so every question names both objects by colour
    pipe = SynthPipeline(SynthConfig(kinds=("spatial",), image_size=64, difficulty="easy", spatial_refs="color"))
    for i in range(8):
        for q in pipe.make_sample(3, "train", i).qas:
            assert set(q.spec["a"]) == set(q.spec["b"]) == {"color"}, q.question
    with pytest.raises(ValueError, match="spatial_refs"):
        TemplateQAWriter(spatial_refs="size")


def test_spatial_refs_mixed():
    """`mixed` names the object asked about by its (unique) colour and the other by shape, so the
    two referents differ in kind; answers stay derivable, and a non-unique colour falls back to shape."""
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.5), _obj(1, "square", "blue", 0.8, 0.5),
                          _obj(2, "triangle", "blue", 0.5, 0.1)], [])
    qas = TemplateQAWriter(spatial_refs="mixed", mc_fraction=0, long_fraction=0).write(
        scene, "", "spatial", np.random.default_rng(0), EASY)
    assert len(qas) == 6 and all(evaluate(scene, q.spec) == q.answer_text for q in qas)
    assert all("color" not in q.spec["b"] or "shape" in q.spec["b"] for q in qas)  # never by colour alone
    subj = [q.spec["a"] for q in qas]
    assert {"color": "red"} in subj and all(s != {"color": "blue"} for s in subj)
    assert any(q.question.startswith("Is the red object") and "circle" not in q.question for q in qas)
    pipe = SynthPipeline(SynthConfig(kinds=("spatial",), image_size=64, difficulty="easy", spatial_refs="mixed"))
    for i in range(8):
        for q in pipe.make_sample(3, "train", i).qas:
            assert set(q.spec["a"]) == {"color"} and "shape" in q.spec["b"], q.question
    with pytest.raises(ValueError, match="mixed"):
        SynthConfig(spatial_refs="both").resolved()



def test_spatial_order_subject_last():
    """`subject_last` names the reference object first and the object asked about last; the specs,
    answers and vocabularies are those of `subject_first` with the same draws."""
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.3), _obj(1, "square", "blue", 0.8, 0.7)], [])
    kw = dict(mc_fraction=0, long_fraction=0)
    first = TemplateQAWriter(**kw).write(scene, "", "spatial", np.random.default_rng(3), EASY)
    last = TemplateQAWriter(spatial_order="subject_last", **kw).write(scene, "", "spatial",
                                                                       np.random.default_rng(3), EASY)
    assert [q.spec for q in first] == [q.spec for q in last] and len(last) == 2
    assert [q.answer for q in first] == [q.answer for q in last]
    for q in last:
        assert evaluate(scene, q.spec) == q.answer
        na, nb = q.spec["a"]["shape"], q.spec["b"]["shape"]
        assert q.question.index(nb) < q.question.index(na), q.question  # asked-about object last
        assert q.question.startswith(("Relative to the", "Compared with the")), q.question
    pipe = SynthPipeline(SynthConfig(kinds=("spatial",), image_size=64, difficulty="easy",
                                     spatial_order="subject_last"))
    assert pipe.qa_writer.spatial_order == "subject_last"
    assert SynthPipeline(SynthConfig(kinds=("spatial",), image_size=64)).qa_writer.spatial_order == "subject_first"
    with pytest.raises(ValueError, match="spatial_order"):
        TemplateQAWriter(spatial_order="random")
    with pytest.raises(ValueError, match="spatial_order"):
        SynthConfig(spatial_order="last").resolved()


def test_spatial_yesno_fraction():
    """The share of yes / no relation questions: 0 leaves only 'left or right' / 'above or below'
    questions, 1 only yes / no ones; the default (0.3) keeps older cached sets valid."""
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.3), _obj(1, "square", "blue", 0.8, 0.7)], [])
    ops = {}
    for frac in (0.0, 1.0):
        w = TemplateQAWriter(mc_fraction=0, long_fraction=0, spatial_yesno_fraction=frac)
        qs = [q for seed in range(20) for q in w.write(scene, "", "spatial", np.random.default_rng(seed), EASY)]
        assert all(evaluate(scene, q.spec) == q.answer for q in qs)
        ops[frac] = {q.spec["op"] for q in qs}
    assert ops[0.0] == {"lr"} and ops[1.0] == {"rel_is"}  # the pair lies further apart in x
    cfg = SynthConfig(kinds=("spatial",), image_size=64, difficulty="easy", spatial_yesno_fraction=0.0)
    assert SynthPipeline(cfg).qa_writer.spatial_yesno_fraction == 0.0
    with pytest.raises(ValueError, match="spatial_yesno_fraction"):
        SynthConfig(spatial_yesno_fraction=1.5).resolved()
    with pytest.raises(ValueError, match="mc_fraction"):
        SynthConfig(mc_fraction=-0.5).resolved()
    with pytest.raises(ValueError, match="mc_fraction \\+ long_fraction"):
        SynthConfig(mc_fraction=0.6, long_fraction=0.6).resolved()
    with pytest.raises(ValueError, match="spatial_yesno_fraction"):
        TemplateQAWriter(spatial_yesno_fraction=-0.1)


def test_model_score_filter_hook():
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.5, 0.5)], [])
    qa = _qa({"op": "color_of", "sel": {"shape": "circle"}}, "red")
    seen = []

    def scorer(image, question, answer):
        seen.append((image, question, answer))
        return 0.9 if answer == "red" else 0.1
    f = ModelScoreFilter(scorer, threshold=0.5)
    assert f(scene, qa, FilterContext(image_size=32, image="IMG")) is None
    assert f(scene, _qa(qa.spec, "blue"), FilterContext(image_size=32, image="IMG")) is not None
    assert seen[0] == ("IMG", "q", "red")
    # inside the pipeline, a scorer that rejects everything but one colour
    pipe = SynthPipeline(SynthConfig(kinds=("existence",), image_size=32, difficulty="easy"),
                         scorer=lambda im, q, a: 1.0 if a == "yes" else 0.0)
    s = pipe.make_sample(0, "train", 0)
    assert all(q.answer == "yes" for q in s.qas)


# ----------------------------------------------------------------------------------------------
# pluggable stages

def test_pluggable_stages():
    from PIL import Image

    class Captioner:
        def caption(self, scene, rng):
            return "a picture"

    class FlatImages:
        def generate(self, scene, caption, size, rng):
            return Image.new("RGB", (size, size), tuple(scene.background.rgb))

    assert isinstance(Captioner(), CaptionWriter)
    assert isinstance(FlatImages(), ImageGenerator)
    assert isinstance(TemplateQAWriter(), QAWriter)
    pipe = SynthPipeline(SynthConfig(kinds=("scene",), image_size=32), caption_writer=Captioner(),
                         image_generator=FlatImages())
    s = pipe.make_sample(0, "train", 3)
    assert s.caption == "a picture"
    assert s.image.getextrema() == tuple((c, c) for c in s.scene.background.rgb)


def test_existence_balanced_and_mc_letters():
    pipe = SynthPipeline(SynthConfig(kinds=("existence", "color"), image_size=64, difficulty="easy",
                                     mc_fraction=0.5))
    answers = [pipe.make_sample(1, "eval", i).qas[0] for i in range(0, 40, 2)]
    yes = sum(q.answer == "yes" for q in answers)
    assert 4 <= yes <= 16
    mcs = [pipe.make_sample(1, "eval", i).qas[0] for i in range(1, 40, 2)]
    mcs = [q for q in mcs if q.style == "mc"]
    assert mcs
    for q in mcs:
        assert q.choices[LETTERS.index(q.answer)] == q.answer_text
        assert f"{q.answer}. {q.answer_text}" in q.question


def test_existence_turn_answers_independent():
    """Turn 2's yes/no must not follow from turn 1's (a strict alternation is a text-only shortcut)."""
    pipe = SynthPipeline(SynthConfig(kinds=("existence",), image_size=32, difficulty="easy", max_turns=2,
                                     mc_fraction=0.0))
    pairs = []
    for i in range(80):
        qas = pipe.make_sample(3, "train", i).qas
        if len(qas) >= 2:
            pairs.append((qas[0].answer, qas[1].answer))
    same = sum(a == b for a, b in pairs)
    assert len(pairs) > 20 and 0.2 < same / len(pairs) < 0.8, (same, len(pairs))


def test_describe_turn_lists_every_object_last_and_train_only():
    from fusion_jax.synth.qa import list_objects
    scene = Scene(_bg(), [_obj(0, "triangle", "red", 0.2, 0.2), _obj(1, "circle", "blue", 0.5, 0.5),
                          _obj(2, "triangle", "red", 0.8, 0.8)], [])
    assert list_objects(scene) == "a blue circle and two red triangles"
    assert evaluate(scene, {"op": "objects"}) == "a blue circle and two red triangles"
    crowded = Scene(_bg(), [_obj(0, "circle", "red", 0.5, 0.5), _obj(1, "circle", "red", 0.52, 0.5)], [])
    qa = TemplateQAWriter().describe(crowded, np.random.default_rng(0))
    assert CountOverlapFilter()(crowded, qa, FilterContext(image_size=64)) is not None

    cfg = dict(kinds=("color", "count"), image_size=32, difficulty="easy", max_turns=2)
    off, on = SynthPipeline(SynthConfig(**cfg)), SynthPipeline(SynthConfig(**cfg, describe_fraction=1.0))
    for i in range(6):
        a, b = off.make_sample(5, "train", i), on.make_sample(5, "train", i)
        assert a.scene.to_dict() == b.scene.to_dict()
        assert [q.spec["op"] for q in b.qas] == [a.qas[0].spec["op"], "objects"]
        last = b.qas[-1]
        assert last.style == "long" and evaluate(b.scene, last.spec) == last.answer_text
        for o in b.scene.objects:
            assert f"{o.color} {o.shape}" in last.answer
        assert on.make_sample(5, "eval", i).qas == off.make_sample(5, "eval", i).qas


def test_describe_turn_with_positions_names_every_objects_location():
    from fusion_jax.synth.qa import list_objects
    scene = Scene(_bg(), [_obj(0, "triangle", "red", 0.8, 0.8), _obj(1, "circle", "blue", 0.5, 0.5),
                          _obj(2, "triangle", "red", 0.2, 0.2)], [])
    want = ("a blue circle in the center, a red triangle in the top left corner and "
            "a red triangle in the bottom right corner")  # equal objects left to right
    assert list_objects(scene, positions=True) == want
    assert evaluate(scene, {"op": "objects", "positions": True}) == want
    qa = TemplateQAWriter(describe_positions=True).describe(scene, np.random.default_rng(0))
    assert qa.spec == {"op": "objects", "positions": True} and qa.answer == want[0].upper() + want[1:] + "."

    cfg = dict(kinds=("color", "spatial"), image_size=32, difficulty="easy", max_turns=2,
               describe_fraction=1.0)
    off, on = SynthPipeline(SynthConfig(**cfg)), SynthPipeline(SynthConfig(**cfg, describe_positions=True))
    assert on.qa_writer.describe_positions and not off.qa_writer.describe_positions
    for i in range(6):
        a, b = off.make_sample(5, "train", i), on.make_sample(5, "train", i)
        assert a.scene.to_dict() == b.scene.to_dict() and a.qas[:-1] == b.qas[:-1]
        last = b.qas[-1]
        assert last.spec["positions"] and evaluate(b.scene, last.spec) == last.answer_text
        assert last.answer_text.count(" a ") + 1 == len(b.scene.objects)  # one phrase per object


def test_describe_positions_in_the_cache_key(tmp_path):
    out = str(tmp_path / "s")
    s1 = generate_dataset(out, 6, seed=0, image_size=32, difficulty="easy", describe_fraction=1.0)
    assert "describe_positions" not in s1["args"]
    with pytest.raises(ValueError, match="overwrite"):
        generate_dataset(out, 6, seed=0, image_size=32, difficulty="easy", describe_fraction=1.0,
                         describe_positions=True)
    s2 = generate_dataset(out, 6, seed=0, image_size=32, difficulty="easy", describe_fraction=1.0,
                          describe_positions=True, overwrite=True)
    assert s2["args"]["describe_positions"] is True


def test_locate_turn_asks_one_objects_half_of_the_image():
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.7), _obj(1, "square", "blue", 0.55, 0.3)], [])
    assert evaluate(scene, {"op": "side", "sel": {"shape": "circle"}, "axis": "x"}) == "left"
    assert evaluate(scene, {"op": "side", "sel": {"shape": "circle"}, "axis": "y"}) == "bottom"
    assert evaluate(scene, {"op": "side", "sel": {"shape": "square"}, "axis": "y"}) == "top"
    margin, ctx = SpatialMarginFilter(), FilterContext(image_size=64)
    seen = set()
    for seed in range(40):
        qa = TemplateQAWriter().locate(scene, np.random.default_rng(seed))
        assert qa.kind == "spatial" and qa.spec["op"] == "side" and qa.style == "short"
        assert evaluate(scene, qa.spec) == qa.answer == qa.answer_text
        assert margin(scene, qa, ctx) is None
        seen.add((qa.spec["sel"]["shape"], qa.spec["axis"]))
    assert seen == {("circle", "x"), ("circle", "y"), ("square", "y")}  # the square's x = 0.55 is too central
    near = QAPair("spatial", "side", "q", "right", "right", "short",
                  {"op": "side", "sel": {"shape": "square"}, "axis": "x"})
    assert "centre line" in margin(scene, near, ctx)
    assert TemplateQAWriter().locate(Scene(_bg(), [], []), np.random.default_rng(0)) is None

    cfg = dict(kinds=("color", "count", "spatial"), image_size=32, difficulty="easy", max_turns=2,
               describe_fraction=0.5)
    off, on = SynthPipeline(SynthConfig(**cfg)), SynthPipeline(SynthConfig(**cfg, locate_fraction=1.0))
    located = 0
    for i in range(12):
        a, b = off.make_sample(5, "train", i), on.make_sample(5, "train", i)
        assert a.scene.to_dict() == b.scene.to_dict() and b.qas[0] == a.qas[0]
        ops = [q.spec["op"] for q in b.qas]
        # second, before any describe turn; absent when no object is nameable and off the centre line
        if "side" in ops:
            located += 1
            assert ops.index("side") == 1 and ops[2:] in ([], ["objects"]), ops
        assert on.make_sample(5, "eval", i).qas == off.make_sample(5, "eval", i).qas
    assert located >= 9, located
    for bad in (dict(locate_fraction=1.5), dict(describe_fraction=-0.1), dict(spatial_refs="size"),
                dict(describe_fraction=0.0, describe_positions=True)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SynthPipeline(SynthConfig(**cfg | bad))


# ----------------------------------------------------------------------------------------------
# CLI

def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_cli_runs(tmp_path):
    out = str(tmp_path / "cli")
    cmd = [sys.executable, "-m", "fusion_jax.synth", "--out", out, "--num", "10", "--seed", "5",
           "--kinds", "color,count,text", "--image-size", "32", "--difficulty", "easy"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["train"]["samples"] + summary["eval"]["questions"] == 10
    assert set(summary["train"]["per_kind"]) == {"color", "count", "text"}
    assert "synth" in r.stderr  # progress bar
    r2 = subprocess.run(cmd[:-2] + ["--difficulty", "full", "--no-progress"], capture_output=True,
                        text=True, env=_env(), cwd=REPO, timeout=120)
    assert r2.returncode == 2 and "overwrite" in r2.stderr
    r3 = subprocess.run(cmd + ["--kinds", "bogus"], capture_output=True, text=True, env=_env(), cwd=REPO,
                        timeout=120)
    assert r3.returncode != 0


# ----------------------------------------------------------------------------------------------
# the data checker accepts every record

def _tokenizer_folder(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    special = ["<unk>", "<s>", "</s>", "<image>", "<latent_image>", "<vision_start>", "<vision_end>",
               "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["What color is the circle? red green blue yellow. How many squares?"] * 5,
                            trainer=trainer)
    os.makedirs(path, exist_ok=True)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
                   "add_bos_token": True, "add_eos_token": False, "model_max_length": 4096}, f)
    return path


def test_data_check_accepts_everything(full_set, tmp_path):
    if not os.path.exists(os.path.join(REPO, "fusion_jax", "data", "__main__.py")):
        pytest.skip("fusion_jax.data has no __main__ (the `python -m fusion_jax.data check` CLI) yet")
    out, summary = full_set
    tokdir = _tokenizer_folder(str(tmp_path / "tok"))
    cmd = [sys.executable, "-m", "fusion_jax.data", "check", os.path.join(out, "mixture.yaml"),
           "--image-folder", out, "--tokenizer", tokdir, "--template", "phi_3", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["skipped"] == {}, report.get("skipped_examples")
    assert report["usable"] == report["total"] == summary["train"]["samples"]
