"""Destination handling (refuse overwrite, stage then rename), progress bars, tokenizer files."""
from __future__ import annotations

import contextlib
import os
import shutil

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json")


@contextlib.contextmanager
def staged_dir(dst: str, force: bool = False):
    """Yield a temporary folder beside `dst`; rename it to `dst` only if the body succeeds."""
    dst = os.path.abspath(dst.rstrip("/"))
    if os.path.exists(dst):
        if not os.path.isdir(dst):
            raise FileExistsError(f"--dst {dst} exists and is not a folder")
        if os.listdir(dst) and not force:
            raise FileExistsError(f"--dst {dst} is not empty; pass --force to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dst)}.tmp-{os.getpid()}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(dst):
        old = os.path.join(parent, f".{os.path.basename(dst)}.old-{os.getpid()}")
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def progress(total_bytes: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=os.environ.get("FUSION_NO_PROGRESS") == "1")


CORE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(folder: str) -> bool:
    return any(f in CORE_TOKENIZER_FILES for f in tokenizer_files(folder))


def tokenizer_files(folder: str) -> list[str]:
    if not folder or not os.path.isdir(folder):
        return []
    return [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    files = tokenizer_files(src)
    if files:
        os.makedirs(dst, exist_ok=True)
        for f in files:
            shutil.copy2(os.path.join(src, f), os.path.join(dst, f))
    return files
