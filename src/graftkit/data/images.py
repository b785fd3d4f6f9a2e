"""One image file: decoded, checked and fingerprinted the same way everywhere.

``load_image`` is the one decoder: training, ``graft predict`` and export all use it, so a raw
image at prediction time is processed exactly as in training.
"""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from graftkit import defaults
from graftkit.defaults import IMAGE_EXTENSIONS, IMAGE_FORMATS
from graftkit.errors import DataError

ORIENTATION = 0x0112  # the EXIF tag ImageOps.exif_transpose reads


class ImageTooLarge(ValueError):
    """More pixels than ``defaults.MAX_PIXELS``: refused before decoding."""



@dataclass
class ImageProbe:
    """What scanning learnt of one file: why it is unusable, or its size and fingerprints."""

    reason: str | None
    width: int = 0
    height: int = 0
    sha256: str = ""
    dhash: bytes = b""  # difference hash of the decoded image, for near-duplicates
    thumb: bytes = b""  # its 16x16 grayscale thumbnail: confirms a hash match by correlation



def load_image(path: str | os.PathLike | IO[bytes], size: int,
               max_pixels: int | None = None) -> np.ndarray:
    """Decode any supported image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; alpha is composited on white; 16-bit images are scaled, not
    clipped; JPEGs are decoded at reduced scale when much larger than ``size`` (draft mode).
    Only ``defaults.IMAGE_FORMATS`` are parsed; an image of more than ``max_pixels`` pixels
    (default ``defaults.MAX_PIXELS``) is refused before decoding (``ImageTooLarge``). No step
    copies the full-size image needlessly: a large upload costs one decoded image, not three.
    """
    with Image.open(path, formats=IMAGE_FORMATS) as img:
        if img.width * img.height > (max_pixels or defaults.MAX_PIXELS):
            raise ImageTooLarge(f"{img.width}x{img.height} pixels")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img.load()
        return model_pixels(img, size)


def model_pixels(img: Image.Image, size: int) -> np.ndarray:
    """An opened image as the model takes it: upright by its EXIF orientation, RGB (alpha on
    white, 16-bit scaled), resized whole to ``size`` bilinearly. ``load_image`` and images
    passed in memory (``graftkit.data.inputs``) both end here."""
    if img.getexif().get(ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    return np.asarray(_to_rgb(img).resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)



def jpeg_thumbnail(path: str | os.PathLike, size: int) -> bytes:
    """A ``size`` px JPEG of an image as the model sees it (``load_image``: same orientation,
    colours, squashing, pixel limit), for report.html and graft serve's review page."""
    import io

    buf = io.BytesIO()
    Image.fromarray(load_image(path, size)).save(buf, "JPEG", quality=85)
    return buf.getvalue()



def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")



HASH_SIDE = 16  # difference hash of HASH_SIDE**2 bits: 64 bits proved too coarse on photos



def _difference_hash(pixels: np.ndarray) -> bytes:
    gray = Image.fromarray(pixels).convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.Resampling.BILINEAR)
    a = np.asarray(gray, dtype=np.int16)
    return np.packbits(a[:, 1:] > a[:, :-1]).tobytes()


def _thumbnail(pixels: np.ndarray) -> bytes:
    gray = Image.fromarray(pixels).convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR)
    return np.asarray(gray, dtype=np.uint8).tobytes()



def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()



def probe_image(path: str) -> ImageProbe:
    """Decode ``path`` once; the reason it is unusable, or its size and fingerprints."""
    try:
        data = read_bytes(path)
        if not data:
            return ImageProbe("empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
        pixels = load_image(path, 32)
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the scan
        return ImageProbe(_unusable(exc, path))
    return ImageProbe(None, width, height, hashlib.sha256(data).hexdigest(),
                      _difference_hash(pixels), _thumbnail(pixels))


def decode_checked(path: str, size: int) -> np.ndarray | str:
    """``load_image``, or the reason the file cannot be used, in the scan's words: scoring
    decodes each file once, with no separate check before."""
    try:
        return load_image(path, size)
    except Exception as exc:  # noqa: BLE001 - one bad file must not stop the others
        if isinstance(exc, UnidentifiedImageError):  # what an empty file raises
            try:
                if os.path.getsize(path) == 0:
                    return "empty file (0 bytes)"
            except OSError:
                pass
        return _unusable(exc, path)


def _unusable(exc: Exception, path: str) -> str:
    """Why a file failed to decode, in words a user can act on."""
    if isinstance(exc, ImageTooLarge):
        return (f"too many pixels ({exc}; limit {defaults.MAX_PIXELS:,}): "
                "possible decompression bomb")
    if isinstance(exc, Image.DecompressionBombError):
        return "too many pixels: possible decompression bomb"
    if isinstance(exc, FileNotFoundError):
        return "file not found (dangling symbolic link?)"
    if isinstance(exc, PermissionError):
        return "permission denied: make the file readable"
    if isinstance(exc, IsADirectoryError):
        return "a folder named like an image"
    if isinstance(exc, OSError):  # Pillow's "cannot identify image file", truncated data, ELOOP...
        if exc.errno == errno.ELOOP:
            return "symbolic link loop"
        text = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip()
        return f"unreadable image: {text}"
    return f"unreadable image: {type(exc).__name__}: {exc}"



def check_image(path: str) -> str | None:
    """None when ``path`` decodes, else the reason it cannot be used."""
    return probe_image(path).reason


def expand_paths(paths: Iterable[str | os.PathLike], check: bool = True
                 ) -> tuple[list[str], list[dict[str, str]]]:
    """Files as given, folders walked for images; returns ``(images, skipped)``.

    With ``check``, every file is decoded once to be checked, on all cores (``check_images``);
    without, the caller decodes each file once later and skips the ones that fail then."""
    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += [str(f) for f in sorted(
                f for f in p.rglob("*")
                if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
                and not any(part.startswith(".") for part in f.relative_to(p).parts))]
        elif p.exists():
            files.append(str(p))
        else:
            raise DataError(f"no such file or folder: {p}")
    if not check:
        return files, []
    found, skipped = [], []
    for f, reason in zip(files, check_images(files)):
        if reason:
            skipped.append({"path": f, "reason": reason})
        else:
            found.append(f)
    return found, skipped


def check_images(files: list[str]) -> list[str | None]:
    """``check_image`` of each file, on all cores."""
    from concurrent.futures import ThreadPoolExecutor

    workers = min(os.cpu_count() or 1, len(files))
    if workers <= 1:
        return [check_image(f) for f in files]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check_image, files))
