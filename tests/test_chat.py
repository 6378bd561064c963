"""`python -m fusion_jax.chat` through a pipe: the streamed answers equal `generate` on the same
conversation (full re-encode, chat convention, vision instructs = the first question), while
the chat extends its KV cache turn by turn; the extended prefill's logits equal a full
prefill's to 1e-4; `/reset`, `/image`, `/exit`; `--reencode` equals `answer()` re-encoding
the conversation as the reference's serve/cli.py does.

The reference generations are computed once per conversation (`_full` is memoized) and the
module shares a persistent compilation cache with the chat subprocess, which then loads the
programs the in-process sessions compiled instead of compiling them again."""
from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 6
QS = ["What is in the image?", "And what colour is it?"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, jax_compile_cache):
    from fusion_jax.data.testing import gradient_image
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    from fusion_jax.generate import GenerationConfig
    root = tmp_path_factory.mktemp("chat")
    ckpt, model, tok = write_tiny_checkpoint(str(root / "ckpt"), seed=0)
    img_path = str(root / "img.png")
    gradient_image(40, 36, seed=0).save(img_path)
    from fusion_jax.generate import open_image
    g = GenerationConfig(max_new_tokens=N, query_len=4, convention="chat")
    return dict(root=root, ckpt=ckpt, model=model, tok=tok, img_path=img_path, image=open_image(img_path), g=g,
                cache_env=jax_compile_cache, full={})


def _full(s, turns, image):
    """(text, outputs with step logits) of `generate` on the whole conversation: the chat's reference
    point; memoized per conversation (the tests ask for the same ones)."""
    key = (tuple(turns), image is not None)
    if key not in s["full"]:
        s["full"][key] = _generate(s["model"], s["tok"], turns, image, s["g"])
    return s["full"][key]


def _generate(model, tok, turns, image, g):
    from fusion_jax.data.templates import strip_tags
    from fusion_jax.generate import (
        decode_outputs,
        encode_request,
        generate,
        image_question,
        layout_padded,
        load_image_crops,
        stop_strings,
        stop_token_ids,
    )
    e = encode_request(tok, "phi_3", turns, has_image=image is not None, convention="chat")
    ins = np.asarray(tok(strip_tags(image_question(turns[0][0]))), np.int64) if image is not None else np.zeros(1)
    lay = layout_padded(model.cfg, [e["input_ids"]], [ins], load_image_crops(model.cfg, image)[None],
                        labels=[e["labels"]], query_len=g.query_len, seq_bucket=64, max_new_tokens=N)
    o = generate(model, {k: jnp.asarray(v) for k, v in lay.items()}, max_new_tokens=N, pad_id=tok.pad_id or 0,
                 eos_ids=stop_token_ids(model.cfg, tok, "phi_3"), return_logits=True)
    return decode_outputs(tok, o["tokens"], o["num_tokens"], stop_strings("phi_3"))[0], o


def _conversation(s, questions, image):
    turns, out = [], []
    for q in questions:
        turns.append((q, None))
        text, _ = _full(s, turns, image)
        turns[-1] = (q, text)
        out.append(text)
    return out


def test_cache_extension_equals_full_prefill(setup):
    from fusion_jax.chat import ChatSession, conversation_batch
    s = setup
    chat = ChatSession(s["model"], s["tok"], s["g"], image=s["image"])
    streamed = []
    first = chat.ask(QS[0], on_text=streamed.append)
    assert "".join(streamed) == first == _conversation(s, QS[:1], s["image"])[0]
    turns = chat.turns + [(QS[1], None)]
    ids, lay = conversation_batch(s["model"], s["tok"], turns, s["image"], s["g"])
    logits = np.asarray(chat._prefill(ids, lay))
    assert chat.stats == {"extended": 1, "full": 1}
    _, o = _full(s, turns, s["image"])
    np.testing.assert_allclose(logits[0], np.asarray(o["step_logits"])[0, 0], atol=1e-4, rtol=0)


def test_reencode_equals_answer(setup):
    from fusion_jax.chat import ChatSession
    from fusion_jax.generate import answer
    s = setup
    chat = ChatSession(s["model"], s["tok"], s["g"], image=s["image"], reencode=True)
    turns = []
    for q in QS:
        got = chat.ask(q)
        turns.append((q, None))
        want = answer(s["model"], s["tok"], [{"turns": turns, "image": s["image"]}], s["g"])[0]
        turns[-1] = (q, want)
        assert got == want
    assert chat.stats["extended"] == 0


def test_chat_through_a_pipe(setup):
    s = setup
    want = _conversation(s, QS, s["image"])
    text_only = _conversation(s, QS[:1], None)
    stdin = "\n".join([QS[0], "/image " + s["img_path"], QS[0], QS[1], "/reset", QS[0], "/image missing.png",
                       QS[1], "/exit", "never asked"]) + "\n"
    env = dict(os.environ, **s["cache_env"], PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    r = subprocess.run([sys.executable, "-m", "fusion_jax.chat", "--ckpt", s["ckpt"], "--max-new-tokens", str(N),
                        "--query-len", "4"], input=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    answers = [a[:-1] for a in r.stdout.split("ASSISTANT: ")[1:]]       # each answer ends its line
    # a failed /image leaves the conversation as it was: the last question is its second turn
    assert answers == [text_only[0], want[0], want[1], want[0], want[1]], (r.stdout, r.stderr)
    assert "missing.png" in r.stderr and r.stderr.count("new conversation") == 2
    assert "(prefills: 2 extended the cache, 3 full)" in r.stderr
