"""Image folders in, labelled streams out: scan, split, decode, augment.

Every file is decoded once while scanning, so an unreadable image is reported up front (in
``skipped``) instead of killing a training run half-way. Training then streams images through a
tf.data pipeline (parallel decode with the same ``load_image`` that ``predict`` uses, so a raw
image at prediction time is processed exactly as in training).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from graftkit import defaults
from graftkit.defaults import AUGMENT, IMAGE_EXTENSIONS, TRAIN_DIR_NAME, VAL_DIR_NAMES
from graftkit.errors import DataError, UsageError


class ImageTooLarge(ValueError):
    """More pixels than ``defaults.MAX_PIXELS``: refused before decoding."""


@dataclass
class Split:
    """One split: parallel lists of file paths and integer labels."""

    paths: list[str] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ImageFolder:
    """A scanned dataset: class names in label order, the two splits, and what was skipped."""

    root: Path
    classes: list[str]
    train: Split
    val: Split
    skipped: list[dict[str, str]]
    split_source: str  # "folders" (train/ and val/ given) or "seeded split of N%"
    probes: dict[str, ImageProbe] = field(default_factory=dict)
    fatal: list[str] = field(default_factory=list)  # filled instead of raising when not strict

    def digests(self, split: Split) -> list[str]:
        """Content digests of a split's files (what caches key on), from the scan."""
        out = []
        for path in split.paths:
            probe = self.probes.get(path)
            out.append(probe.sha256 if probe and probe.sha256
                       else hashlib.sha256(_read_bytes(path)).hexdigest())
        return out


@dataclass
class ImageProbe:
    """What scanning learnt of one file: why it is unusable, or its size and fingerprints."""

    reason: str | None
    width: int = 0
    height: int = 0
    sha256: str = ""
    dhash: bytes = b""  # difference hash of the decoded image, for near-duplicates


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """Decode any supported image to a ``(size, size, 3)`` uint8 RGB array.

    EXIF orientation is applied; alpha is composited on white; 16-bit images are scaled, not
    clipped; JPEGs are decoded at reduced scale when much larger than ``size`` (draft mode).
    """
    with Image.open(path) as img:
        if img.width * img.height > defaults.MAX_PIXELS:
            raise ImageTooLarge(f"{img.width}x{img.height} pixels")
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
        img = img.resize((size, size), Image.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
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
    gray = Image.fromarray(pixels).convert("L").resize((HASH_SIDE + 1, HASH_SIDE), Image.BILINEAR)
    a = np.asarray(gray, dtype=np.int16)
    return np.packbits(a[:, 1:] > a[:, :-1]).tobytes()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def probe_image(path: str) -> ImageProbe:
    """Decode ``path`` once; the reason it is unusable, or its size and fingerprints."""
    try:
        data = _read_bytes(path)
        if not data:
            return ImageProbe("empty file (0 bytes)")
        with Image.open(path) as img:
            width, height = img.size
        pixels = load_image(path, 32)
    except ImageTooLarge as exc:
        return ImageProbe(f"too many pixels ({exc}; limit {defaults.MAX_PIXELS:,}): "
                          "possible decompression bomb")
    except Image.DecompressionBombError:
        return ImageProbe("too many pixels: possible decompression bomb")
    except FileNotFoundError:
        return ImageProbe("file not found (dangling symbolic link?)")
    except PermissionError:
        return ImageProbe("permission denied: make the file readable")
    except IsADirectoryError:
        return ImageProbe("a folder named like an image")
    except OSError as exc:  # Pillow's "cannot identify image file", truncated data, ELOOP...
        if exc.errno == errno.ELOOP:
            return ImageProbe("symbolic link loop")
        text = str(exc).replace(f"'{path}'", "").replace(str(path), "").strip()
        return ImageProbe(f"unreadable image: {text}")
    except Exception as exc:  # noqa: BLE001 - a decoder bug must not kill the scan
        return ImageProbe(f"unreadable image: {type(exc).__name__}: {exc}")
    return ImageProbe(None, width, height, hashlib.sha256(data).hexdigest(),
                      _difference_hash(pixels))


def check_image(path: str) -> str | None:
    """None when ``path`` decodes, else the reason it cannot be used."""
    return probe_image(path).reason


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def _check_class_name(name: str, where: Path) -> None:
    """Class names end up in file names of reports and exports: keep them plain."""
    if name in (".", "..") or any(c in name for c in "/\\\0") or not name.isprintable():
        raise DataError(f"class folder name {name!r} in {where} is not usable: rename it")


def _list_files(class_dir: Path, skipped: list[dict[str, str]]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=False):
        for name in [d for d in dirnames if _is_hidden(d)]:
            skipped.append({"path": str(Path(dirpath) / name), "reason": "hidden folder"})
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        for name in sorted(filenames):
            target = files if not _is_hidden(name) else None
            if target is None:
                skipped.append({"path": str(Path(dirpath) / name), "reason": "hidden file"})
            else:
                target.append(Path(dirpath) / name)
    return files


def _class_dirs(folder: Path, skipped: list[dict[str, str]]) -> list[Path]:
    dirs = []
    for p in sorted(folder.iterdir()):
        if not p.is_dir():
            continue
        if _is_hidden(p.name):
            skipped.append({"path": str(p), "reason": "hidden folder"})
            continue
        _check_class_name(p.name, folder)
        dirs.append(p)
    return dirs


def _probe_candidates(candidates: dict[str, list[str]], skipped: list[dict[str, str]],
                      probes: dict[str, ImageProbe] | None, progress=None) -> dict[str, list[str]]:
    """Decode every candidate once (in threads); keep the readable ones.

    ``progress(label, total)`` may return a ``graftkit.progress.Progress`` to report to.
    """
    all_paths = [p for ps in candidates.values() for p in ps]
    bar = progress("scanning images", len(all_paths)) if progress else None
    found = {}
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) * 2)) as pool:
        for path, probe in zip(all_paths, pool.map(probe_image, all_paths)):
            found[path] = probe
            if bar is not None:
                bar.update(len(found))
    if bar is not None:
        bar.close()
    if probes is not None:
        probes.update(found)
    result = {}
    for name, paths in candidates.items():
        for p in paths:
            if found[p].reason:
                skipped.append({"path": p, "reason": found[p].reason})
        result[name] = [p for p in paths if not found[p].reason]
    return result


def scan_classes(folder: Path, skipped: list[dict[str, str]],
                 probes: dict[str, ImageProbe] | None = None,
                 progress=None) -> dict[str, list[str]]:
    """``{class: [readable image paths]}``; everything else goes to ``skipped`` with a reason."""
    if folder.is_file():
        return scan_table(folder, skipped, probes, progress)
    candidates: dict[str, list[str]] = {}
    for class_dir in _class_dirs(folder, skipped):
        paths = []
        for f in _list_files(class_dir, skipped):
            if f.suffix.lower() not in IMAGE_EXTENSIONS:
                ext = f.suffix or "no extension"
                skipped.append({"path": str(f), "reason": f"not an image file ({ext})"})
            else:
                paths.append(str(f))
        candidates[class_dir.name] = paths
    return _probe_candidates(candidates, skipped, probes, progress)


def scan_table(table: Path, skipped: list[dict[str, str]],
               probes: dict[str, ImageProbe] | None = None, progress=None) -> dict[str, list[str]]:
    """A CSV or TSV of ``path,label`` rows (a header row is optional; paths relative to it)."""
    import csv

    delimiter = "\t" if table.suffix.lower() == ".tsv" else ","
    try:
        with open(table, encoding="utf-8-sig", newline="") as f:
            rows = [r for r in csv.reader(f, delimiter=delimiter) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {table}: {exc}") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] == ["path", "label"]:
        rows = rows[1:]
    candidates: dict[str, list[str]] = {}
    for n, row in enumerate(rows, start=1):
        if len(row) < 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{table} row {n}: expected 'path{delimiter}label', got {row!r}")
        path, label = row[0].strip(), row[1].strip()
        _check_class_name(label, table)
        full = Path(path) if os.path.isabs(path) else table.parent / path
        if full.suffix.lower() not in IMAGE_EXTENSIONS:
            skipped.append({"path": str(full), "reason": f"not an image file ({full.suffix})"})
            continue
        candidates.setdefault(label, []).append(str(full))
    return _probe_candidates(dict(sorted(candidates.items())), skipped, probes, progress)


def require_classes(by_class: dict[str, list[str]], where: Path) -> None:
    if not by_class:
        raise DataError(
            f"{where} has no class subfolders: put the images of each class in {where}/<class>/"
        )
    empty = [c for c, ps in by_class.items() if not ps]
    if empty:
        raise DataError(
            f"class folder {where / empty[0]} has no readable image: add images or remove the folder"
        )
    if len(by_class) < 2:
        raise DataError(f"{where} has only one class ({next(iter(by_class))}): a classifier needs at least 2")


def _seeded_split(by_class: dict[str, list[str]], val_split: float, seed: int) -> tuple[Split, Split]:
    rng = random.Random(seed)
    train, val = Split(), Split()
    for label, name in enumerate(by_class):
        paths = list(by_class[name])
        rng.shuffle(paths)
        n_val = int(round(len(paths) * val_split))
        if len(paths) >= 2:
            n_val = min(max(n_val, 1), len(paths) - 1)
        else:
            n_val = 0
        for i, p in enumerate(paths):
            target = val if i < n_val else train
            target.paths.append(p)
            target.labels.append(label)
    return train, val


def _as_split(by_class: dict[str, list[str]], classes: list[str]) -> Split:
    split = Split()
    for name, paths in by_class.items():
        split.paths.extend(paths)
        split.labels.extend([classes.index(name)] * len(paths))
    return split


def find_split_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(train, val)`` folders when ``root`` holds them, else None."""
    train = root / TRAIN_DIR_NAME
    for name in VAL_DIR_NAMES:
        if train.is_dir() and (root / name).is_dir():
            return train, root / name
    return None


TABLE_SUFFIXES = (".csv", ".tsv")


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(path)))


def check_data_path(data: str | os.PathLike, what: str = "data folder") -> None:
    """A labelled data source exists and is of a kind graftkit reads (no TensorFlow needed)."""
    from graftkit.sources import is_tfds

    if is_tfds(data):
        return
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"{what} not found: {path}")
    if path.is_file() and path.suffix.lower() not in TABLE_SUFFIXES:
        kind = "an image" if path.suffix.lower() in IMAGE_EXTENSIONS else "a file"
        raise DataError(f"{path} is {kind}, not a {what}: pass a folder with one subfolder per "
                        "class, or a .csv/.tsv of path,label rows"
                        + (" (graft predict takes single images)" if kind == "an image" else ""))


def scan(data_dir: str | os.PathLike, val_split: float = 0.2, seed: int = 1337,
         strict: bool = True, val: str | os.PathLike | None = None,
         progress=None) -> ImageFolder:
    """Scan and check every image of a dataset.

    ``data_dir`` is a class folder, a folder with ``train/`` and ``val/`` class folders, a
    CSV/TSV of ``path,label`` rows, or ``tfds:NAME[:SPLIT]``. ``val`` (a class folder, CSV or
    ``tfds:`` name) gives the validation set explicitly; without it and without ``val/``, a
    stratified seeded split is made. With ``strict=False`` a fatal problem (fewer than two
    classes, a class without a readable image) is recorded in ``fatal`` instead of raised, for
    ``graft check`` to report.
    """
    from graftkit.sources import is_tfds, materialise_tfds

    check_data_path(data_dir)
    if val is not None:
        check_data_path(val, "validation data")
    if not 0.0 < val_split < 1.0:
        raise UsageError(f"--val-split must be between 0 and 1 (got {val_split})")
    # Absolute paths: the run folder's split, predictions and report work from any folder.
    root = materialise_tfds(str(data_dir)) if is_tfds(data_dir) else _absolute(data_dir)
    if val is not None:
        val = materialise_tfds(str(val)) if is_tfds(val) else _absolute(val)
    skipped: list[dict[str, str]] = []
    probes: dict[str, ImageProbe] = {}
    fatal: list[str] = []

    def fail(message: str) -> None:
        if strict:
            raise DataError(message)
        fatal.append(message)

    def require(by_class, where):
        try:
            require_classes(by_class, where)
        except DataError as exc:
            fail(str(exc))

    dirs = find_split_dirs(root) if root.is_dir() else None
    train_src = dirs[0] if dirs else root
    val_src = Path(val) if val is not None else (dirs[1] if dirs else None)
    train_by_class = scan_classes(train_src, skipped, probes, progress)
    require(train_by_class, train_src)
    classes = list(train_by_class)
    if val_src is None:
        train, val_split_ = _seeded_split(train_by_class, val_split, seed)
        if len(val_split_) == 0 and not fatal:
            fail(f"{root} has too few images for a validation split: add images")
        return ImageFolder(root, classes, train, val_split_, skipped,
                           f"seeded split ({val_split:.0%} validation, seed {seed})", probes,
                           fatal)
    val_by_class = scan_classes(val_src, skipped, probes, progress)
    unknown = sorted(set(val_by_class) - set(classes))
    if unknown:
        fail(f"{val_src} has classes missing from {train_src}: {', '.join(unknown)}; "
             "use the same class names in both")
        val_by_class = {c: ps for c, ps in val_by_class.items() if c in classes}
    val_items = _as_split(val_by_class, classes)
    if len(val_items) == 0 and not fatal:
        fail(f"{val_src} has no readable image: add validation images")
    source = "folders" if dirs and val is None else f"validation from {val_src}"
    return ImageFolder(root, classes, _as_split(train_by_class, classes), val_items, skipped,
                       source, probes, fatal)


def parse_augment(spec: str | None) -> dict[str, float | bool]:
    """``"flip,rotation=0.1,zoom=0.2"`` -> settings; ``"none"`` or empty -> no augmentation."""
    if spec is None:
        return dict(AUGMENT)
    settings: dict[str, float | bool] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        if part == "none":
            return {}
        key, _, value = part.partition("=")
        if key not in AUGMENT:
            raise UsageError(f"unknown augmentation {key!r} in --augment; use {', '.join(AUGMENT)}")
        if key == "flip":
            settings[key] = True
            continue
        try:
            settings[key] = float(value) if value else float(AUGMENT[key])
        except ValueError:
            raise UsageError(f"--augment {key}={value!r} is not a number") from None
    return settings


def augment_image(image: np.ndarray, seed: int, settings: dict[str, float | bool]) -> np.ndarray:
    """One random view of a uint8 image, fully decided by ``seed``.

    The same function serves per-epoch augmentation and the cached augmented views, and a view
    depends only on its seed (not on batch or thread order), so cached views of an image are
    reusable across runs. Flip is horizontal; rotation is a fraction of a full turn, zoom a
    fraction of the side, contrast a fraction of the per-channel spread (the Keras layers'
    meanings); empty corners are filled by reflection, as Keras does.
    """
    rng = np.random.default_rng(seed)
    flip = bool(settings.get("flip")) and rng.random() < 0.5
    rotation = float(settings.get("rotation") or 0.0)
    zoom = float(settings.get("zoom") or 0.0)
    contrast = float(settings.get("contrast") or 0.0)
    angle = rng.uniform(-rotation, rotation) * 2 * np.pi
    scale = 1.0 + rng.uniform(-zoom, zoom)  # > 1 shows a larger area (zoom out)
    factor = 1.0 + rng.uniform(-contrast, contrast)
    out = image[:, ::-1] if flip else image
    if angle or scale != 1.0:
        h, w = out.shape[:2]
        pad = (h // 2, w // 2)
        padded = Image.fromarray(np.pad(out, (pad, pad, (0, 0)), mode="reflect"))
        cos, sin = np.cos(angle) * scale, np.sin(angle) * scale
        cx, cy = w / 2 + pad[1], h / 2 + pad[0]
        # Output pixel (x, y) samples the padded input at centre + R(angle) * scale * offset.
        matrix = (cos, -sin, cx - cos * w / 2 + sin * h / 2,
                  sin, cos, cy - sin * w / 2 - cos * h / 2)
        out = np.asarray(padded.transform((w, h), Image.AFFINE, matrix, Image.BILINEAR))
    if factor != 1.0:
        mean = out.reshape(-1, 3).mean(axis=0)
        out = np.clip((out - mean) * factor + mean, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(out)


def view_seed(digest: str, view: int) -> int:
    """The seed of augmented view ``view`` of the image with content digest ``digest``."""
    return int.from_bytes(hashlib.sha256(f"{digest}:{view}".encode()).digest()[:8], "little")


class DecodedImages:
    """Every image of a split decoded and resized once, so epochs do no JPEG work.

    Held in memory up to ``budget`` bytes, beyond that in a memory-mapped file in ``spill_dir``
    (removed by ``close``). Decoding runs on all cores (Pillow releases the GIL).
    """

    def __init__(self, paths: Sequence[str], size: int, budget: int | None = None,
                 spill_dir: Path | None = None, progress=None):
        import tempfile

        self.paths, self.size = list(paths), size
        shape = (len(self.paths), size, size, 3)
        nbytes = int(np.prod(shape))
        budget = defaults.DECODED_MEMORY_BUDGET if budget is None else budget
        self._file = None
        if nbytes > budget:
            folder = spill_dir or defaults.cache_dir()
            folder.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="decoded-", suffix=".u8", dir=folder)
            os.close(fd)
            self._file = Path(name)
            self.array = np.memmap(self._file, dtype=np.uint8, mode="w+", shape=shape)
        else:
            self.array = np.empty(shape, dtype=np.uint8)

        def work(i: int) -> None:
            self.array[i] = load_image(self.paths[i], size)

        bar = progress("decoding training images", len(self.paths)) if progress else None
        with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
            for i, _ in enumerate(pool.map(work, range(len(self.paths))), start=1):
                if bar is not None:
                    bar.update(i)
        if bar is not None:
            bar.close()

    def __len__(self) -> int:
        return len(self.paths)

    def close(self) -> None:
        if self._file is not None:
            del self.array
            self._file.unlink(missing_ok=True)
            self._file = None


def make_dataset(
    images: Sequence[str] | DecodedImages,
    labels: Sequence[int] | None,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    augment: dict[str, float | bool] | None = None,
    seed: int = 1337,
    drop_remainder: bool = False,
):
    """A prefetched tf.data stream of ``(float32 0-255 images, labels)`` batches.

    ``images`` are file paths (decoded in parallel by ``load_image``) or a ``DecodedImages``.
    ``augment`` settings apply ``augment_image`` with a fresh seed per image and epoch.
    """
    import tensorflow as tf

    from graftkit.distribute import shard_by_data

    decoded = images if isinstance(images, DecodedImages) else None
    if decoded is not None:
        source = np.arange(len(decoded), dtype=np.int64)

        def fetch(i, s):
            img = decoded.array[int(i)]
            return augment_image(img, int(s), augment) if augment else np.asarray(img)
    else:
        source = list(images)

        def fetch(p, s):
            img = load_image(p.decode(), image_size)
            return augment_image(img, int(s), augment) if augment else img

    def decode(item, s):
        img = tf.numpy_function(fetch, [item, s], tf.uint8)
        img.set_shape((image_size, image_size, 3))
        return tf.cast(img, tf.float32)

    count = len(source)
    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(source)
        ds = ds.map(lambda p: decode(p, tf.constant(0, tf.int64)),
                    num_parallel_calls=tf.data.AUTOTUNE)
        return shard_by_data(ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))
    ds = tf.data.Dataset.from_tensor_slices((source, np.asarray(labels, dtype=np.int32)))
    if shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    # One random seed per image and epoch, independent of the order parallel calls finish in.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(lambda py, s: (decode(py[0], s), py[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return shard_by_data(ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))
