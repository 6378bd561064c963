"""Destination handling (refuse overwrite, stage then rename), progress bars, tokenizer files."""
from __future__ import annotations

import contextlib
import os
import tempfile

from etils import epath

from fusion_jax import paths

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.json", "chat_template.jinja",
                   "preprocessor_config.json")


# Top-level files that mark a folder as converted (Orbax, HF): uploaded last to a bucket.
_MARKERS = ("fusion_config.json", "config.json")


@contextlib.contextmanager
def staged_dir(dst: str, force: bool = False):
    """Yield a temporary folder that becomes `dst` only if the body succeeds. A local `dst`: the folder
    is beside it and renamed. A cloud URL (a bucket has no rename): a local temp folder, uploaded at the
    end with the marker files last, so a half-uploaded folder is never taken for a converted one."""
    dst = paths.absolute(dst.rstrip("/"))
    d = epath.Path(dst)
    if d.exists():
        if not d.is_dir():
            raise FileExistsError(f"--dst {dst} exists and is not a folder")
        if any(True for _ in d.iterdir()) and not force:
            raise FileExistsError(f"--dst {dst} is not empty; pass --force to overwrite it")
    if paths.is_url(dst):
        tmp = epath.Path(tempfile.mkdtemp(prefix="fusion_convert_"))
        try:
            yield str(tmp)
            if d.exists():
                d.rmtree()
            _upload(tmp, d)
        finally:
            tmp.rmtree()
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    tmp = d.parent / f".{d.name}.tmp-{os.getpid()}"
    if tmp.exists():
        tmp.rmtree()
    tmp.mkdir()
    try:
        yield str(tmp)
    except BaseException:
        tmp.rmtree(missing_ok=True)
        raise
    old = None
    if d.exists():
        old = d.parent / f".{d.name}.old-{os.getpid()}"
        d.rename(old)
    tmp.rename(d)
    if old:
        old.rmtree(missing_ok=True)


def _upload(src: epath.Path, dst: epath.Path):
    items = sorted(src.iterdir(), key=lambda p: p.name in _MARKERS)
    dst.mkdir(parents=True, exist_ok=True)
    for p in items:
        if p.is_dir():
            paths.copy_tree(p, dst / p.name)
        else:
            p.copy(dst / p.name, overwrite=True)


def progress(total_bytes: int, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc=desc,
                disable=os.environ.get("FUSION_NO_PROGRESS") == "1")


CORE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def has_tokenizer(folder: str) -> bool:
    return any(f in CORE_TOKENIZER_FILES for f in tokenizer_files(folder))


def tokenizer_files(folder: str) -> list[str]:
    if not folder or not paths.isdir(folder):
        return []
    return [f for f in TOKENIZER_FILES if (epath.Path(folder) / f).is_file()]


def copy_tokenizer(src: str, dst: str) -> list[str]:
    files = tokenizer_files(src)
    if files:
        epath.Path(dst).mkdir(parents=True, exist_ok=True)
        for f in files:
            (epath.Path(src) / f).copy(epath.Path(dst) / f, overwrite=True)
    return files
