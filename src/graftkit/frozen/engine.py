"""The engine that runs the frozen part, chosen by a fixed rule: the converted TFLite file on
TensorFlow Lite (float32) or OpenVINO (bfloat16, where asked for and the CPU has it) when it
agrees with Keras (about twice Keras' speed on a CPU), else Keras.

A rule, not a measurement: cached frozen outputs are training inputs, and two engines round
differently (1% of float16 rows differ by a step between TFLite and OpenVINO), so the engine must
not depend on timings or on what ran before, or the same command could train on other inputs.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from graftkit import defaults, devices
from graftkit.backbones.registry import layers_within
from graftkit.errors import DiskFullError
from graftkit.files import atomic_write
from graftkit.frozen import runtimes
from graftkit.frozen.precision import (
    INT8_ENGINE_FILES,
    INT8_MIN_COSINE,
    Calibration,
    EngineFile,
    cosines,
)
from graftkit.frozen.store import cache_full, writable
from graftkit.quiet import silenced

ENGINE_ENV, PRECISION_ENV = runtimes.ENGINE_ENV, runtimes.PRECISION_ENV
forced_engine, wanted_precision = runtimes.forced_engine, runtimes.wanted_precision
# Max |engine - Keras| on the first batch, relative to the output's scale, per precision
# (int8 is judged by cosine similarity instead: ``precision.INT8_MIN_COSINE``).
PARITY_TOLERANCE = {"f32": 1e-3, "bf16": 5e-2}


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
    """Whether every layer computes in float32 (the converted engines run no bfloat16 graph)."""

    return all(getattr(getattr(layer, "dtype_policy", None), "compute_dtype", "float32")
               == "float32" for layer in layers_within(model, leaves_only=True))


def engine_path(key: str, suffix: str = ".tflite") -> Path:
    """Where the converted engine of the frozen part named ``key`` is cached (OpenVINO int8:
    a ``.zip``)."""
    return defaults.cache_dir() / "engines" / f"{key}{suffix}"


class FrozenPart:
    """Runs a frozen model on float32 pixels through the engine the rule picks, checked against
    Keras; returns one array per model output.

    The rule: ``$GRAFTKIT_ENGINE`` when set; else OpenVINO in bfloat16 where
    ``$GRAFTKIT_ENGINE_PRECISION=bf16`` and the CPU has bfloat16 units; else TensorFlow Lite, with
    OpenVINO float32 next if TFLite fails; Keras last, and for jobs too small to pay for a
    conversion (``plan``) and on GPUs. The model is converted to TFLite once and cached under
    ``cache_dir()/engines`` by ``key``; both runtimes read that file. Each engine's first outputs
    are compared with Keras'; a disagreement beyond ``PARITY_TOLERANCE`` or a failure moves on to
    the next engine and says why (``reasons``; ``notify`` is told as it happens).

    ``fixed_batch``: Keras runs every call in batches of exactly ``KERAS_BATCH`` rows (the last
    one padded), so a row's output does not depend on the rows that share its call; for outputs
    that are cached and trained on. The converted engines run one image per call anyway.
    """

    def __init__(self, model: keras.Model, key: str, converted: bool | None = None,
                 fixed_batch: bool = False, precision: str | None = None,
                 calibration: Calibration | None = None, engine_file: EngineFile | None = None):
        """``precision``: "f32", "bf16" or "int8" (None: ``$GRAFTKIT_ENGINE_PRECISION``, or int8
        with an ``engine_file``). int8 needs ``calibration`` (converts and accepts an engine)
        or ``engine_file`` (a run's engine, already accepted); without a converted engine it
        runs float32."""
        self.model, self.key, self.fixed_batch = model, key, fixed_batch
        self.calibration, self.engine_file = calibration, engine_file
        self.notify: Callable[[str], None] | None = None  # conversions, fallbacks
        self.reasons: list[str] = []
        self.precision_reason = ""  # why this precision was asked for (the run records it)
        self.always_convert = False  # convert even for a small job (int8 asked for by name)
        self._forced = forced_engine()
        if converted is None:  # converted engines are CPU engines: with a GPU, Keras runs on it
            converted = (self._forced != "keras" and _float32(model)
                         and (self._forced in ("tflite", "openvino") or not devices.gpus()))
        self._may_plan = converted and not self._forced  # a forced engine decides for good
        wanted = precision or ("int8" if engine_file is not None else wanted_precision())
        self._bf16 = (converted and self._forced != "tflite" and wanted == "bf16"
                      and runtimes.openvino_bf16())
        # int8 runs on OpenVINO (NNCF-quantized) where both are installed, else on TFLite; a
        # run's engine file on the runtime that made it.
        self._int8_runtime = (engine_file.runtime if engine_file is not None
                              else runtimes.int8_runtime(self._forced))
        self._int8 = bool(converted and wanted == "int8" and self._int8_runtime
                          and (calibration is not None or engine_file is not None))
        if wanted == "int8" and not self._int8 and (calibration or engine_file):
            self.reasons.append(
                "int8 not used: the frozen part runs on Keras here (a GPU, a strategy or "
                "$GRAFTKIT_ENGINE)" if not converted else
                f"int8 not used: $GRAFTKIT_ENGINE={self._forced} needs NNCF for int8 (pip install "
                "'graftkit[openvino]')")
        # Engines still to try, in the rule's order (Keras after them); the first is the one
        # running, loaded on first use (``_runner``). int8 runs on its runtime, float32 after.
        self._names: list[str] = ([self._int8_runtime] if self._int8
                                  else [self._forced] if self._forced in ("tflite", "openvino")
                                  else ["openvino", "tflite"] if self._bf16
                                  else ["tflite", "openvino"]
                                  ) if converted else []
        self._runner = None
        self._content_bytes: bytes | None = None
        self._call: Callable[[np.ndarray], list[np.ndarray]] | None = None
        self._checked = False  # the running engine's first outputs matched Keras'
        # How many leading outputs the check compares (None: all). Fit's part keeps running
        # after phase 2 has trained the top blocks its last output passes through.
        self.checked_outputs: int | None = None
        self._gpu: bool | None = None  # whether Keras runs on a GPU (asked once)
        self.output_shapes = [tuple(t.shape[1:]) for t in model.outputs]

    @property
    def engine(self) -> str:
        """"keras", "tflite" or "openvino": the engine that runs (or will run) the next batch."""
        return self._names[0] if self._names else "keras"

    @property
    def precision(self) -> str:
        """"f32", "bf16" or "int8"."""
        if self._names:
            if self._int8 and self.engine == self._int8_runtime:
                return "int8"
            return "bf16" if self._bf16 and self.engine == "openvino" else "f32"
        return "f32" if _float32(self.model) else "bf16"

    @property
    def label(self) -> str:
        """The engine and, when not float32, its precision: "openvino bf16", "tflite"."""
        return runtimes.engine_label(self.engine, self.precision)

    @property
    def store_key(self) -> str:
        """The cache folder of the outputs this engine computes: engines round differently, so
        each keeps its own rows (Keras on a GPU apart from Keras on the CPU)."""
        tag = f"{self.engine}-{self.precision}"
        if self.precision == "int8":  # another calibration sample, other rows
            tag += f"-{self.calibration.digest if self.calibration else 'run'}"
        if self.engine == "keras":
            if self._gpu is None:
                    self._gpu = bool(devices.gpus())
            tag += "-gpu" if self._gpu else ""
        return f"{self.key}-{tag}"

    @property
    def _path(self) -> Path:
        if self._int8:
            if self.engine_file is not None:
                return self.engine_file.path
            assert self.calibration is not None
            if self._int8_runtime == "openvino":
                return engine_path(f"{self.key}-int8ov-{self.calibration.digest}", ".zip")
            return engine_path(f"{self.key}-int8-{self.calibration.digest}")
        return engine_path(self.key)

    def plan(self, images: int, reuse_engine: bool = True) -> str:
        """Choose the engine for a job of ``images``: converting only pays for a large one.

        Converting takes ~9.5 s on a 2-core AVX2 CPU and saves ~5 ms an image, so below
        ``defaults.ENGINE_MIN_IMAGES`` Keras finishes first; with ``reuse_engine`` a converted
        engine already cached is used whatever the size (not for outputs that are cached:
        which engine computes them must not depend on what ran before). Decides, loads nothing.
        """
        if self._may_plan:
            self._may_plan = False
            if not (images >= defaults.ENGINE_MIN_IMAGES or self.always_convert
                    or (reuse_engine and self._path.is_file())):
                if self._int8:  # chosen by auto (by name it always converts): not a fallback
                    note = (f"int8 not used: {images} images do not pay for converting an "
                            "engine (float32 Keras)")
                    self.precision_reason = "; ".join(filter(None, [self.precision_reason,
                                                                    note]))
                self._names = []
        return self.engine

    def ready(self) -> None:
        """Load the engine now (converting it if needed) rather than on the first batch."""
        while self._names and self._runner is None:
            name = self._names[0]
            try:
                content = self._content()
            except Exception as e:  # noqa: BLE001 - any converter failure means: run on Keras
                if self._int8:  # float32 next
                    self._fall_back(f"no int8 engine ({type(e).__name__}: {e})")
                    continue
                self._names = []
                self._fall_back(f"converting the frozen base to TFLite failed ({type(e).__name__})")
                return
            try:
                self._runner = self._load(name, content)
            except Exception as e:  # noqa: BLE001 - an engine that cannot load is skipped
                hint = " (pip install 'graftkit[openvino]')" if isinstance(e, ImportError) else ""
                self._fall_back(f"{name} could not load the engine ({type(e).__name__}: "
                                f"{e}){hint}")
                continue
            if self._int8 and self.calibration is not None and not self._checked:
                self._accept_int8()

    def _say(self, text: str) -> None:
        if self.notify:
            self.notify(text)

    def int8_engine(self) -> bytes | None:
        """The int8 engine's file contents when int8 runs (for the run folder), else None."""
        return self._content_bytes if self.precision == "int8" else None

    @property
    def int8_engine_name(self) -> str:
        """The int8 engine's file name in a run folder (it depends on the runtime)."""
        return INT8_ENGINE_FILES[self._int8_runtime or "tflite"]

    def _accept_int8(self) -> None:
        """Keep the int8 engine only if its outputs follow float32 Keras' on training images
        it was not calibrated on; else float32, saying why."""
        assert self.calibration is not None and self._runner is not None
        held = self.calibration.held_out
        try:
            got = self._runner(held)[:self.checked_outputs]
        except Exception as e:  # noqa: BLE001 - an int8 engine that cannot run: float32
            self._fall_back(f"int8 failed ({type(e).__name__}: {e})")
            return
        sims = cosines(got, self._run_keras(held))
        self.calibration.accepted = {
            "calibration_images": len(self.calibration.files or self.calibration.images),
            "held_out_images": len(held),
            "cosine": [round(c, 4) for c in sims], "min_cosine": INT8_MIN_COSINE,
            "sample": self.calibration.digest}
        if min(sims) < INT8_MIN_COSINE:
            self._fall_back(f"int8 follows float32 too loosely on {len(held)} held-out training "
                            f"images (cosine {min(sims):.4f} < {INT8_MIN_COSINE})")
            return
        self._checked = True

    def _fall_back(self, reason: str) -> None:
        """Drop the running engine for the next one (Keras last), saying why. int8 falls back
        to float32 on the same runtimes."""
        self.reasons.append(reason)
        if self._int8:
            self._int8, self._runner, self._checked = False, None, False
            self._content_bytes = None
            self._names = ([self._forced] if self._forced in ("tflite", "openvino")
                           else ["tflite", "openvino"])
            self._say(f"  {reason}: using {self.label}")
            return
        self._names, self._runner, self._checked = self._names[1:], None, False
        if self._names == ["openvino"] and not runtimes.openvino_available():
            self._names = []
        self._say(f"  {reason}: using {self.label}")

    def _content(self) -> bytes:
        """The converted TFLite model: from the cache, else converted now (and cached)."""
        if self._content_bytes is not None:
            return self._content_bytes
        path = self._path
        if self._int8 and self.engine_file is not None:
            if not path.is_file():
                raise FileNotFoundError(f"the run's int8 engine {path} is missing")
            content = self.engine_file.content()
            self._checked = True  # accepted when the run was made, and the digest matches
            self._content_bytes = content
            return content
        self._content_bytes = _cached(path, lambda: self._convert(self._int8))
        return self._content_bytes

    def _convert(self, int8: bool) -> bytes:
        """The frozen part converted: TFLite (float32, or int8 calibrated by TFLite), or, for
        OpenVINO's int8, the float32 TFLite engine (cached too) quantized by NNCF."""
        import tensorflow as tf

        ov_int8 = int8 and self._int8_runtime == "openvino"
        source = (_cached(engine_path(self.key), lambda: self._convert(False)) if ov_int8
                  else None)
        start = time.perf_counter()
        what = ("an int8 OpenVINO engine (NNCF)" if ov_int8 else
                "an int8 TFLite engine" if int8 else "a TFLite engine")
        self._say(f"converting the frozen base to {what} (once; cached for later runs)...")
        if ov_int8:
            assert self.calibration is not None and source is not None
            content = runtimes.quantize_openvino(source, tuple(self.model.inputs[0].shape[1:]),
                                                 self.calibration.images)
        else:
            with silenced(), warnings.catch_warnings():  # int8: "Statistics for quantized..."
                warnings.simplefilter("ignore")
                converter = tf.lite.TFLiteConverter.from_keras_model(self.model)
                if int8:
                    assert self.calibration is not None
                    images = self.calibration.images
                    converter.optimizations = [tf.lite.Optimize.DEFAULT]
                    converter.representative_dataset = lambda: ([img[None]] for img in images)
                content = converter.convert()
        self._say(f"  converted in {time.perf_counter() - start:.1f} s")
        release_memory()  # the converter's garbage, before the outputs fill memory
        return content

    def _load(self, name: str, content: bytes):
        if name == "tflite":
            return runtimes.TFLiteRunner(content, self.output_shapes)
        int8 = self._int8 and name == self._int8_runtime
        source = content if int8 or not self._path.is_file() else self._path
        return runtimes.OpenVINORunner(source, self.output_shapes,
                                       tuple(self.model.inputs[0].shape[1:]),
                                       "int8" if int8 else "bf16" if self._bf16 else "f32")

    def _run_keras(self, x: np.ndarray) -> list[np.ndarray]:
        if self._call is None:
            self._call = compiled(self.model, fixed_batch=self.fixed_batch)
        return self._call(x)

    def _disagreement(self, out: list[np.ndarray], x: np.ndarray) -> str | None:
        """Why the engine's first outputs cannot stand for Keras', or None when they can."""
        tolerance = PARITY_TOLERANCE[self.precision]
        for got, ref in zip(out[:self.checked_outputs], self._run_keras(x[:4])):
            scale = max(float(np.abs(ref).max()), 1.0)
            diff = float(np.abs(got[:4] - ref).max())
            if not diff <= tolerance * scale:  # NaN included
                return (f"{self.label} differs from Keras by {diff:.3g} (tolerance "
                        f"{tolerance * scale:.3g})")
        return None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        while self._names:
            self.ready()
            if self._runner is None:
                continue  # nothing loaded: Keras
            try:
                out = self._runner(x)
            except Exception as e:  # noqa: BLE001 - a failing engine hands over to the next
                self._fall_back(f"{self.engine} failed ({type(e).__name__}: {e})")
                continue
            if not self._checked:  # its first batch: checked against Keras
                reason = self._disagreement(out, x)
                if reason:
                    self._fall_back(reason)
                    continue
                self._checked = True
            return out
        return self._run_keras(x)


def _cached(path: Path, make: Callable[[], bytes]) -> bytes:
    """The engine file at ``path`` in the cache, else made now and cached (if it can be)."""
    if path.is_file():
        content = path.read_bytes()
        os.utime(path)
        return content
    content = make()
    if writable():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))
        except DiskFullError:  # the engine runs from memory; the next run converts
            cache_full(path.parent)
    return content


KERAS_BATCH = 16  # rows per call of a compiled model: fastest on a 2-core AVX2 CPU (113 images/s)



def compiled(model: keras.Model, fixed_batch: bool = False):
    """``model`` in inference mode as a function of a numpy batch, run in small batches.

    A traced ``tf.function`` of the model is 1.3x ``predict``'s speed on a large batch and 2x on
    the 64-row chunks ``extract`` hands over (2-core AVX2 CPU; ``predict`` pays ~0.4 s a call
    to set up).
    Small batches also keep the allocator from holding hundreds of MB. ``fixed_batch`` pads the
    last batch to ``KERAS_BATCH`` rows: oneDNN picks kernels by shape, so a row's outputs then do
    not depend on how many rows share its call (measured: 0.03% of float16 values moved).
    """
    import tensorflow as tf

    fn = tf.function(lambda a: model(a, training=False), reduce_retracing=True)

    def run(x: np.ndarray) -> list[np.ndarray]:
        parts: list[list[np.ndarray]] = []
        for i in range(0, len(x), KERAS_BATCH):
            batch = x[i: i + KERAS_BATCH]
            rows = len(batch)
            if fixed_batch and rows < KERAS_BATCH:
                batch = np.concatenate([batch, np.zeros((KERAS_BATCH - rows, *batch.shape[1:]),
                                                        dtype=batch.dtype)])
            out = fn(batch)
            parts.append([np.asarray(o)[:rows] for o in (out if isinstance(out, (list, tuple))
                                                         else [out])])
        return [np.concatenate(col) for col in zip(*parts)]

    return run


def describe_devices(engine_precision: str = "auto") -> str:
    """One line for the start of a run's log: where it trains, what computes frozen outputs."""
    from graftkit.frozen.precision import resolve

    found = devices.gpus()
    if found:
        return (f"devices: {len(found)} GPU{'s' if len(found) > 1 else ''} "
                f"({', '.join(found)}): training and the frozen base on the GPU through Keras")
    precision = resolve(engine_precision)[0]
    int8 = runtimes.int8_runtime(forced_engine()) if precision == "int8" else ""
    engines = ("OpenVINO in bfloat16" if precision == "bf16" and runtimes.openvino_bf16()
               else f"{'OpenVINO' if int8 == 'openvino' else 'TFLite'} in int8" if int8
               else "TFLite")
    return ("devices: CPU (TensorFlow sees no GPU): training on the CPU; the frozen base "
            f"through {engines} where converting it pays, else compiled Keras")
