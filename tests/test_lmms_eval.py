"""The lmms-eval plugin `fusion_jax`: the `lmms-eval` CLI, offline, discovers the model through
its entry point and scores two local YAML tasks over a local JSONL dataset (generate_until with
batch 2, multiple_choice through loglikelihood); the reported scores are the ones our model's
answers and log-likelihoods give. loglikelihood equals the sum of the continuation's
log-probabilities read from the cached generation path (prefill + decode_step), image or not.

Every request here is laid out in the same buckets (prompt 64, instructs 16, batch 2 for the
scorer), so each program compiles once; the module's persistent compilation cache hands the
scorer the CLI subprocess needs over from the in-process reference.
"""
from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax.generate import decoding

try:
    import lmms_eval  # noqa: F401
except ImportError as e:   # CI installs it (.ci/run); a missing install is a failure, not a skip
    raise ImportError("lmms-eval is not installed: pip install -e '.[eval]' && "
                      "pip install --no-deps lmms-eval==0.7.3") from e

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INSTRUCT_BUCKET = 16   # the CLI's instruct_bucket model arg; the in-process references use it too
CAPACITY = 8           # decode slots after the prompt on the cached path (>= every continuation's length)
_prefill = nnx.jit(decoding.prefill, static_argnums=2)   # one wrapper: compiled once per shape
_decode_step = nnx.jit(decoding.decode_step)
QUESTIONS = ["What is in the image?", "Is it red?", "Describe the scene.", "How many are there?"]
CHOICES = ["yes", "no", "maybe"]
UTILS = '''from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")] if doc["image"] else []


def process_results(doc, results):
    return {"exact_match": float(results[0] == doc["answer"])}
'''


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jax_compile_cache):
    from fusion_jax.data.testing import gradient_image
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    root = tmp_path_factory.mktemp("lmms")
    ckpt, model, tok = write_tiny_checkpoint(str(root / "ckpt"), seed=1)
    images = []
    for i in range(len(QUESTIONS)):
        if i == 2:
            images.append("")                                   # a text-only request
            continue
        images.append(str(root / f"img{i}.png"))
        gradient_image(36 + 6 * i, 32, seed=i).save(images[-1])
    return dict(root=root, ckpt=ckpt, model=model, tok=tok, images=images, cache_env=jax_compile_cache)


def _pil(path):
    from PIL import Image
    return Image.open(path).convert("RGB") if path else None


def _cached_path_logprob(model, tok, context, continuation, image):
    """sum log p(continuation | prompt) by teacher forcing through the KV cache, and is_greedy."""
    from fusion_jax.eval.lmms_plugin.scoring import encode_pair
    from fusion_jax.generate import layout_padded, load_image_crops
    e = encode_pair(tok, "phi_3", context, continuation, image is not None)
    n = e["n_cont"]
    if n == 0:
        return 0.0, True
    assert n <= CAPACITY, (continuation, n)
    ctx, cont = e["input_ids"][:-n], e["input_ids"][-n:]
    lay = layout_padded(model.cfg, [ctx], [e["instructs"]], load_image_crops(model.cfg, image)[None], query_len=4,
                        seq_bucket=64, instruct_bucket=INSTRUCT_BUCKET)
    logits, cache, kv_mask, lengths = _prefill(model, {k: jnp.asarray(v) for k, v in lay.items()}, CAPACITY)
    total, greedy = 0.0, True
    for t, tok_id in enumerate(cont):
        lp = np.asarray(jax.nn.log_softmax(logits[0]))
        total += float(lp[tok_id])
        greedy &= int(np.argmax(lp)) == int(tok_id)
        logits, cache, kv_mask = _decode_step(model, jnp.asarray([tok_id], jnp.int32), cache, kv_mask, lengths + t)
    return total, greedy


def test_loglikelihood_equals_the_models_own_logprobs(setup):
    from fusion_jax.eval.lmms_plugin.scoring import loglikelihoods
    from fusion_jax.generate import GenerationConfig, answer
    model, tok = setup["model"], setup["tok"]
    img = _pil(setup["images"][0])
    greedy = answer(model, tok, [{"question": QUESTIONS[0], "image": img}],
                    GenerationConfig(max_new_tokens=3, query_len=4, instruct_bucket=INSTRUCT_BUCKET))[0]
    items = [(QUESTIONS[0], greedy, img), (QUESTIONS[0], " no", img), ("<image>\n" + QUESTIONS[1], " yes", img),
             (QUESTIONS[2], " maybe", None)]
    got = loglikelihoods(model, tok, items, template="phi_3", query_len=4, batch_size=2,
                         instruct_bucket=INSTRUCT_BUCKET)
    for (ctx, cont, im), (lp, is_greedy) in zip(items, got, strict=True):
        want, want_greedy = _cached_path_logprob(model, tok, ctx, cont, im)
        assert lp == pytest.approx(want, abs=1e-4) and is_greedy == want_greedy
    assert greedy and got[0][1]                    # the model's own (non-empty) greedy answer is greedy
    assert all(lp < 0 for lp, _ in got[1:])


def _entry_point_dir(root):
    """The editable install predates the entry point: declare it from pyproject.toml, as pip would."""
    if any(ep.name == "fusion_jax" for ep in importlib.metadata.entry_points(group="lmms_eval.models")):
        return None
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        section = f.read().split('[project.entry-points."lmms_eval.models"]\n', 1)[1].split("\n[", 1)[0]
    eps = dict(re.findall(r'^(\w+) = "([^"]+)"$', section, re.M))
    assert eps == {"fusion_jax": "fusion_jax.eval.lmms_plugin:manifest"}
    d = root / "ep" / "fusion_jax_entry_points-0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: fusion_jax_entry_points\nVersion: 0\n")
    (d / "entry_points.txt").write_text("[lmms_eval.models]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))
    return str(d.parent)


def _write_tasks(s, targets, golds):
    root = s["root"]
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"question": q, "image": img, "answer": t, "gold": g}) + "\n"
                            for q, img, t, g in zip(QUESTIONS, s["images"], targets, golds, strict=True)))
    tasks = root / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "utils.py").write_text(UTILS)
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
              "doc_to_visual: !function utils.doc_to_visual\ndoc_to_text: question\n")
    (tasks / "fj_vqa.yaml").write_text(
        "task: fj_vqa\n" + common + "output_type: generate_until\ndoc_to_target: answer\n"
        "generation_kwargs:\n  max_new_tokens: 3\n  temperature: 0\n  until: ['\\n\\n']\n"
        "process_results: !function utils.process_results\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (tasks / "fj_mc.yaml").write_text(
        "task: fj_mc\n" + common + f"output_type: multiple_choice\ndoc_to_choice: {json.dumps(CHOICES)}\n"
        "doc_to_target: gold\nmetric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return tasks


def test_lmms_eval_cli_offline(setup):
    from fusion_jax.eval.lmms_plugin.scoring import loglikelihoods
    from fusion_jax.generate import GenerationConfig, answer
    model, tok = setup["model"], setup["tok"]
    g = GenerationConfig(max_new_tokens=3, query_len=4, instruct_bucket=INSTRUCT_BUCKET)
    imgs = [_pil(p) for p in setup["images"]]
    answers = [answer(model, tok, [{"question": q, "image": im}], g)[0] for q, im in zip(QUESTIONS, imgs, strict=True)]
    targets = [a if k % 2 == 0 else a + " (wrong)" for k, a in enumerate(answers)]     # exact_match 0.5
    lls = loglikelihoods(model, tok, [(q, " " + c, im) for q, im in zip(QUESTIONS, imgs, strict=True)
                                      for c in CHOICES], query_len=4, batch_size=2, instruct_bucket=INSTRUCT_BUCKET)
    best = np.argmax(np.asarray([lp for lp, _ in lls]).reshape(len(QUESTIONS), len(CHOICES)), -1)
    golds = [int(b) if k < 3 else (int(b) + 1) % 3 for k, b in enumerate(best)]       # acc 0.75
    tasks = _write_tasks(setup, targets, golds)
    out = setup["root"] / "results"
    extra = _entry_point_dir(setup["root"])
    env = dict(os.environ, **setup["cache_env"], HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
               HF_HOME=str(setup["root"] / "hf"),
               XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([REPO] + ([extra] if extra else []) + [os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "lmms_eval", "--model", "fusion_jax", "--model_args",
                        f"pretrained={setup['ckpt']},query_len=4,instruct_bucket={INSTRUCT_BUCKET}",
                        "--tasks", "fj_vqa,fj_mc",
                        "--include_path", str(tasks), "--batch_size", "2", "--output_path", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = glob.glob(str(out / "**" / "*results*.json"), recursive=True)
    assert len(files) == 1, (files, r.stdout[-2000:])
    res = json.load(open(files[0]))["results"]
    assert res["fj_vqa"]["exact_match,none"] == pytest.approx(0.5)
    assert res["fj_mc"]["acc,none"] == pytest.approx(0.75)
    assert "fusion_jax.eval.lmms_plugin.model.FusionJax" in json.load(open(files[0]))["config"]["model_backend"]
