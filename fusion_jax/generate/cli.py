"""`python -m fusion_jax.generate`: answer a question about an image (the eval CLI shares the options)::

    python -m fusion_jax.generate --ckpt ORBAX_OR_HF_DIR --image PATH --prompt "..." \\
        [--template phi_3] [--max-new-tokens N] [--query-len q] [--image-grid 12]
"""
from __future__ import annotations

import argparse
import sys

from fusion_jax.generate.loading import find_tokenizer_dir, load_model
from fusion_jax.generate.prompts import CONVENTIONS, GenerationConfig, answer, open_image, pick_query_len


def add_generation_args(ap):
    ap.add_argument("--ckpt", required=True, help="Orbax folder or reference HF folder")
    ap.add_argument("--base", default=None, help="when --ckpt holds LoRA adapters: their base folder "
                    "(default: the one recorded with them, lora.base in fusion_config.json)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the checkpoint's)")
    ap.add_argument("--template", default=None, help="chat template (default: from the LLM family)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--query-len", type=int, default=None,
                    help="latent tokens per question, one of the configured choices (default: largest)")
    ap.add_argument("--image-grid", type=int, default=None,
                    help="FUSION-L: resize the image tokens to this grid (12 -> 144 tokens)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stop", action="append", default=None,
                    help="stop string (repeatable; default: the template separator)")
    ap.add_argument("--convention", choices=CONVENTIONS, default="eval",
                    help="instruct positions: eval (last prompt token) or chat (every user turn)")
    ap.add_argument("--early-mask-mode", choices=("reference", "intended"), default=None)


def generation_config(args) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                            query_len=args.query_len, convention=args.convention,
                            template=args.template, stop=tuple(args.stop) if args.stop else None)


def load_for_cli(args, **load_kw):
    """(tokenizer, model) from the shared --ckpt / --tokenizer / --image-grid / --early-mask-mode options;
    `load_kw` (mesh=, dtype=, config overrides) go to `load_model`."""
    from fusion_jax.data.tokenizer import load_tokenizer
    tok = load_tokenizer(find_tokenizer_dir(args.ckpt, args.tokenizer))
    overrides = {}
    if args.image_grid:
        overrides["image_token_grid"] = int(args.image_grid)
    if args.early_mask_mode:
        overrides["early_mask_mode"] = args.early_mask_mode
    model = load_model(args.ckpt, base=getattr(args, "base", None), **overrides, **load_kw)
    pick_query_len(model.cfg, args.query_len)
    return tok, model


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.generate",
                                 description="Answer a question about an image with a FUSION checkpoint.")
    add_generation_args(ap)
    ap.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    ap.add_argument("--prompt", required=True, action="append",
                    help="question; repeat for a multi-turn conversation (earlier turns are "
                         "answered by the model in order)")
    ap.add_argument("--show-prompt", action="store_true")
    a = ap.parse_args(argv)
    from fusion_jax.data.images import ImageError
    from fusion_jax.data.templates import TEMPLATES
    if a.template is not None and a.template not in TEMPLATES:
        print(f"unknown template {a.template!r}; choose one of {sorted(TEMPLATES)}", file=sys.stderr)
        return 2
    if a.max_new_tokens < 1:
        print(f"error: --max-new-tokens must be at least 1, got {a.max_new_tokens}", file=sys.stderr)
        return 2
    try:   # the image first: a wrong path fails in a second, not after loading the model
        image = open_image(a.image) if a.image is not None else None
        tok, model = load_for_cli(a)
        return _converse(a, tok, model, image)
    except ImageError as e:
        print(f"error: --image {e}", file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
    return 2


def _converse(a, tok, model, image) -> int:
    """Answer each --prompt in turn, earlier answers kept as the conversation."""
    turns = []
    for k, p in enumerate(a.prompt):
        turns.append((p, None))
        texts, raw = answer(model, tok, [{"turns": turns, "image": image}], generation_config(a), return_raw=True)
        if a.show_prompt:
            print(f"--- prompt {k}:\n{raw['prompts'][0]}\n---", file=sys.stderr)
        turns[-1] = (p, texts[0])
        print(f"USER: {p}\nASSISTANT: {texts[0]}" if len(a.prompt) > 1 else texts[0])
    return 0
