"""`python -m fusion_jax.chat --ckpt DIR [--image PATH] [--dtype bfloat16] [--mesh 1,-1,1]`

One question per input line; the answer streams to stdout after "ASSISTANT: ". Commands:
`/image PATH` (start a new conversation about that image), `/reset` (new conversation, same
image), `/exit` (or end of input). Messages about commands go to stderr. The KV cache is kept
across turns (see `fusion_jax.chat.session`); `--reencode` re-encodes the whole conversation
every turn with the instructs of all user messages, as the reference's `serve/cli.py` does.
"""
from __future__ import annotations

import argparse
import sys


def _parser():
    from fusion_jax.eval.scale import add_load_args
    from fusion_jax.generate.cli import add_generation_args
    ap = argparse.ArgumentParser(prog="python -m fusion_jax.chat", description=__doc__.splitlines()[0])
    add_generation_args(ap)
    add_load_args(ap)
    ap.add_argument("--image", default=None, help="image file (omit for a text-only chat)")
    ap.add_argument("--reencode", action="store_true",
                    help="re-encode the whole conversation each turn (the reference's behaviour; no cache reuse)")
    ap.add_argument("--seq-bucket", type=int, default=64, help="prefill segments are padded to a multiple of this")
    ap.set_defaults(max_new_tokens=512, convention="chat")
    return ap


def _command(session, line: str) -> bool:
    """Run a /command; False on /exit."""
    from fusion_jax.data.images import ImageError
    from fusion_jax.generate.prompts import open_image
    cmd, _, arg = line.partition(" ")
    if cmd == "/exit":
        return False
    if cmd == "/reset":
        session.reset()
        print("(new conversation)", file=sys.stderr)
    elif cmd == "/image" and arg.strip():
        try:
            session.image = open_image(arg.strip())
        except ImageError as e:
            print(f"error: /image {e}", file=sys.stderr)
            return True
        session.reset()
        print(f"(new conversation about {arg.strip()})", file=sys.stderr)
    else:
        print("commands: /image PATH, /reset, /exit", file=sys.stderr)
    return True


def chat_loop(session, lines, out=sys.stdout, prompt: bool = False) -> None:
    for line in lines:
        line = line.strip()
        if line.startswith("/"):
            if not _command(session, line):
                return
        elif line:
            out.write("ASSISTANT: ")
            out.flush()

            def show(piece):
                out.write(piece)
                out.flush()
            try:
                session.ask(line, on_text=show)
            except ValueError as e:          # e.g. the conversation outgrew the context
                print(f"\nerror: {e} (type /reset)", file=sys.stderr)
            out.write("\n")
        if prompt:
            out.write("USER: ")
            out.flush()


def main(argv=None) -> int:
    a = _parser().parse_args(argv)
    if a.convention != "chat":
        print("error: the chat uses the chat instruct convention (--convention chat)", file=sys.stderr)
        return 2
    from fusion_jax.chat.session import ChatSession
    from fusion_jax.data.images import ImageError
    from fusion_jax.eval.scale import load_for_eval
    from fusion_jax.generate.cli import generation_config
    from fusion_jax.generate.prompts import open_image
    try:   # the image first: a wrong path fails before the model loads
        image = open_image(a.image) if a.image else None
        tok, model = load_for_eval(a)
    except ImageError as e:
        print(f"error: --image {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gcfg = generation_config(a)
    session = ChatSession(model, tok, gcfg, image=image, reencode=a.reencode, seq_bucket=a.seq_bucket)
    tty = sys.stdin.isatty()
    if tty:
        sys.stdout.write("USER: ")
        sys.stdout.flush()
    chat_loop(session, sys.stdin, prompt=tty)
    st = session.stats
    print(f"(prefills: {st['extended']} extended the cache, {st['full']} full)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
