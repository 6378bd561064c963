"""CLI: `python -m fusion_jax.data check|preview|prepare ...`.

Exit status: 0 when the input could be read (bad records are counted, not fatal),
2 when the input itself cannot be read, 1 when --strict meets a bad record.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _common(p: argparse.ArgumentParser):
    p.add_argument("data", help="mixture YAML, .json / .jsonl file, or a prepared dataset dir (tfds)")
    p.add_argument("--image-folder", default=None)
    p.add_argument("--tokenizer", required=True, help="HF tokenizer folder (tokenizer.json)")
    p.add_argument("--template", default="phi_3", choices=["phi_3", "llama_3", "qwen_2", "plain"])
    p.add_argument("--max-len", type=int, default=4096, help="model_max_length after placeholder expansion")
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--num-image-tokens", type=int, default=729)
    p.add_argument("--query-len", default="4,16,36,64,144")
    p.add_argument("--max-questions", type=int, default=16)
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--max-file-bytes", type=int, default=None, help="image files over this are skipped unread")
    p.add_argument("--no-exif-transpose", action="store_true")
    p.add_argument("--seed", type=int, default=0, help="seed of random:N sampling strategies")
    p.add_argument("--strict", action="store_true", help="fail on the first bad record, naming it")


def _processor(args, decode_images=True):
    from fusion_jax.data.images import DEFAULT_MAX_FILE_BYTES, DEFAULT_MAX_PIXELS
    from fusion_jax.data.sample import SampleConfig, SampleProcessor
    from fusion_jax.data.tokenizer import load_tokenizer
    cfg = SampleConfig(template=args.template, image_size=args.image_size,
                       num_image_tokens=args.num_image_tokens, max_length=args.max_len,
                       query_lens=tuple(int(q) for q in args.query_len.split(",")),
                       max_questions=args.max_questions, max_pixels=args.max_pixels or DEFAULT_MAX_PIXELS,
                       max_file_bytes=args.max_file_bytes or DEFAULT_MAX_FILE_BYTES,
                       exif_transpose=not args.no_exif_transpose, decode_images=decode_images,
                       strict=args.strict)
    return SampleProcessor(load_tokenizer(args.tokenizer), cfg, image_folder=args.image_folder)


def _source(args):
    from fusion_jax.data.pipeline import open_source
    return open_source(args.data, image_folder=args.image_folder, seed=args.seed)


def cmd_check(args) -> int:
    from fusion_jax.data.check import run_check
    proc = _processor(args, decode_images=not args.no_decode)
    src = _source(args)
    rep = run_check(src, proc, limit=args.limit, progress=args.progress and not args.json)
    if args.json:
        print(rep.format(), file=sys.stderr)
        print(json.dumps(rep.to_dict()))
    else:
        print(rep.format())
    return 0


def cmd_preview(args) -> int:
    from fusion_jax.data.preview import preview
    proc = _processor(args)
    src = _source(args)
    text = preview(src, proc, index=args.index, rid=args.id, out_png=args.out)
    print(text)
    return 0


def cmd_prepare(args) -> int:
    from fusion_jax.data.tfds_builder import prepare
    path = prepare(args.data, args.output_dir, image_folder=args.image_folder, seed=args.seed,
                   name=args.name, shards=args.shards)
    print(path)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.data", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="read every record as training would; report usable/skipped")
    _common(c)
    c.add_argument("--json", action="store_true", help="last stdout line is one JSON object")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--no-decode", action="store_true", help="check image files exist, do not decode")
    c.add_argument("--progress", action="store_true")
    c.set_defaults(fn=cmd_check)
    p = sub.add_parser("preview", help="render one sample: prompt, supervised spans, crops as PNG")
    _common(p)
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--id", default=None, help="record id (overrides --index)")
    p.add_argument("--out", default="preview.png", help="PNG grid of the 5 crops")
    p.set_defaults(fn=cmd_preview)
    r = sub.add_parser("prepare", help="write a mixture as a tfds ArrayRecord dataset (images as bytes)")
    r.add_argument("data")
    r.add_argument("output_dir")
    r.add_argument("--image-folder", default=None)
    r.add_argument("--name", default="fusion_mixture")
    r.add_argument("--shards", type=int, default=None)
    r.add_argument("--seed", type=int, default=0)
    r.set_defaults(fn=cmd_prepare)
    args = ap.parse_args(argv)

    from fusion_jax.data.records import InputError
    from fusion_jax.data.sample import StrictModeError
    try:
        return args.fn(args)
    except (InputError, FileNotFoundError) as e:
        print(f"error: cannot read input: {e}", file=sys.stderr)
        return 2
    except StrictModeError as e:
        print(f"error (--strict): {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
