"""Images decoded in parallel: ahead of the frozen part and predict (``prefetched``), and as
labelled, batched streams for training the whole base.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from graftkit import defaults
from graftkit.data.augment import augment_image
from graftkit.data.images import load_image

if TYPE_CHECKING:
    from graftkit.progress import ProgressFactory

T = TypeVar("T")
R = TypeVar("R")


def prefetched(fn: Callable[[T], R], items: Iterable[T], chunk: int
               ) -> Iterator[list[tuple[T, R]]]:
    """``(item, fn(item))`` in order, a chunk at a time, ``fn`` running on all cores two chunks
    ahead: the images of the next chunks decode while the engine runs on this one, and no
    more than two chunks wait in memory."""
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        queue = iter(items)
        ahead = deque((item, pool.submit(fn, item)) for item in islice(queue, 2 * chunk))
        while ahead:
            due = [ahead.popleft() for _ in range(min(chunk, len(ahead)))]
            ahead.extend((item, pool.submit(fn, item)) for item in islice(queue, len(due)))
            yield [(item, future.result()) for item, future in due]


class DecodedImages:
    """Every image of a split decoded and resized once, so epochs do no JPEG work.

    Held in memory up to ``budget`` bytes, beyond that in a memory-mapped file in ``spill_dir``
    (removed by ``close``). Decoding runs on all cores (Pillow releases the GIL).
    """

    def __init__(self, paths: Sequence[str], size: int, budget: int | None = None,
                 spill_dir: Path | None = None, bars: ProgressFactory | None = None):
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
            self.array: np.ndarray = np.memmap(self._file, dtype=np.uint8, mode="w+",
                                               shape=shape)
        else:
            self.array = np.empty(shape, dtype=np.uint8)

        def work(i: int) -> None:
            self.array[i] = load_image(self.paths[i], size)

        bar = bars("decoding training images", len(self.paths)) if bars else None
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



def shard_by_data(dataset):
    """Split batches between workers by element (the rows are not files to split by)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)


def as_targets(labels) -> np.ndarray:
    """Class indices as int32; multi-hot rows of label sets (``graftkit.task``) as float32."""
    y = np.asarray(labels)
    return y.astype(np.float32) if y.ndim == 2 else y.astype(np.int32)


def make_dataset(
    images: Sequence[str] | DecodedImages,
    labels: Sequence[int] | np.ndarray | None,
    image_size: int,
    batch_size: int,
    shuffle: bool = False,
    augment: dict[str, float | bool] | None = None,
    seed: int = defaults.SEED,
    drop_remainder: bool = False,
):
    """A prefetched tf.data stream of ``(float32 0-255 images, labels)`` batches.

    ``images`` are file paths (decoded in parallel by ``load_image``) or a ``DecodedImages``.
    ``augment`` settings apply ``augment_image`` with a fresh seed per image and epoch.
    """
    import tensorflow as tf

    source: np.ndarray | list[str]
    if isinstance(images, DecodedImages):
        decoded = images
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
    ds = tf.data.Dataset.from_tensor_slices((source, as_targets(labels)))
    if shuffle:
        ds = ds.shuffle(count, seed=seed, reshuffle_each_iteration=True)
    # One random seed per image and epoch, independent of the order parallel calls finish in.
    seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    ds = tf.data.Dataset.zip((ds, seeds))
    ds = ds.map(lambda py, s: (decode(py[0], s), py[1]), num_parallel_calls=tf.data.AUTOTUNE)
    return shard_by_data(ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))
