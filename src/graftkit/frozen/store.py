"""The cache of frozen outputs and engines on disk: shards, their index, eviction, space.

Needs no TensorFlow, so ``graft cache`` answers at once. A cache whose disk fills up is a
speed problem, not an error: the run goes on without caching and says so once.
"""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graftkit import defaults
from graftkit.errors import DiskFullError
from graftkit.files import atomic_write

_FULL: set[str] = set()  # cache folders found full in this process


def writable() -> bool:
    """False once the cache's disk was found full: later writes are not tried."""
    return str(defaults.cache_dir()) not in _FULL


def cache_full(folder: Path) -> None:
    """Note a full cache disk once (on stderr) and stop writing to it for this process."""
    if str(defaults.cache_dir()) in _FULL:
        return
    _FULL.add(str(defaults.cache_dir()))
    print(f"warning: no space left in the cache folder {folder}: this run goes on without "
          f"caching (slower reruns); free some space or set ${defaults.CACHE_ENV} to a "
          "folder with room", file=sys.stderr, flush=True)


def cache_limit_bytes() -> int:
    return int(float(os.environ.get(defaults.CACHE_LIMIT_ENV, defaults.CACHE_LIMIT_GB)) * 1e9)


class FeatureStore:
    """Rows of frozen outputs on disk: one folder per (bottom, augmentation), shards in it.

    A shard is ``NAME.npy`` (rows) with ``NAME.json`` (the row keys, ``digest:view``). Shards
    are written atomically, touched when read, and the least recently used are deleted when the
    cache passes ``cache_limit_bytes()`` (``extract`` evicts after writing its shards).
    """

    def __init__(self, key: str, root: Path | None = None):
        self.root = (root or defaults.cache_dir()) / "features"
        self.dir = self.root / key

    def _index(self) -> dict[str, tuple[Path, int]]:
        index: dict[str, tuple[Path, int]] = {}
        if not self.dir.is_dir():
            return index
        for keys_file in sorted(self.dir.glob("*.json")):
            rows = keys_file.with_suffix(".npy")
            try:
                keys = json.loads(keys_file.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if rows.is_file():
                for i, k in enumerate(keys):
                    index[k] = (rows, i)
        return index

    def read(self, keys: Sequence[str]):
        """Yield ``(key, row)`` for the keys the store holds, one shard in memory at a time."""
        index = self._index()
        by_shard: dict[Path, list[str]] = {}
        for k in keys:
            if k in index:
                by_shard.setdefault(index[k][0], []).append(k)
        for shard, ks in by_shard.items():
            try:
                rows = np.load(shard, mmap_mode="r")
                picked = np.asarray(rows[np.array([index[k][1] for k in ks])])
                del rows
                os.utime(shard)
            except (OSError, ValueError, IndexError):
                continue  # a damaged shard: its rows are computed again
            yield from zip(ks, picked)

    def get(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        return dict(self.read(keys))

    def put(self, keys: list[str], rows: np.ndarray) -> None:
        """Store rows; a full disk disables caching for this process instead of failing."""
        if not keys or not writable():
            return
        name = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"

        def save(tmp):
            with open(tmp, "wb") as f:
                np.save(f, rows)

        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.dir / f"{name}.npy", save)
            atomic_write(self.dir / f"{name}.json",
                         lambda tmp: Path(tmp).write_text(json.dumps(keys), encoding="utf-8"))
        except DiskFullError:
            (self.dir / f"{name}.npy").unlink(missing_ok=True)  # rows without their keys
            cache_full(self.root.parent)


def cache_entries(root: Path | None = None) -> list[dict]:
    """Every cached engine and feature shard, with its size and last use."""
    root = root or defaults.cache_dir()
    out = []
    for kind, pattern in (("engine", "engines/*.tflite"), ("features", "features/*/*/*.npy")):
        for path in root.glob(pattern):
            try:
                st = path.stat()
            except OSError:
                continue
            size = st.st_size
            side = path.with_suffix(".json")
            if side.is_file():
                size += side.stat().st_size
            out.append({"kind": kind, "path": path, "bytes": size, "used": st.st_mtime,
                        "set": (f"{path.parent.parent.name}/{path.parent.name}"
                                if kind == "features" else path.stem)})
    return out


def _remove(entry: dict) -> None:
    entry["path"].unlink(missing_ok=True)
    entry["path"].with_suffix(".json").unlink(missing_ok=True)


def evict(limit: int, root: Path | None = None) -> int:
    """Delete least recently used entries until the cache fits ``limit`` bytes; bytes freed."""
    entries = sorted(cache_entries(root), key=lambda e: e["used"])
    total = sum(e["bytes"] for e in entries)
    freed = 0
    for entry in entries:
        if total - freed <= limit:
            break
        _remove(entry)
        freed += entry["bytes"]
    return freed


def clear(root: Path | None = None) -> int:
    """Delete every cached engine and feature shard; bytes freed."""
    return evict(-1, root)
