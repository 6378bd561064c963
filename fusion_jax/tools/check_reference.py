"""Compare fusion_jax against a case recorded from the reference PyTorch code.

    python -m fusion_jax.tools.check_reference CASE_DIR [--atol 1e-4] [--rtol 1e-4]

A case folder holds weights.safetensors, config.json, vision_config.json,
inputs.npz and outputs.npz (the golden format). With labels the case is a
training forward; without, an inference prefill plus greedy generation when
`generated_ids` is recorded (and the chat convention when `turn_labels` is).
Prints one line per compared array and a final PASS/FAIL line.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402


def _compare(name, got, want, atol, rtol, exact=False):
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        print(f"{name:32s} shape {got.shape} != reference {want.shape}  FAIL")
        return False
    if exact:
        ok = bool(np.array_equal(got, want))
        print(f"{name:32s} mismatches {int((got != want).sum())}  {'ok' if ok else 'FAIL'}")
        return ok
    diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
    ok = bool(np.all(diff <= atol + rtol * np.abs(want.astype(np.float64))))
    print(f"{name:32s} max abs diff {diff.max() if diff.size else 0.0:.3e}  {'ok' if ok else 'FAIL'}")
    return ok


def _layout(cfg, inp, labels, q):
    from fusion_jax.constants import INSTRUCT_INDEX
    from fusion_jax.layout import build_layout
    ids = inp["input_ids"]
    mask = inp["attention_mask"] if "attention_mask" in inp else np.ones(ids.shape, bool)
    n_q = 1 if labels is None else max(1, int((labels == INSTRUCT_INDEX).sum(-1).max()))
    lay = build_layout(list(ids), None if labels is None else list(labels), list(inp["instructs"]),
                       num_image_tokens=cfg.num_image_tokens, query_len=q, max_questions=n_q,
                       attention_mask=mask, max_length=cfg.max_length)
    lay["images"] = inp["images"].astype(np.float32)
    return lay


def run(case_dir, atol=1e-4, rtol=1e-4) -> bool:
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp
    from flax import nnx

    from fusion_jax.hf_io import from_pretrained

    inp = dict(np.load(os.path.join(case_dir, "inputs.npz")))
    ref = dict(np.load(os.path.join(case_dir, "outputs.npz")))
    model = from_pretrained(case_dir)
    cfg = model.cfg
    q = int(ref["query_len"]) if "query_len" in ref else cfg.query_len[0]
    labels = inp.get("labels")
    lay = {k: jnp.asarray(v) for k, v in _layout(cfg, inp, labels, q).items()}
    fwd = nnx.jit(lambda m, b: m(b))
    out = jax.tree.map(np.asarray, fwd(model, lay))
    ok = True
    keys = ["logits"] + (["loss", "ce_loss", "instruct_cos_loss", "vision_cos_loss"] if labels is not None else [])
    for k in keys:
        if k in ref:
            ok &= _compare(k, out[k], ref[k], atol, rtol)
    if labels is None and "generated_ids" in ref:
        ok &= _check_generation(model, cfg, inp, ref, q, None, "", atol, rtol)
        if "turn_labels" in inp and "generated_ids_turnlabels" in ref:
            ok &= _check_generation(model, cfg, inp, ref, q, inp["turn_labels"], "_turnlabels", atol, rtol)
    print("PASS" if ok else "FAIL")
    return ok


def _check_generation(model, cfg, inp, ref, q, labels, suffix, atol, rtol):
    import jax
    import jax.numpy as jnp

    from fusion_jax.generate import generate
    want = ref["generated_ids" + suffix]
    lay = {k: jnp.asarray(v) for k, v in _layout(cfg, inp, labels, q).items()}
    eos = cfg.llm.eos_token_id
    eos = tuple(eos) if isinstance(eos, (tuple, list)) else ((eos,) if eos is not None else ())
    pad = cfg.llm.pad_token_id if cfg.llm.pad_token_id is not None else (eos[0] if eos else 0)
    out = jax.tree.map(np.asarray, generate(model, lay, max_new_tokens=int(want.shape[1]),
                                            eos_ids=eos, pad_id=int(pad), return_logits=True))
    ok = _compare("generated_ids" + suffix, out["tokens"], want, 0, 0, exact=True)
    key = "generate_step_logits" + suffix
    if key in ref:
        n = ref[key].shape[0]
        ok &= _compare(key, out["step_logits"][:n], ref[key], atol, rtol)
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case_dir")
    ap.add_argument("--atol", type=float, default=1e-4)
    ap.add_argument("--rtol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    for f in ("inputs.npz", "outputs.npz", "config.json"):
        if not os.path.exists(os.path.join(a.case_dir, f)):
            print(f"{a.case_dir}: missing {f}", file=sys.stderr)
            return 2
    return 0 if run(a.case_dir, a.atol, a.rtol) else 1


if __name__ == "__main__":
    sys.exit(main())
