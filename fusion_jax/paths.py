"""Paths that may be local or cloud URLs (`gs://bucket/...`): every workdir, checkpoint, data and output
path goes through etils.epath (as Orbax does), never os.path, so a `gs://` workdir stays a URL.

epath reaches `gs://` through fsspec's gcsfs, and Orbax's arrays through TensorStore's gcs driver; both
honour their documented endpoint settings (STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL).
"""
from __future__ import annotations

import os

from etils import epath


def is_url(path) -> bool:
    """A cloud URL (gs://, s3://, ...), as opposed to a local path."""
    return "://" in os.fspath(path)


def absolute(path) -> str:
    """A local path made absolute and normalized; a URL unchanged (os.path.abspath and pathlib would
    both turn gs://b into ./gs:/b). The one place where a local path meets os.path."""
    path = os.fspath(path)
    return path.rstrip("/") if is_url(path) else os.path.abspath(path)


def join(*parts) -> str:
    return os.fspath(epath.Path(*parts))


def isfile(path) -> bool:
    return epath.Path(path).is_file()


def isdir(path) -> bool:
    return epath.Path(path).is_dir()


def exists(path) -> bool:
    return epath.Path(path).exists()


def copy_tree(src, dst, *, overwrite: bool = True):
    """Copy a folder (files and subfolders) between any two epath locations, local or cloud."""
    src, dst = epath.Path(src), epath.Path(dst)
    if not is_url(src) and not is_url(dst) and dst.exists() and os.path.samefile(src, dst):
        return  # copying a folder onto itself would truncate its files
    dst.mkdir(parents=True, exist_ok=True)
    for p in src.iterdir():
        if p.is_dir():
            copy_tree(p, dst / p.name, overwrite=overwrite)
        elif overwrite or not (dst / p.name).exists():
            p.copy(dst / p.name, overwrite=True)


def write_text_atomic(path, text: str):
    """A whole small file: temp then rename locally; one object upload (atomic by itself) on a bucket."""
    path = epath.Path(path)
    if is_url(path):
        path.write_text(text)
        return
    tmp = path.parent / (path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
