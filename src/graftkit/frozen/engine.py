"""The engine that runs the frozen part: TensorFlow Lite's XNNPACK kernels when they agree with
Keras (twice Keras' speed on a CPU), else a compiled Keras function.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from graftkit import defaults
from graftkit.backbones.registry import layers_within
from graftkit.errors import DiskFullError
from graftkit.files import atomic_write
from graftkit.frozen.store import cache_full, writable
from graftkit.quiet import silenced

ENGINE_ENV = "GRAFTKIT_ENGINE"  # "keras" or "tflite" forces that engine (for comparisons)



PARITY_TOLERANCE = 1e-3  # max |TFLite - Keras|, relative to the output's scale



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

    return all(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32")
               == "float32" for layer in layers_within(model, leaves_only=True))



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
                with silenced():
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
        with silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate" on stderr otherwise
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
