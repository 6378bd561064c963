"""Safe image loading and the reference's `static_hd` crops (mm_utils.split_image).

Loading never trusts the file: the path must stay inside the image folder (symlinks included),
only a regular file under a byte cap is opened (a FIFO would block the reader, a device could
stream forever), the pixel count is checked from the header before any decoding (decompression
bombs), truncated files are rejected instead of being grey-filled, and odd modes (CMYK, RGBA,
LA, P, 16-bit) plus EXIF orientation are converted. Each failure raises ImageError with a skip reason.
"""
from __future__ import annotations

import io
import os
import stat
import struct
import warnings

import numpy as np
from etils import epath
from PIL import Image, ImageOps, UnidentifiedImageError

from fusion_jax import paths

DEFAULT_MAX_PIXELS = 100_000_000
DEFAULT_MAX_FILE_BYTES = 256 << 20  # a 100 MP PNG fits; a multi-GB mistake is never read

# Exact float32 values of the processor's rescale (float64 * 1/255, cast) then (x - 0.5) / 0.5.
_RESCALED = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
NORM_LUT = ((_RESCALED - np.float32(0.5)) / np.float32(0.5)).astype(np.float32)


class ImageError(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def resolve_image_path(image_folder: str | None, rel: str) -> str:
    """Join a record's relative image path to the folder, refusing anything that escapes it."""
    if not isinstance(rel, str) or not rel.strip():
        raise ImageError("bad_value", f"image path {rel!r} is not a non-empty string")
    if os.path.isabs(rel) or rel.startswith(("/", "\\")) or (len(rel) > 1 and rel[1] == ":"):
        raise ImageError("unsafe_image_path", f"absolute image path {rel!r}")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise ImageError("unsafe_image_path", f"image path {rel!r} leaves the image folder")
    if image_folder is None:
        raise ImageError("missing_image", f"{rel!r}: no image folder configured")
    path = paths.join(image_folder, rel)
    if paths.is_url(image_folder):
        return path  # bucket objects have no links; read_image_file checks their size
    root, real = os.path.realpath(image_folder), os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise ImageError("image_link_escapes", f"{path} resolves to {real}, outside the image folder {root}")
    return path


def _check_file(st: os.stat_result, path: str, max_bytes: int):
    if not stat.S_ISREG(st.st_mode):
        kind = ("directory" if stat.S_ISDIR(st.st_mode) else "FIFO" if stat.S_ISFIFO(st.st_mode) else
                "device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "special file")
        raise ImageError("not_a_regular_file", f"{path} is a {kind}")
    if st.st_size > max_bytes:
        raise ImageError("image_file_too_large", f"{path}: {st.st_size} bytes > {max_bytes}")


def read_image_file(path: str, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """The bytes of a regular file of at most max_bytes; anything else is refused from its metadata."""
    if paths.is_url(path):
        return _read_object(path, max_bytes)
    try:
        _check_file(os.stat(path), path, max_bytes)
        # O_NONBLOCK: a file swapped for a FIFO after the stat cannot block the open either.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except (FileNotFoundError, NotADirectoryError):
        raise ImageError("missing_image", f"{path} does not exist") from None
    except OSError as e:
        raise ImageError("missing_image", f"{path}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        _check_file(os.fstat(f.fileno()), path, max_bytes)  # what was opened, not just what was stat'ed
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew after the check
        raise ImageError("image_file_too_large", f"{path}: over {max_bytes} bytes")
    if not data:
        raise ImageError("empty_image", f"{path} is empty")
    return data


def _read_object(path: str, max_bytes: int) -> bytes:
    """A cloud object: its size checked from its metadata before it is read."""
    p = epath.Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ImageError("missing_image", f"{path} does not exist") from None
    if st.is_directory:
        raise ImageError("not_a_regular_file", f"{path} is a directory")
    if st.length > max_bytes:
        raise ImageError("image_file_too_large", f"{path}: {st.length} bytes > {max_bytes}")
    with p.open("rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageError("image_file_too_large", f"{path}: over {max_bytes} bytes")
    if not data:
        raise ImageError("empty_image", f"{path} is empty")
    return data


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # PIL's convert("RGB") clips 16-bit values at 255 (a white image); scale instead.
        a = np.asarray(img).astype(np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
        img = Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img), 0, 255).astype(np.uint8), "L")
    if img.mode != "RGB":
        # CMYK, RGBA, LA, P, L, 1, YCbCr: PIL's conversion, as the reference's .convert("RGB").
        img = img.convert("RGB")
    return img


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, exif_transpose: bool = True,
                 name: str = "<bytes>") -> Image.Image:
    if not data:
        raise ImageError("empty_image", f"{name} is empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb / palette warnings: handled below
        try:
            img = Image.open(io.BytesIO(data))  # reads the header only
        except Image.DecompressionBombError as e:
            raise ImageError("image_too_large", f"{name}: {e}") from None
        except (UnidentifiedImageError, ValueError, SyntaxError, OSError) as e:
            reason = "truncated_image" if "truncat" in str(e).lower() else "not_an_image"
            raise ImageError(reason, f"{name}: {e}") from None
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError("not_an_image", f"{name}: size {w}x{h}")
        if w * h > max_pixels:
            raise ImageError("image_too_large", f"{name}: {w}x{h} = {w * h} pixels > {max_pixels}")
        try:
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            img = _to_rgb(img)
        except Image.DecompressionBombError as e:
            raise ImageError("image_too_large", f"{name}: {e}") from None
        except OSError as e:
            reason = "truncated_image" if "truncat" in str(e).lower() else "corrupt_image"
            raise ImageError(reason, f"{name}: {e}") from None
        except (ValueError, SyntaxError, EOFError, IndexError, struct.error) as e:
            raise ImageError("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    return img


def main_view_uint8(img: Image.Image, size: int) -> np.ndarray:
    """[S, S, 3] uint8: the whole image at S, the last of ``static_hd_crops_uint8``'s crops."""
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)


def static_hd_crops_uint8(img: Image.Image, size: int) -> np.ndarray:
    """[5, S, S, 3] uint8: the 2x2 tiles of the image resized to 2S (row-major), then the whole at S."""
    big = img.resize((2 * size, 2 * size), Image.Resampling.BICUBIC)
    tiles = [np.asarray(big.crop((x, y, x + size, y + size)), dtype=np.uint8) for y in (0, size) for x in (0, size)]
    return np.stack(tiles + [main_view_uint8(img, size)])


def normalize_crops(crops_u8: np.ndarray) -> np.ndarray:
    """[..., S, S, 3] uint8 -> [..., 3, S, S] float32, rescale 1/255 then mean/std 0.5."""
    # take() over the channel-first view writes a contiguous result in one pass (2x faster).
    return NORM_LUT.take(np.moveaxis(crops_u8, -1, -3))


def static_hd_crops(img: Image.Image, size: int) -> np.ndarray:
    return normalize_crops(static_hd_crops_uint8(img, size))


def zero_crops(size: int) -> np.ndarray:
    return np.zeros((5, 3, size, size), np.float32)
