"""What the frozen part of the base computes: run once per image and view, cached on disk.

Everything below the fine-tuned blocks is frozen and in inference mode, so its output is a pure
function of the image (and of the augmented view of it). ``split_base`` cuts the base at a block
boundary into a frozen ``bottom`` and a trainable ``top`` that share the base's layers;
``FrozenPart`` runs the bottom (through TensorFlow Lite's XNNPACK kernels when they agree with
Keras: twice Keras' speed on this CPU); ``FeatureStore`` keeps its outputs on disk, keyed by
the bottom's weights, input size and each file's content digest, so a second ``graft fit`` on
the same images skips the base entirely. Views of an image are decided by its digest, not by the
run's seed, so they are reusable too.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from graftkit import defaults
from graftkit.backbones.registry import block_groups
from graftkit.data import augment_image, load_image, view_seed
from graftkit.errors import DiskFullError
from graftkit.graft import all_layers
from graftkit.run import atomic_write
from graftkit.store import FeatureStore, cache_full, cache_limit_bytes, evict, writable

ENGINE_ENV = "GRAFTKIT_ENGINE"  # "keras" or "tflite" forces that engine (for comparisons)
PARITY_TOLERANCE = 1e-3  # max |TFLite - Keras|, relative to the output's scale
STORE_DTYPE = np.float16  # halves memory and disk; measured not to move accuracy
CHUNK = 64  # images decoded ahead while the bottom runs
SHARD_ROWS = 2048  # rows per cache file: a bounded copy when writing, a bounded read later


@dataclass
class BaseSplit:
    """The base cut at a block boundary: ``top(bottom(x)) == base(x)``, layers shared."""

    bottom: keras.Model  # raw pixels -> activations at the cut (frozen)
    top: keras.Model | None  # activations -> pooled features; None when the cut is the output
    cut: str  # the name of the first layer above the cut, or "output"
    blocks: int  # blocks above the cut

    def frozen_model(self) -> keras.Model:
        """Pixels -> [pooled features] or [cut activations, pooled features], in one pass.

        Phase 1 needs the pooled features of the pretrained top, phase 2 the activations at
        the cut; both are pure functions of the image before phase 2, so one run gives both.
        """
        if self.top is None:
            return self.bottom
        x = keras.Input(self.bottom.inputs[0].shape[1:], name="pixels")
        cut = self.bottom(x)
        return keras.Model(x, [cut, self.top(cut)], name="frozen_" + self.cut)


def _node_in(model: keras.Model, layer) -> object | None:
    """The call of ``layer`` inside ``model``'s graph (a layer also used elsewhere has more)."""
    mine = getattr(model, "_nodes", ())  # Keras' keys: "{id(operation)}_ib-{node index}"
    nodes = [n for i, n in enumerate(getattr(layer, "_inbound_nodes", []))
             if f"{id(layer)}_ib-{i}" in mine]
    return nodes[0] if len(nodes) == 1 else None


def _cut_model(model: keras.Model, first: keras.layers.Layer):
    """``(bottom, top)`` of ``model`` cut just below ``first``, recursing into nested models."""
    if first in model.layers:
        node = _node_in(model, first)
        if node is None or len(node.input_tensors) != 1:
            return None
        cut = node.input_tensors[0]
        return keras.Model(model.inputs, cut), keras.Model(cut, model.outputs[0])
    for child in model.layers:
        if isinstance(child, keras.Model) and any(
                layer is first for layer in all_layers(child)):
            node = _node_in(model, child)
            inner = _cut_model(child, first)
            if node is None or inner is None or len(node.input_tensors) != 1:
                return None
            inner_bottom, inner_top = inner
            before = _between(model.inputs[0], node.input_tensors[0])
            after = _between(node.output_tensors[0], model.outputs[0])
            x = keras.Input(model.inputs[0].shape[1:])
            bottom = keras.Model(x, inner_bottom(before(x) if before else x))
            a = keras.Input(inner_top.inputs[0].shape[1:])
            y = inner_top(a)
            return bottom, keras.Model(a, after(y) if after else y)
    return None


def _between(start, end) -> keras.Model | None:
    """The layers from tensor ``start`` to tensor ``end`` as a model; None when they coincide."""
    return None if start is end else keras.Model(start, end)


def _weighted_leaves(model) -> set[int]:
    from graftkit.backbones.registry import leaf_layers

    return {id(layer) for layer in leaf_layers(model) if layer.weights}


def _first_above(groups: list, top_n: int):
    """The first layer of the top ``top_n`` blocks; None when there are not more blocks."""
    return groups[-top_n][0] if 0 < top_n < len(groups) else None


def cut_blocks(unfreeze: int | str, fine_tune_epochs: int) -> int:
    """Blocks above the cut for a run's options: the top blocks it fine-tuned, else none.

    Fine-tuning "all" changes every layer, so only the head sits above a frozen bottom then.
    """
    return unfreeze if isinstance(unfreeze, int) and fine_tune_epochs else 0


def split_base(base: keras.Model, block_pattern: str, top_n: int) -> BaseSplit | None:
    """Cut ``base`` below its top ``top_n`` blocks; None where no single tensor separates them.

    A skip connection that crosses the cut would make the top depend on more than the cut
    activations; the check that the top holds exactly the top blocks' layers refuses that.
    """
    if top_n == 0:
        return BaseSplit(base, None, "output", 0)
    groups = block_groups(base, block_pattern)
    first = _first_above(groups, top_n)
    if first is None:
        return None
    try:
        parts = _cut_model(base, first)
    except (ValueError, TypeError):
        return None
    if parts is None:
        return None
    bottom, top = parts
    wanted = {id(layer) for group in groups[-top_n:] for layer in group}
    if _weighted_leaves(top) != wanted:
        return None
    return BaseSplit(bottom, top, first.name, top_n)


def weights_digest(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(str(w.shape).encode())
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _quiet():
    """Silence the converter's C++ and Python chatter on the terminal (fds 1 and 2)."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def release_memory() -> None:
    """Collect garbage and hand freed heap back to the system (glibc keeps it otherwise)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def _float32(model: keras.Model) -> bool:
    """Whether every layer computes in float32 (TFLite runs no bfloat16 graph)."""
    from graftkit.backbones.registry import leaf_layers

    return all(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32")
               == "float32" for layer in leaf_layers(model))


def _interpreter(content: bytes):
    threads = os.cpu_count() or 1
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(model_content=content, num_threads=threads)
    return Interpreter(model_content=content, num_threads=threads)


def engine_path(key: str) -> Path:
    """Where the converted TFLite engine of the frozen part named ``key`` is cached."""
    return defaults.cache_dir() / "engines" / f"{key}.tflite"


class FrozenPart:
    """Runs a frozen model on float32 pixels, through TFLite/XNNPACK when it matches Keras.

    Returns a list with one array per model output. The converted model is cached under
    ``cache_dir()/engines`` by ``key``; its outputs are compared with Keras' on the first
    batch, and any disagreement beyond ``PARITY_TOLERANCE`` falls back to Keras for good.
    """

    def __init__(self, model: keras.Model, key: str, use_tflite: bool | None = None):
        self.model, self.key = model, key
        self.notify: Callable[[str], None] | None = None  # told of a conversion (seconds long)
        forced = os.environ.get(ENGINE_ENV, "")
        if use_tflite is None:  # TFLite is a CPU engine: with a GPU, Keras runs on it
            from graftkit.devices import gpus

            use_tflite = (forced != "keras" and _float32(model)
                          and (forced == "tflite" or not gpus()))
        self._may_plan = use_tflite and forced != "tflite"  # the env var decides for good
        self.engine = "tflite" if use_tflite else "keras"
        self._interp = None
        self._call = None
        self._checked = not use_tflite
        self.output_shapes = [tuple(t.shape[1:]) for t in model.outputs]

    @property
    def _path(self) -> Path:
        return engine_path(self.key)

    def plan(self, images: int) -> str:
        """Choose the engine for a job of ``images``: converting only pays for a large one.

        Converting takes ~9.5 s here and saves ~5 ms an image, so below
        ``defaults.ENGINE_MIN_IMAGES`` Keras finishes first, unless the engine is cached.
        """
        if self._may_plan and self._interp is None:
            convert = images >= defaults.ENGINE_MIN_IMAGES or self._path.is_file()
            self.engine = "tflite" if convert else "keras"
            self._checked = not convert
        return self.engine

    def _load(self):
        path = self._path
        if path.is_file():
            content = path.read_bytes()
            os.utime(path)
        else:
            import tensorflow as tf

            start = time.perf_counter()
            if self.notify:
                self.notify("converting the frozen base to a TFLite engine (once; cached for "
                            "later runs)...")
            try:
                with _quiet():
                    content = tf.lite.TFLiteConverter.from_keras_model(self.model).convert()
            except Exception:
                return None
            if self.notify:
                self.notify(f"  converted in {time.perf_counter() - start:.1f} s")
            if writable():
                try:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))
                except DiskFullError:  # the engine runs from memory; the next run converts
                    cache_full(path.parent)
            release_memory()  # the converter's garbage, before the outputs fill memory
        with _quiet():  # "INFO: Created TensorFlow Lite XNNPACK delegate" on stderr otherwise
            interp = _interpreter(content)
            interp.allocate_tensors()
        # The engine's outputs in the model's order, matched by shape (refused if ambiguous).
        details = interp.get_output_details()
        order = []
        for shape in self.output_shapes:
            match = [d["index"] for d in details if tuple(d["shape"][1:]) == shape]
            if len(match) != 1 and len(self.output_shapes) > 1:
                return None
            order.append(match[0] if match else details[0]["index"])
        self._outputs = order
        return interp

    def _run_tflite(self, x: np.ndarray) -> list[np.ndarray]:
        interp = self._interp
        inp = interp.get_input_details()[0]["index"]
        if tuple(interp.get_input_details()[0]["shape"]) != (1, *x.shape[1:]):
            interp.resize_tensor_input(inp, (1, *x.shape[1:]))
            interp.allocate_tensors()
        results = [np.empty((len(x), *shape), dtype=np.float32) for shape in self.output_shapes]
        for i in range(len(x)):  # batch 1 measured fastest with XNNPACK here
            interp.set_tensor(inp, x[i: i + 1])
            interp.invoke()
            for result, index in zip(results, self._outputs):
                result[i] = interp.get_tensor(index)[0]
        return results

    def _run_keras(self, x: np.ndarray) -> list[np.ndarray]:
        if self._call is None:
            self._call = compiled(self.model)
        return self._call(x)

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.engine == "keras":
            return self._run_keras(x)
        if self._interp is None:
            self._interp = self._load()
            if self._interp is None:
                self.engine = "keras"
                return self._run_keras(x)
        out = self._run_tflite(x)
        if not self._checked:
            refs = self._run_keras(x[:4])
            for got, ref in zip(out, refs):
                scale = max(float(np.abs(ref).max()), 1.0)
                if float(np.abs(got[:4] - ref).max()) > PARITY_TOLERANCE * scale:
                    self.engine = "keras"
                    return self._run_keras(x)
            self._checked = True
        return out


KERAS_BATCH = 16  # rows per call of a compiled model: measured fastest here (113 images/s)


def compiled(model: keras.Model):
    """``model`` in inference mode as a function of a numpy batch, run in small batches.

    A traced ``tf.function`` of the model is 1.3x ``predict``'s speed on a large batch here and
    2x on the 64-row chunks ``extract`` hands over (``predict`` pays ~0.4 s a call to set up).
    Small batches also keep the allocator from holding hundreds of MB.
    """
    import tensorflow as tf

    fn = tf.function(lambda a: model(a, training=False), reduce_retracing=True)

    def run(x: np.ndarray) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        for i in range(0, len(x), KERAS_BATCH):
            out = fn(x[i: i + KERAS_BATCH])
            parts.append([np.asarray(o) for o in (out if isinstance(out, (list, tuple))
                                                  else [out])])
        return [np.concatenate(col) for col in zip(*parts)]

    return run


def _augment_key(augment: dict | None) -> str:
    if not augment:
        return "plain"
    text = json.dumps(augment, sort_keys=True)
    return "aug-" + hashlib.sha256(text.encode()).hexdigest()[:12]


class DiskRows:
    """Rows of one shape in an unlinked scratch file, read and written with pread/pwrite.

    Stands in for an array too large for memory: ``rows[i] = row``, ``rows[indices]``, ``shape``,
    ``len``. Not a memory map: mapped pages count as the process's resident memory once touched,
    whereas reads into fresh buffers leave only the batch in it (the kernel's page cache keeps
    the file warm). The file has no name once open, so nothing is left behind, even on a kill.
    """

    def __init__(self, n: int, shape: tuple[int, ...], dtype=STORE_DTYPE,
                 folder: Path | None = None):
        folder = folder or defaults.cache_dir()
        folder.mkdir(parents=True, exist_ok=True)
        self._fd, name = tempfile.mkstemp(prefix="rows-", suffix=".bin", dir=folder)
        os.unlink(name)
        self.shape, self.dtype = (n, *shape), np.dtype(dtype)
        self._row_bytes = int(np.prod(shape, dtype=np.int64)) * self.dtype.itemsize
        os.ftruncate(self._fd, n * self._row_bytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __setitem__(self, i: int, row: np.ndarray) -> None:
        data = np.ascontiguousarray(row, dtype=self.dtype).tobytes()
        os.pwrite(self._fd, data, int(i) * self._row_bytes)

    def __getitem__(self, rows) -> np.ndarray:
        single = np.isscalar(rows)
        rows = np.atleast_1d(np.asarray(rows, dtype=np.int64))
        out = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        view, size, j = memoryview(out).cast("B"), self._row_bytes, 0
        while j < len(rows):  # one read per run of consecutive rows
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1:
                k += 1
            got = os.preadv(self._fd, [view[j * size: k * size]], int(rows[j]) * size)
            if got != (k - j) * size:
                raise OSError(f"short read from the scratch file ({got} bytes)")
            j = k
        return out[0] if single else out

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


def _rows_for(n: int, shapes: list[tuple[int, ...]], views: int, budget: int):
    """Per view, one array per output: in memory, or ``DiskRows`` when they pass ``budget``."""
    per_view = sum(int(np.prod(s, dtype=np.int64)) for s in shapes) * n
    spill = per_view * views * np.dtype(STORE_DTYPE).itemsize > budget
    make = DiskRows if spill else (lambda n, shape: np.empty((n, *shape), dtype=STORE_DTYPE))
    return [[make(n, shape) for shape in shapes] for _ in range(views)]


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


def _compute(frozen: FrozenPart, out, todo: dict[int, list[int]], prepare, bar) -> None:
    """Run the frozen part on every view in ``todo``, decoding two chunks ahead on all cores."""
    outputs = len(frozen.output_shapes)
    done = 0
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        ahead: deque = deque()
        queue = iter(sorted(todo))
        for i in queue:  # keep two chunks of decoding in flight, no more (bounded memory)
            ahead.append((i, pool.submit(prepare, i)))
            if len(ahead) >= 2 * CHUNK:
                break
        while ahead:
            chunk = [ahead.popleft() for _ in range(min(CHUNK, len(ahead)))]
            for i in queue:
                ahead.append((i, pool.submit(prepare, i)))
                if len(ahead) >= 2 * CHUNK:
                    break
            prepared = [(i, f.result()) for i, f in chunk]
            batch = np.stack([view for _, views_of in prepared for view in views_of])
            results = frozen(batch.astype(np.float32))
            r = 0
            for i, _ in prepared:
                for v in todo[i]:
                    for k in range(outputs):
                        out[v][k][i] = results[k][r]
                    r += 1
            done += len(chunk)
            if bar is not None:
                bar.update(done)
    if bar is not None:
        bar.close()


def _store_new(out, store, todo: dict[int, list[int]], digests: Sequence[str], views: int,
               outputs: int, caching: bool) -> int:
    """New rows to the cache view by view, copied out of the filled arrays; rows computed."""
    images = sorted(todo)
    computed = 0
    for v in range(views):
        rows = np.array([i for i in images if v in todo[i]], dtype=np.int64)
        computed += len(rows)
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
            progress=None, memory_budget: int | None = None) -> Extracted:
    """Frozen outputs of view 0 (the image as is) and views 1..views-1 (augmented).

    Each image is decoded once for all its views, decoding runs ahead on all cores while the
    frozen part runs, and rows already in the store are read instead of computed.
    ``progress(label, total)`` may return a ``graftkit.progress.Progress`` to report to.
    """
    start = time.perf_counter()
    n, outputs = len(paths), len(frozen.output_shapes)
    augment = augment if views > 1 else None
    store = _stores(store_key, augment)
    budget = defaults.FEATURE_MEMORY_BUDGET if memory_budget is None else memory_budget
    out = _rows_for(n, frozen.output_shapes, views, budget)
    have = _read_stored(out, store, digests, views, outputs) if store_key else set()
    todo: dict[int, list[int]] = {}
    for i in range(n):
        for v in range(views):
            if (i, v) not in have:
                todo.setdefault(i, []).append(v)
    frozen.plan(sum(len(v) for v in todo.values()))
    bar = progress(f"frozen base ({frozen.engine}, {views} view{'s' if views > 1 else ''})",
                   len(todo)) if progress and todo else None

    def prepare(i: int) -> list[np.ndarray]:
        img = load_image(paths[i], image_size)
        return [img if v == 0 else augment_image(img, view_seed(digests[i], v), augment)
                for v in todo[i]]

    _compute(frozen, out, todo, prepare, bar)
    computed = _store_new(out, store, todo, digests, views, outputs, bool(store_key))
    return Extracted(out, computed, time.perf_counter() - start)


def part_key(model: keras.Model, image_size: int, cut: str) -> str:
    """Names a frozen part by what decides its output: weights, input size, cut."""
    text = f"{weights_digest(model)}:{image_size}:{cut}:{keras.__version__}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class SplitClassifier:
    """A trained classifier run as frozen bottom (``FrozenPart``) + Keras for the rest.

    The bottom of a model fine-tuned above a cut still holds the pretrained weights, so the
    engine ``graft fit`` converted (named by ``engine_key``) serves it without converting
    again; the parity check on the first batch guards the match. Twice Keras' images/s here.
    """

    def __init__(self, model: keras.Model, block_pattern: str, top_n: int,
                 engine_key: str | None = None, frozen: FrozenPart | None = None):
        from graftkit.graft import BASE, HEAD_DROPOUT

        if top_n > 0:
            first = _first_above(block_groups(model.get_layer(BASE), block_pattern), top_n)
            if first is None:
                raise ValueError(f"cannot cut below {top_n} blocks")
        else:
            first = model.get_layer(HEAD_DROPOUT)
        parts = _cut_model(model, first)
        if parts is None:
            raise ValueError("no single tensor separates the top blocks")
        self.bottom, self.rest = parts
        self._rest = None
        size = int(model.inputs[0].shape[1])
        key = engine_key
        if not key or not engine_path(key).is_file():
            key = part_key(self.bottom, size, first.name)
        # ``frozen``: a part already running whose first output is this bottom's (fit's own).
        self.frozen = frozen or FrozenPart(self.bottom, key)

    def plan(self, images: int) -> str:
        return self.frozen.plan(images)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        cut = self.frozen(pixels)[0]
        if self._rest is None:
            self._rest = compiled(self.rest)
        return self._rest(cut)[0]


def split_classifier(model: keras.Model, metrics: dict) -> SplitClassifier | None:
    """The fast path for a run's model, from what its metrics say of the cut; None if none."""
    from graftkit.backbones.registry import GENERIC_BLOCK_PATTERN, REGISTRY

    options = metrics.get("options", {})
    top_n = cut_blocks(options.get("unfreeze", 0), options.get("fine_tune_epochs", 0))
    entry = REGISTRY.get(metrics.get("backbone", ""))
    try:
        return SplitClassifier(model, entry.block_pattern if entry else GENERIC_BLOCK_PATTERN,
                               top_n, metrics.get("engine"))
    except (ValueError, KeyError):
        return None
