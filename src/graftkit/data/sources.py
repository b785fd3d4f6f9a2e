"""Data given by name: ``tfds:NAME[:SPLIT]`` (TensorFlow Datasets) becomes an image folder.

The dataset's encoded images are written once, unchanged (no re-encoding), as
``<cache>/tfds/NAME/SPLIT/<class>/<index>.<ext>``, so everything graftkit does with a folder
(checks, skipped files, report thumbnails, export verification) works the same, and the data is
streamed to disk, never held in memory. Needs the extra: ``pip install 'graftkit[tfds]'``.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

from graftkit.defaults import cache_dir
from graftkit.errors import DataError, UsageError

PREFIX = "tfds:"


def is_tfds(spec: str | os.PathLike) -> bool:
    return str(spec).startswith(PREFIX)


def _extension(data: bytes) -> str:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
    except Exception:  # noqa: BLE001 - unreadable: written as is, then skipped with a reason
        return ".jpg"
    return {"jpeg": ".jpg", "png": ".png", "gif": ".gif", "bmp": ".bmp", "webp": ".webp"}.get(
        fmt, ".jpg")


def materialise_tfds(spec: str) -> Path:
    """``tfds:NAME[:SPLIT]`` -> a class folder in the cache (written on first use)."""
    parts = str(spec)[len(PREFIX):].split(":")
    if not parts[0] or len(parts) > 2:
        raise UsageError(f"{spec!r}: write tfds:NAME or tfds:NAME:SPLIT (e.g. tfds:cats_vs_dogs)")
    name, split = parts[0], (parts[1] if len(parts) == 2 else "train")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise UsageError("TensorFlow Datasets sources need the extra: "
                         "pip install 'graftkit[tfds]'") from None
    target = cache_dir() / "tfds" / name / split.replace("/", "_")
    if (target / ".complete").is_file():
        return target
    try:
        builder = tfds.builder(name)
        builder.download_and_prepare()
        info = builder.info
        image_key, label_key = info.supervised_keys or ("image", "label")
        ds = builder.as_dataset(split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as exc:  # offline download, unknown name or split
        raise DataError(
            f"TensorFlow Datasets could not provide {name}:{split} ({str(exc).splitlines()[0]}); "
            "prepare it once where the internet is reachable (or set TFDS_DATA_DIR to a folder "
            "that holds it), or pass an image folder"
        ) from None
    names = info.features[label_key].names
    tmp = target.with_name(f".{target.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for c in names:
        (tmp / c).mkdir(parents=True, exist_ok=True)
    for i, example in enumerate(tfds.as_numpy(ds)):
        data = example[image_key]
        label = names[int(example[label_key])]
        (tmp / label / f"{i:07d}{_extension(data)}").write_bytes(data)
    (tmp / ".complete").write_text(f"{name}:{split}\n")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return target
