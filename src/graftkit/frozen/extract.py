"""Frozen outputs for every image and view: read from the cache, or computed and cached.

The cache (``graftkit.frozen.store``) is keyed by the frozen part's weights, input size, the
engine that computes it and each file's content digest, so a second ``graft fit`` on the same
images skips the base. Views of an image are decided by its digest, not by the run's seed, so
they are reusable too. A row's value depends only on the image, the view and the engine (never on
which rows were computed with it), so a run trains on the same inputs whatever ran before it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from graftkit import defaults
from graftkit.data.augment import augment_image, view_seed
from graftkit.data.images import load_image
from graftkit.data.pipeline import prefetched
from graftkit.frozen.engine import FrozenPart
from graftkit.frozen.rows import DiskRows, rows_for
from graftkit.frozen.store import FeatureStore, cache_limit_bytes, evict

if TYPE_CHECKING:
    from graftkit.progress import ProgressFactory

CHUNK = 64  # images decoded ahead while the bottom runs



SHARD_ROWS = 2048  # rows per cache file: a bounded copy when writing, a bounded read later



def _augment_key(augment: dict | None) -> str:
    if not augment:
        return "plain"
    text = json.dumps(augment, sort_keys=True)
    return "aug-" + hashlib.sha256(text.encode()).hexdigest()[:12]



@dataclass
class Extracted:
    """Frozen outputs for one split: ``views[v][k]`` is output ``k`` of view ``v`` per image.

    Each is an array, or ``DiskRows`` beyond ``defaults.FEATURE_MEMORY_BUDGET``.
    """

    views: list[list[np.ndarray | DiskRows]]
    computed: int  # images x views the frozen part had to run for (the rest: from the cache)
    seconds: float

    def output(self, k: int) -> list[np.ndarray | DiskRows]:
        """Output ``k`` of every view."""
        return [v[k] for v in self.views]

    @property
    def on_disk(self) -> bool:
        return any(isinstance(a, DiskRows) for v in self.views for a in v)



def _stores(store_key: str | None, augment: dict | None):
    """``store(k, v)``: the cache folder of output ``k`` of view ``v`` (None: no caching)."""
    def store(k: int, v: int) -> FeatureStore | None:
        if not store_key:
            return None
        return FeatureStore(f"{store_key}/{k}-{'plain' if v == 0 else _augment_key(augment)}")

    return store



def _read_stored(out, store, digests: Sequence[str], views: int,
                 outputs: int) -> set[tuple[int, int]]:
    """Fill ``out`` with the rows the cache holds; the ``(image, view)`` places it filled.

    Identical files share their rows; a place counts only when every output of it was found.
    """
    have: set[tuple[int, int]] = set()
    for group in ([0], list(range(1, views))):
        if not group:
            continue
        keys: dict[str, list[tuple[int, int]]] = {}
        for i in range(len(digests)):
            for v in group:
                keys.setdefault(f"{digests[i]}:{v}", []).append((i, v))
        complete = set(keys)
        for k in range(outputs):  # rows go straight to their place: no second copy
            seen = set()
            for key, row in store(k, group[0]).read(list(keys)):
                for i, v in keys[key]:
                    out[v][k][i] = row
                seen.add(key)
            complete &= seen
        have.update(place for key in complete for place in keys[key])
    return have



def _compute(frozen: FrozenPart, out, todo: dict[int, list[int]], prepare, bar,
             label=None, planned: str | None = None) -> set[int]:
    """Run the frozen part on every view in ``todo``, decoding two chunks ahead on all cores;
    the images whose rows another engine computed (after a fallback): not to be cached under
    the planned engine's name."""
    outputs = len(frozen.output_shapes)
    others: set[int] = set()
    done = 0
    for chunk in prefetched(prepare, sorted(todo), CHUNK):
        batch = np.stack([view for _, views_of in chunk for view in views_of],
                         dtype=np.float32)  # one copy, not a uint8 batch and then a cast
        results = frozen(batch)
        if planned is not None and frozen.store_key != planned:
            others.update(i for i, _ in chunk)
        r = 0
        for i, _ in chunk:
            for v in todo[i]:
                for k in range(outputs):
                    out[v][k][i] = results[k][r]
                r += 1
        done += len(chunk)
        if bar is not None:
            if label:
                bar.label = label()  # names the engine once it is chosen
            bar.update(done)
    if bar is not None:
        bar.close()
    return others



def _store_new(out, store, todo: dict[int, list[int]], digests: Sequence[str], views: int,
               outputs: int, caching: bool, others: set[int]) -> int:
    """New rows to the cache view by view, copied out of the filled arrays (not those of
    ``others``); rows computed."""
    images = sorted(todo)
    computed = 0
    for v in range(views):
        computed += sum(v in todo[i] for i in images)
        rows = np.array([i for i in images if v in todo[i] and i not in others], dtype=np.int64)
        for first in range(0, len(rows) if caching else 0, SHARD_ROWS):
            part = rows[first: first + SHARD_ROWS]  # bounded copies, bounded shards
            keys = [f"{digests[i]}:{v}" for i in part]
            for k in range(outputs):
                store(k, v).put(keys, out[v][k][part])
    if caching and computed:
        evict(cache_limit_bytes())  # once, after all new shards (a scan of the whole cache)
    return computed



def extract(frozen: FrozenPart, paths: Sequence[str], digests: Sequence[str], image_size: int,
            views: int = 1, augment: dict | None = None, store_key: str | None = None,
            bars: ProgressFactory | None = None, memory_budget: int | None = None) -> Extracted:
    """Frozen outputs of view 0 (the image as is) and views 1..views-1 (augmented).

    Each image is decoded once for all its views, decoding runs ahead on all cores while the
    frozen part runs, and rows already in the store are read instead of computed.
    ``bars(label, total)`` may return a ``graftkit.progress.Progress`` to report to.
    """
    start = time.perf_counter()
    n, outputs = len(paths), len(frozen.output_shapes)
    frozen.plan(n * views, reuse_engine=not store_key)  # a no-op when planned for the whole fit
    planned = frozen.store_key  # rows of another engine (after a fallback) are not cached
    augment = augment if views > 1 else None
    store = _stores(store_key, augment)
    budget = defaults.FEATURE_MEMORY_BUDGET if memory_budget is None else memory_budget
    out = rows_for(n, frozen.output_shapes, views, budget)
    have = _read_stored(out, store, digests, views, outputs) if store_key else set()
    todo: dict[int, list[int]] = {}
    for i in range(n):
        for v in range(views):
            if (i, v) not in have:
                todo.setdefault(i, []).append(v)
    if todo:
        frozen.ready()  # converts (and says so) before the progress bar starts

    def label() -> str:
        return f"frozen base ({frozen.label}, {views} view{'s' if views > 1 else ''})"

    bar = bars(label(), len(todo)) if bars and todo else None

    def prepare(i: int) -> list[np.ndarray]:
        img = load_image(paths[i], image_size)
        return [img if v == 0 else augment_image(img, view_seed(digests[i], v), augment or {})
                for v in todo[i]]

    others = _compute(frozen, out, todo, prepare, bar, label, planned)
    computed = _store_new(out, store, todo, digests, views, outputs, bool(store_key), others)
    return Extracted(out, computed, time.perf_counter() - start)
