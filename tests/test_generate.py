"""Generation: compile counts, padding, greedy/teacher-forced parity, sampling, eos, FUSION-L.

Everything runs on one tiny random model; shapes are shared between tests so that the
session compiles `generate` only a handful of times.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fusion_jax import generate as G
from fusion_jax.constants import IGNORE_INDEX, INSTRUCT_INDEX
from fusion_jax.data.testing import gradient_image

N = 6
QUESTIONS = ["What is in the image?", "How many apples are on the table? Answer briefly."]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from fusion_jax.eval.fixtures import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer(str(tmp_path_factory.mktemp("tok")), seed=3)
    cfg = model.cfg
    encs = [G.encode_request(tok, "phi_3", [(q, None)]) for q in QUESTIONS]
    # equal instruct widths: in the reference early-attention mode the padding width matters
    ins = [e["instructs"][:5] for e in encs]
    crops = np.stack([G.load_image_crops(cfg, gradient_image(40 + 9 * i, 30, seed=i)) for i in range(2)])
    ids = [e["input_ids"] for e in encs]
    L = max(len(x) for x in ids)
    left = np.full((2, L), tok.pad_id, np.int64)
    mask = np.zeros((2, L), bool)
    for b, x in enumerate(ids):
        left[b, L - len(x):] = x
        mask[b, L - len(x):] = True
    lay = G.layout_padded(cfg, left, ins, crops, attention_mask=mask, query_len=16, seq_bucket=64)
    batch = {k: jnp.asarray(v) for k, v in lay.items()}
    before = dict(G.TRACES)
    out = jax.tree.map(np.asarray, G.generate(model, batch, max_new_tokens=N, return_logits=True))
    traces = {k: G.TRACES[k] - before[k] for k in before}
    return dict(model=model, tok=tok, cfg=cfg, ids=ids, ins=ins, crops=crops, batch=batch, out=out,
                traces=traces)


def test_compiles_once_and_not_per_token(setup):
    model, batch = setup["model"], setup["batch"]
    compiles = []

    def listener(name, *a, **k):
        if name == "/jax/core/compile/backend_compile_duration":
            compiles.append(name)

    before = dict(G.TRACES)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        # same shapes and mode; different eos ids and rng are data, not constants
        for eos in ((), (5, 7)):
            o = G.generate(model, batch, max_new_tokens=N, return_logits=True, eos_ids=eos,
                           rng=jax.random.PRNGKey(len(eos)))
            jax.block_until_ready(o)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []
    assert G.TRACES == before
    # the fixture's single compilation traced the decode step exactly once for N tokens
    assert setup["out"]["tokens"].shape == (2, N)


def test_decode_body_traced_once_per_compile(setup):
    # the fixture's compilation (N tokens) traced generate once and the loop body once
    assert setup["traces"] == {"generate": 1, "decode_step": 1}


def test_left_padded_batch_equals_per_sample(setup):
    model, cfg, out = setup["model"], setup["cfg"], setup["out"]
    for b in range(2):
        lay = G.layout_padded(cfg, [setup["ids"][b]], [setup["ins"][b]], setup["crops"][b:b + 1],
                              query_len=16, seq_bucket=64)
        one = G.generate(model, {k: jnp.asarray(v) for k, v in lay.items()}, max_new_tokens=N,
                         return_logits=True)
        np.testing.assert_array_equal(np.asarray(one["tokens"])[0], out["tokens"][b])
        np.testing.assert_allclose(np.asarray(one["step_logits"])[:, 0], out["step_logits"][:, b],
                                   atol=1e-4, rtol=1e-4)


def test_greedy_equals_teacher_forced_argmax(setup):
    from fusion_jax.layout import build_layout, spliced_length
    model, cfg, out = setup["model"], setup["cfg"], setup["out"]
    ids, labels = [], []
    for b in range(2):
        x = np.concatenate([setup["ids"][b], out["tokens"][b]])
        lab = np.full(x.shape, IGNORE_INDEX, np.int64)
        lab[len(setup["ids"][b]) - 1] = INSTRUCT_INDEX
        ids.append(x)
        labels.append(lab)
    lay = build_layout(ids, labels, setup["ins"], num_image_tokens=cfg.num_image_tokens, query_len=16,
                       max_questions=1, max_length=cfg.max_length)
    lay["images"] = setup["crops"]
    logits = np.asarray(nnx.jit(lambda m, b: m(b)["logits"])(model, {k: jnp.asarray(v) for k, v in lay.items()}))
    for b in range(2):
        n = spliced_length(setup["ids"][b], num_image_tokens=cfg.num_image_tokens, query_len=16)
        tf = logits[b, n - 1: n - 1 + N]
        np.testing.assert_array_equal(tf.argmax(-1), out["tokens"][b])
        np.testing.assert_allclose(tf, out["step_logits"][:, b], atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_top_k1_is_greedy(setup):
    model, batch, out = setup["model"], setup["batch"], setup["out"]
    kw = dict(max_new_tokens=N, temperature=1.5, top_p=0.95)
    a = np.asarray(G.generate(model, batch, rng=jax.random.PRNGKey(1), **kw)["tokens"])
    b = np.asarray(G.generate(model, batch, rng=jax.random.PRNGKey(1), **kw)["tokens"])
    c = np.asarray(G.generate(model, batch, rng=jax.random.PRNGKey(2), **kw)["tokens"])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    k1 = G.generate(model, batch, max_new_tokens=N, temperature=0.7, top_k=1, rng=jax.random.PRNGKey(5))
    np.testing.assert_array_equal(np.asarray(k1["tokens"]), out["tokens"])


def test_top_p_and_top_k_filters():
    lg = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    draws = np.asarray([G.pick_token(lg, jax.random.PRNGKey(i), 1.0, 0, 0.7)[0] for i in range(64)])
    assert set(draws.tolist()) == {0, 1}
    draws = np.asarray([G.pick_token(lg, jax.random.PRNGKey(i), 1.0, 3, 1.0)[0] for i in range(64)])
    assert set(draws.tolist()) <= {0, 1, 2} and 2 in draws


def test_eos_stops(setup):
    model, batch, out = setup["model"], setup["batch"], setup["out"]
    stop = int(out["tokens"][0, 2])
    first = int(np.argmax(out["tokens"][0] == stop))
    o = jax.tree.map(np.asarray, G.generate(model, batch, max_new_tokens=N, return_logits=True,
                                            eos_ids=(stop,), pad_id=0))
    assert o["num_tokens"][0] == first + 1
    np.testing.assert_array_equal(o["tokens"][0, :first + 1], out["tokens"][0, :first + 1])
    assert (o["tokens"][0, first + 1:] == 0).all()
    # both samples stopping ends the loop early
    stop1 = int(out["tokens"][1, 0])
    o2 = jax.tree.map(np.asarray, G.generate(model, batch, max_new_tokens=N, return_logits=True,
                                             eos_ids=(stop, stop1), pad_id=0))
    assert o2["num_tokens"][1] == 1 and o2["num_tokens"].max() <= first + 1


def test_stop_strings_and_decode(setup):
    tok = setup["tok"]
    ids = tok("A cat sitting<|end|> on a red mat.")
    text = G.decode_outputs(tok, np.asarray([ids]), np.asarray([len(ids)]), ("<|end|>",))[0]
    assert text == "A cat sitting"
    assert G.cut_at_stop("yes. no", (". ",)) == "yes"
    assert G.stop_strings("phi_3") == ("<|end|>",)
    assert tok.token_to_id("<|end|>") in G.stop_token_ids(setup["cfg"], tok, "phi_3")


def test_prompt_matches_reference_eval_format(setup):
    tok = setup["tok"]
    e = G.encode_request(tok, "phi_3", [("What is this?", None)])
    assert e["prompt"] == ("<|system|>\nYou are a helpful AI assistant.<|end|>\n<|user|>\n"
                           "<vision_start><latent_image><vision_end><vision_start><image><vision_end>\n"
                           "What is this?<|end|>\n<|assistant|>\n")
    assert e["labels"] is None
    np.testing.assert_array_equal(e["instructs"], tok("What is this?"))
    ids = e["input_ids"]
    assert (ids == -300).sum() == 1 and (ids == -200).sum() == 1 and np.argmax(ids == -300) < np.argmax(ids == -200)


def test_chat_convention_marks_every_turn(setup):
    tok, cfg = setup["tok"], setup["cfg"]
    turns = [("What is in the image?", "A cat."), ("How many apples?", None)]
    chat = G.encode_request(tok, "phi_3", turns, convention="chat")
    ev = G.encode_request(tok, "phi_3", turns)
    np.testing.assert_array_equal(chat["input_ids"], ev["input_ids"])
    pos = np.nonzero(chat["labels"] == INSTRUCT_INDEX)[0]
    assert len(pos) == 2 and pos[-1] == len(chat["input_ids"]) - 1
    first = G.encode_request(tok, "phi_3", turns[:1][:0] + [(turns[0][0], None)])
    assert pos[0] == len(first["input_ids"]) - 1
    crops = setup["crops"][:1]
    lc = G.layout_padded(cfg, [chat["input_ids"]], [chat["instructs"]], crops,
                         labels=[chat["labels"]], query_len=4)
    le = G.layout_padded(cfg, [ev["input_ids"]], [ev["instructs"]], crops, query_len=4)
    assert (lc["instruct_pos"] >= 0).sum() == 2 and (lc["latent_pos"] >= 0).sum() == 8
    assert (le["instruct_pos"] >= 0).sum() == 1 and (le["latent_pos"] >= 0).sum() == 4
    assert lc["instruct_pos"][0, -1] == le["instruct_pos"][0, 0]


def test_query_len_must_be_configured(setup):
    with pytest.raises(ValueError, match="query_len 9"):
        G.pick_query_len(setup["cfg"], 9)
    assert G.pick_query_len(setup["cfg"], None) == max(setup["cfg"].query_len)


def test_fusion_l_grid_and_query_len(setup):
    from fusion_jax.model import FusionForCausalLM
    cfg = setup["cfg"].replace(image_token_grid=4)         # tiny grid 8x8 -> 4x4 tokens
    model = FusionForCausalLM(cfg, seed=1)
    assert cfg.num_image_tokens == 16
    lay = G.layout_padded(cfg, [setup["ids"][0]], [setup["ins"][0]], setup["crops"][:1], query_len=4)
    assert lay["image_pos"].shape == (1, 16) and lay["latent_pos"].shape == (1, 4)
    o = G.generate(model, {k: jnp.asarray(v) for k, v in lay.items()}, max_new_tokens=3)
    assert np.asarray(o["tokens"]).shape == (1, 3)


def test_eval_convention_keeps_initial_latents_in_later_blocks(setup):
    """Reference: every later placeholder gets init_latent even when its block is not refined."""
    tok, cfg, model = setup["tok"], setup["cfg"], setup["model"]
    turns = [("What is in the image?", "A cat."), ("How many apples?", None)]
    ev = G.encode_request(tok, "phi_3", turns)
    lay = G.layout_padded(cfg, [ev["input_ids"]], [ev["instructs"]], setup["crops"][:1], query_len=4)
    fill = lay["latent_fill_pos"][0]
    assert (fill >= 0).sum() == 8 and (lay["latent_pos"] >= 0).sum() == 4
    np.testing.assert_array_equal(fill[:4], lay["latent_pos"][0])
    q, enc, x = nnx.jit(G.prefill_inputs)(model, {k: jnp.asarray(v) for k, v in lay.items()})
    x, init = np.asarray(x), np.asarray(enc["init_latent"])
    np.testing.assert_allclose(x[0, fill[:4]], init[0], atol=1e-6)
    np.testing.assert_allclose(x[0, fill[4:]], init[0], atol=1e-6)


# ----------------------------------------------------------------------------- limits

LONG = "Describe every object in the picture, its colour, its size and where it is. " * 4


def test_prompt_longer_than_context_is_an_error_not_a_cut(tmp_path):
    from fusion_jax.eval.fixtures import tiny_model_and_tokenizer
    model, tok = tiny_model_and_tokenizer(str(tmp_path), seed=0, max_length=96)
    with pytest.raises(ValueError, match=r"prompt 1 is \d+ tokens \(image and latent tokens included\), "
                                         r"longer than the model's max_length 96"):
        G.answer(model, tok, [{"question": "Hi?", "image": None}, {"question": LONG, "image": None}])
    from fusion_jax.layout import spliced_length
    ids = G.encode_request(tok, "phi_3", [("Hi?", None)], has_image=False)["input_ids"]
    n = spliced_length(ids, num_image_tokens=model.cfg.num_image_tokens, query_len=16)
    with pytest.raises(ValueError, match=rf"prompt 0 is {n} tokens; with max_new_tokens 131072 that is "
                                         rf"{n + 131072} positions, more than the model's "
                                         r"max_position_embeddings 131072"):
        G.answer(model, tok, [{"question": "Hi?", "image": None}], G.GenerationConfig(max_new_tokens=131072))
    G.check_context(model.cfg, [96], 131072 - 96)             # exactly full is allowed
    with pytest.raises(ValueError, match="max_new_tokens must be at least 1"):
        G.generate(model, {}, max_new_tokens=0)


def test_cli_names_the_lengths(tmp_path, capsys):
    from fusion_jax.eval.fixtures import write_tiny_checkpoint
    from fusion_jax.generate.cli import main
    ckpt, _, _ = write_tiny_checkpoint(str(tmp_path / "ckpt"), max_length=96)
    assert main(["--ckpt", ckpt, "--prompt", LONG]) == 2
    assert "longer than the model's max_length 96" in capsys.readouterr().err
    assert main(["--ckpt", ckpt, "--prompt", "Hi?", "--max-new-tokens", "200000"]) == 2
    assert "more than the model's max_position_embeddings 131072" in capsys.readouterr().err


def test_cli_missing_image_fails_before_loading_the_model(tmp_path):
    import os
    import pathlib
    import subprocess
    import sys
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu")
    # the checkpoint does not exist either: loading it first would fail on that instead
    p = subprocess.run([sys.executable, "-m", "fusion_jax.generate", "--ckpt", str(tmp_path / "no_ckpt"),
                        "--image", str(tmp_path / "missing.png"), "--prompt", "What is it?"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert f"error: --image missing_image: {tmp_path / 'missing.png'} does not exist" in p.stderr
    assert "no_ckpt" not in p.stderr and "Traceback" not in p.stderr
