"""Tests for the synthesized-data engine (fusion_jax.synth)."""
from __future__ import annotations

import dataclasses
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
from fusion_jax.synth.palette import EASY, FULL
from fusion_jax.synth.qa import LETTERS, MC_SUFFIX, TemplateQAWriter
from fusion_jax.synth.scene import TemplateCaptionWriter

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
    summary = generate_dataset(out, SynthConfig(num=48, seed=7, image_size=64, heldout_fraction=0.25))
    return out, summary


@pytest.fixture(scope="module")
def easy_set(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("synth_easy"))
    summary = generate_dataset(out, SynthConfig(num=36, seed=3, image_size=32, difficulty="easy",
                                                heldout_fraction=0.34))
    return out, summary


# ----------------------------------------------------------------------------------------------
# determinism

def test_byte_identical_across_runs_and_workers(tmp_path):
    cfg = SynthConfig(num=14, seed=11, image_size=48, heldout_fraction=0.2)
    a, b, c = (str(tmp_path / n) for n in "abc")
    generate_dataset(a, cfg)
    generate_dataset(b, cfg)
    generate_dataset(c, dataclasses.replace(cfg, workers=2))
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
        generate_dataset(e, dataclasses.replace(cfg, workers=2))
    finally:
        engine._start_method = orig
    assert tree_digest(e) == da
    # a different seed gives a different set
    d = str(tmp_path / "d")
    generate_dataset(d, dataclasses.replace(cfg, seed=12))
    assert tree_digest(d) != da


def test_cache_and_argument_mismatch(tmp_path):
    out = str(tmp_path / "s")
    cfg = SynthConfig(num=6, seed=0, image_size=32, difficulty="easy")
    s1 = generate_dataset(out, cfg)
    assert s1["cached"] is False
    s2 = generate_dataset(out, dataclasses.replace(cfg, workers=2, progress=True))  # run-only: same set
    assert s2["cached"] is True and s2["train"] == s1["train"]
    with pytest.raises(ValueError):
        generate_dataset(out, dataclasses.replace(cfg, seed=1))
    s3 = generate_dataset(out, dataclasses.replace(cfg, seed=1), overwrite=True)
    assert s3["cached"] is False and s3["args"]["seed"] == 1
    # the key is every field but the run-only ones, resolved (the difficulty's defaults filled in)
    assert s3["args"] == {**dataclasses.replace(cfg, seed=1).cache_key(), "format_version": 1, "plugins": None}
    assert "workers" not in s3["args"] and "progress" not in s3["args"] and s3["args"]["max_turns"] == 2
    with pytest.raises(ValueError, match="overwrite"):
        generate_dataset(out, dataclasses.replace(cfg, seed=1, describe_fraction=0.5))


def test_config_from_a_config_dict():
    """`SynthConfig(**config.data.synth)`: lists for tuples, ints for floats, () for all kinds, and
    missing keys take the defaults; the cache key does not see the difference."""
    import ml_collections as mlc
    d = mlc.ConfigDict(dict(num=6, seed=0, image_size=64, workers=2, heldout_fraction=0, kinds=["color", "count"]))
    cfg = SynthConfig(**d)
    assert cfg.kinds == ("color", "count") and isinstance(cfg.heldout_fraction, float)
    assert cfg.cache_key() == SynthConfig(num=6, image_size=64, heldout_fraction=0.0,
                                          kinds=("color", "count")).cache_key()
    assert SynthConfig(kinds=()).kinds == KINDS and SynthConfig(kinds=[]).cache_key()["kinds"] == list(KINDS)


def test_config_validation():
    with pytest.raises(ValueError, match="mc_fraction"):
        SynthConfig(mc_fraction=-0.5).resolved()
    with pytest.raises(ValueError, match="mc_fraction \\+ long_fraction"):
        SynthConfig(mc_fraction=0.6, long_fraction=0.6).resolved()
    with pytest.raises(ValueError, match="describe_fraction"):
        SynthPipeline(SynthConfig(describe_fraction=-0.1))
    with pytest.raises(ValueError, match="kinds"):
        SynthConfig(kinds=("bogus",)).resolved()


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
    from fusion_jax.synth.sampler import ProceduralSceneSampler
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
    from fusion_jax.synth.palette import COLORS_FULL
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


def test_spatial_questions_name_objects_by_shape():
    """Spatial questions name both objects by shape (adding colour or size only to disambiguate)."""
    scene = Scene(_bg(), [_obj(0, "circle", "red", 0.2, 0.5), _obj(1, "square", "blue", 0.8, 0.5),
                          _obj(2, "triangle", "blue", 0.5, 0.1)], [])
    shape_qas = TemplateQAWriter(mc_fraction=0, long_fraction=0).write(scene, "", "spatial",
                                                                        np.random.default_rng(0), EASY)
    assert all("shape" in q.spec[k] for q in shape_qas for k in ("a", "b"))
    assert all(evaluate(scene, q.spec) == q.answer_text for q in shape_qas)


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
    from fusion_jax.data.tokenizer import train_bpe, write_tokenizer_folder
    special = ["<unk>", "<s>", "</s>", "<image>", "<latent_image>", "<vision_start>", "<vision_end>",
               "<|user|>", "<|assistant|>", "<|end|>", "<|system|>"]
    texts = ["What color is the circle? red green blue yellow. How many squares?"] * 5
    return write_tokenizer_folder(train_bpe(texts, 300, special), path)


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
