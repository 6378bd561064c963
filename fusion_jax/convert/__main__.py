"""python -m fusion_jax.convert {to-orbax,to-hf,init,inspect,merge-lora,to-peft} ..."""
from __future__ import annotations

import argparse
import sys


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fusion_jax.convert")
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("to-orbax", help="reference HF folder -> Orbax folder")
    a.add_argument("--src", required=True)
    a.add_argument("--dst", required=True)
    a.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    a.add_argument("--force", action="store_true")
    b = sub.add_parser("to-hf", help="Orbax folder -> reference HF folder")
    b.add_argument("--src", required=True)
    b.add_argument("--dst", required=True)
    b.add_argument("--max-shard-size", default="5GB")
    b.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    b.add_argument("--force", action="store_true")
    c = sub.add_parser("init", help="stage-1 weights from SigLIP + HF LLM -> Orbax folder")
    c.add_argument("--vision", required=True)
    c.add_argument("--llm", required=True)
    c.add_argument("--dst", required=True)
    c.add_argument("--config", help="JSON of FusionConfig fields (or reference config.json keys)")
    c.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--force", action="store_true")
    d = sub.add_parser("inspect", help="list tensors, shapes, dtypes and the detected config")
    d.add_argument("dir")
    e = sub.add_parser("merge-lora", help="base + LoRA adapters (a train step dir) -> full Orbax folder")
    e.add_argument("--base", required=True, help="the base: Orbax / HF folder or train step dir")
    e.add_argument("--adapters", required=True, help="a LoRA train workdir or step dir")
    e.add_argument("--dst", required=True)
    e.add_argument("--force", action="store_true")
    f = sub.add_parser("to-peft", help="LoRA adapters -> peft folder (+ non_lora_trainables) for PyTorch")
    f.add_argument("--adapters", required=True, help="a LoRA train workdir or step dir")
    f.add_argument("--dst", required=True)
    f.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.cmd == "to-orbax":
            from fusion_jax.convert.hf_export import to_orbax
            to_orbax(args.src, args.dst, dtype=args.dtype, force=args.force)
        elif args.cmd == "to-hf":
            from fusion_jax.convert.hf_export import to_hf
            to_hf(args.src, args.dst, max_shard_size=args.max_shard_size, dtype=args.dtype, force=args.force)
        elif args.cmd == "init":
            from fusion_jax.convert.init_stage1 import init_stage1
            init_stage1(args.vision, args.llm, args.dst, config=args.config, dtype=args.dtype,
                        seed=args.seed, force=args.force)
        elif args.cmd == "merge-lora":
            from fusion_jax.convert.lora_export import merge_lora
            merge_lora(args.base, args.adapters, args.dst, force=args.force)
        elif args.cmd == "to-peft":
            from fusion_jax.convert.lora_export import to_peft
            to_peft(args.adapters, args.dst, force=args.force)
        else:
            from fusion_jax.convert.inspect_ckpt import inspect_dir
            inspect_dir(args.dir)
    except (FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
