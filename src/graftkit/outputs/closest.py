"""Which training images an image resembles: the nearest training images by the final model's
features, with small thumbnails kept in the run folder.

The same features the open-set score compares (penultimate, L2-normalised), with the path and
label of each row, so an answer can show "it looks like these". The thumbnails are one JPEG grid
(``closest.jpg``, ``TILE`` px per image) so the report and the server show them without the data
folder. Large training sets keep a fixed sample of ``defaults.CLOSEST_MAX_IMAGES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graftkit import defaults
from graftkit.outputs.open_set import normalise

FILE = "closest.npz"
SPRITE = "closest.jpg"
TILE = 64  # px, side of a thumbnail
COLUMNS = 64  # thumbnails per row of the grid


@dataclass
class Closest:
    """Normalised features of training images, with their paths and labels."""

    features: np.ndarray  # (n, d) float16, unit length
    paths: list[str]
    labels: list[str]

    def query(self, features: np.ndarray, k: int = 3) -> list[list[dict]]:
        """The ``k`` nearest training images of each row: path, label, cosine similarity and
        the row (``index``, the thumbnail's place), most similar first."""
        bank = self.features.astype(np.float32)
        k = max(0, min(k, len(bank)))
        out = []
        for i in range(0, len(features), 256):  # bounded memory for large banks
            sims = normalise(features[i: i + 256]) @ bank.T
            for row in sims:
                order = np.argsort(-row, kind="stable")[:k]
                out.append([{"path": self.paths[j], "label": self.labels[j],
                             "similarity": round(float(row[j]), 4), "index": int(j)}
                            for j in order])
        return out

    def save(self, run_dir: Path, thumbnails: np.ndarray) -> None:
        from graftkit.files import atomic_write

        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, features=self.features, paths=np.array(self.paths, dtype=np.str_),
                         labels=np.array(self.labels, dtype=np.str_))

        atomic_write(run_dir / FILE, write)
        _save_sprite(run_dir / SPRITE, thumbnails)

    @classmethod
    def load(cls, run_dir: str | os.PathLike | None) -> Closest | None:
        """The run's bank; None for runs made before it existed."""
        path = Path(run_dir) / FILE if run_dir is not None else None
        if path is None or not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            return cls(data["features"], [str(p) for p in data["paths"]],
                       [str(x) for x in data["labels"]])


def build(features: np.ndarray, paths: Sequence[str], labels: Sequence[str],
          log: Callable[[str], None] | None = None) -> tuple[Closest, np.ndarray]:
    """The bank of the training images (a fixed sample beyond the limit) and their thumbnails,
    decoded on every core."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    from graftkit.data.images import load_image

    start = time.perf_counter()
    rows = list(range(len(paths)))
    if len(rows) > defaults.CLOSEST_MAX_IMAGES:
        rows = sorted(int(i) for i in np.random.RandomState(0).choice(
            len(rows), defaults.CLOSEST_MAX_IMAGES, replace=False))

    def thumb(i: int) -> np.ndarray:
        try:
            return load_image(paths[i], TILE)
        except Exception:  # noqa: BLE001 - a file changed since the scan: a grey tile
            return np.full((TILE, TILE, 3), 128, np.uint8)

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        thumbnails = np.stack(list(pool.map(thumb, rows))) if len(rows) else \
            np.zeros((0, TILE, TILE, 3), np.uint8)
    bank = Closest(normalise(np.asarray(features)[rows]).astype(np.float16),
                   [str(paths[i]) for i in rows], [str(labels[i]) for i in rows])
    if log is not None:
        log(f"closest training images: {len(rows)} kept with thumbnails "
            f"({time.perf_counter() - start:.1f} s)")
    return bank, thumbnails


def _save_sprite(path: Path, thumbnails: np.ndarray) -> None:
    from PIL import Image

    from graftkit.files import atomic_write

    n = len(thumbnails)
    rows = max(1, -(-n // COLUMNS))
    grid = np.full((rows * TILE, min(max(n, 1), COLUMNS) * TILE, 3), 255, np.uint8)
    for i, tile in enumerate(thumbnails):
        r, c = divmod(i, COLUMNS)
        grid[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tile
    atomic_write(path, lambda tmp: Image.fromarray(grid).save(tmp, format="JPEG", quality=85))


class Thumbnails:
    """The thumbnails of a run's bank: ``closest.jpg`` decoded once, each thumbnail cut out
    and encoded once (the report and the server ask for the same ones again and again)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / SPRITE
        self._grid: np.ndarray | None = None
        self._jpeg: dict[int, bytes] = {}

    def pixels(self, index: int) -> np.ndarray:
        """One training image's thumbnail (uint8 RGB, ``TILE`` px); ``IndexError`` past the
        grid, ``OSError`` without it."""
        if self._grid is None:
            from PIL import Image

            with Image.open(self.path) as grid:
                self._grid = np.asarray(grid.convert("RGB"))
        r, c = divmod(int(index), COLUMNS)
        if (r + 1) * TILE > self._grid.shape[0] or (c + 1) * TILE > self._grid.shape[1]:
            raise IndexError(f"no thumbnail {index} in {SPRITE}")
        return self._grid[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE]

    def jpeg(self, index: int) -> bytes:
        """The same as a JPEG, as pages embed it."""
        if index not in self._jpeg:
            from graftkit.outputs.heatmaps import jpeg_bytes

            self._jpeg[index] = jpeg_bytes(self.pixels(index), quality=80)
        return self._jpeg[index]


def thumbnail(run_dir: str | os.PathLike, index: int) -> np.ndarray:
    """One training image's thumbnail from the grid (uint8 RGB, ``TILE`` px)."""
    return Thumbnails(run_dir).pixels(index)
