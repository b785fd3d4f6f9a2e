"""The engine that runs the frozen part, chosen per machine: OpenVINO or TensorFlow Lite on the
one converted file when they agree with Keras (about twice Keras' speed on a CPU), else Keras.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from graftkit import defaults
from graftkit.backbones.registry import layers_within
from graftkit.errors import DiskFullError
from graftkit.files import atomic_write
from graftkit.frozen import runtimes
from graftkit.frozen.store import cache_full, writable
from graftkit.quiet import silenced

ENGINE_ENV, PRECISION_ENV = runtimes.ENGINE_ENV, runtimes.PRECISION_ENV
forced_engine, wanted_precision = runtimes.forced_engine, runtimes.wanted_precision
# Max |engine - Keras| on the first batch, relative to the output's scale, per precision.
PARITY_TOLERANCE = {"f32": 1e-3, "bf16": 5e-2}
# OpenVINO is chosen over TFLite only when it measured at least this much faster here: TFLite
# ran 4% ahead of it on an AVX-512 CPU in float32, and here (AVX2) it is ahead on idle cores
# and 9% behind while decoding threads share them, as in graft fit's frozen pass.
CHOICE_MARGIN = 1.05
# Timed batches per engine before choosing (after each one's first, which allocates and is
# checked against Keras): the choice is made on the job itself, decoding and all.
TRIAL_BATCHES = 2
# Batches smaller than this are not timed (and go to the first engine): one image takes ~15 ms,
# and right after another engine's call its worker threads still spin on the same cores, which
# measured single images interleaved at TFLite 52 / ONNX Runtime 102 images/s against 91 / 81
# run alone.
TRIAL_MIN_IMAGES = 16


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


def engine_path(key: str) -> Path:
    """Where the converted TFLite engine of the frozen part named ``key`` is cached."""
    return defaults.cache_dir() / "engines" / f"{key}.tflite"


@functools.cache
def machine() -> str:
    """What the engine choice depends on: CPU model, cores and OpenVINO's version."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    version = ""
    if runtimes.openvino_available():
        import openvino

        version = openvino.__version__
    return f"{platform.machine()} | {cpu} | {os.cpu_count()} cores | openvino {version or '-'}"


class FrozenPart:
    """Runs a frozen model on float32 pixels through the fastest engine that matches Keras.

    Returns a list with one array per model output. The model is converted to TFLite once and
    cached under ``cache_dir()/engines`` by ``key``; TFLite and OpenVINO (when installed) both
    run that file. Which is faster on this machine is measured on the first job's own batches
    (the engines take turns) and cached next to the file. Each engine's outputs are compared
    with Keras' on its first batch; a disagreement beyond ``PARITY_TOLERANCE`` or a failure
    moves on to the other engine, then to Keras, and says why (``reasons``; ``notify`` is told
    as it happens).
    """

    def __init__(self, model: keras.Model, key: str, converted: bool | None = None):
        self.model, self.key = model, key
        self.notify: Callable[[str], None] | None = None  # conversions, choices, fallbacks
        self.reasons: list[str] = []
        self._forced = forced_engine()
        if converted is None:  # converted engines are CPU engines: with a GPU, Keras runs on it
            from graftkit.devices import gpus

            converted = (self._forced != "keras" and _float32(model)
                         and (self._forced in ("tflite", "openvino") or not gpus()))
        self._may_plan = converted and not self._forced  # a forced engine decides for good
        self._runners: list | None = None if converted else []  # None: not loaded yet
        self._call = None
        self._checked: set[str] = set()  # runners whose first outputs matched Keras'
        self._trial: dict[str, list[float]] | None = None  # seconds an image, while choosing
        self._bf16 = (converted and self._forced != "tflite" and wanted_precision() == "bf16"
                      and runtimes.openvino_bf16())
        self.output_shapes = [tuple(t.shape[1:]) for t in model.outputs]

    @property
    def precision(self) -> str:
        """"f32" or "bf16" ("f32+bf16" while engines of both take turns)."""
        if self._runners:
            runners = self._runners if self._trial is not None else self._runners[:1]
            return "+".join(sorted({r.precision for r in runners}, reverse=True))
        return "f32" if _float32(self.model) else "bf16"

    @property
    def label(self) -> str:
        """The engine and, when not float32, its precision: "openvino bf16", "tflite"; while
        the engines take turns to be measured, all of them: "tflite+openvino"."""
        return _named(self.engine, self.precision)

    @property
    def engine(self) -> str:
        """"keras", "tflite" or "openvino"; "tflite+openvino" while they take turns; "tflite"
        for a converted engine not loaded yet."""
        if self._runners is None:
            return "tflite"
        if not self._runners:
            return "keras"
        if self._trial is not None:
            return "+".join(r.name for r in self._runners)
        return self._runners[0].name

    @property
    def store_key(self) -> str:
        """The cache folder of this part's outputs: bfloat16 ones are kept apart."""
        return self.key + ("-bf16" if self._bf16 else "")

    @property
    def _path(self) -> Path:
        return engine_path(self.key)

    def plan(self, images: int) -> str:
        """Choose the engine for a job of ``images``: converting only pays for a large one.

        Converting takes ~9.5 s here and saves ~5 ms an image, so below
        ``defaults.ENGINE_MIN_IMAGES`` Keras finishes first, unless the engine is cached.
        """
        if self._may_plan and self._runners is None:
            convert = images >= defaults.ENGINE_MIN_IMAGES or self._path.is_file()
            if convert:
                self._load()
            else:
                self._runners = []
        return self.engine

    def _say(self, text: str) -> None:
        if self.notify:
            self.notify(text)

    def _fall_back(self, reason: str, runner=None) -> None:
        """Drop ``runner`` (the current engine) for the next one (Keras last), saying why."""
        self.reasons.append(reason)
        if self._runners:
            self._runners.remove(runner or self._runners[0])
        if self._trial is not None and len(self._runners) < 2:
            self._trial = None
        self._say(f"  {reason}: using {self.label}")

    def _content(self) -> bytes:
        """The converted TFLite model: from the cache, else converted now (and cached)."""
        path = self._path
        if path.is_file():
            content = path.read_bytes()
            os.utime(path)
            return content
        import tensorflow as tf

        start = time.perf_counter()
        self._say("converting the frozen base to a TFLite engine (once; cached for later runs)...")
        with silenced():
            content = tf.lite.TFLiteConverter.from_keras_model(self.model).convert()
        self._say(f"  converted in {time.perf_counter() - start:.1f} s")
        if writable():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda tmp: Path(tmp).write_bytes(content))
            except DiskFullError:  # the engine runs from memory; the next run converts
                cache_full(path.parent)
        release_memory()  # the converter's garbage, before the outputs fill memory
        return content

    def _load(self) -> None:
        """Load the converted engines, fastest here first; Keras if none loads."""
        self._runners = []
        try:
            content = self._content()
        except Exception as e:  # noqa: BLE001 - any converter failure means: run on Keras
            self._fall_back(f"converting the frozen base to TFLite failed ({type(e).__name__})")
            return
        names = [self._forced] if self._forced else ["tflite"] + (
            ["openvino"] if runtimes.openvino_available() else [])
        for name in names:
            try:
                self._runners.append(self._runner(name, content))
            except Exception as e:  # noqa: BLE001 - an engine that cannot load is skipped
                self.reasons.append(f"{name} could not load the engine ({type(e).__name__}: {e})")
                self._say(f"  {self.reasons[-1]}")
        if len(self._runners) > 1:
            self._runners, self._trial = self._saved_choice(self._runners)

    def _runner(self, name: str, content: bytes):
        if name == "tflite":
            return runtimes.TFLiteRunner(content, self.output_shapes)
        source = self._path if self._path.is_file() else content
        return runtimes.OpenVINORunner(source, self.output_shapes,
                                       tuple(self.model.inputs[0].shape[1:]),
                                       "bf16" if self._bf16 else "f32")

    @property
    def _choice_file(self) -> Path:
        return self._path.with_suffix(".json")  # evicted with the engine it is about

    def _here(self) -> str:
        return f"{machine()} | {'bf16' if self._bf16 else 'f32'}"

    def _saved_choice(self, runners: list) -> tuple[list, dict | None]:
        """Runners in the order chosen before on this machine, or a trial to choose it."""
        try:
            saved = json.loads(self._choice_file.read_text(encoding="utf-8"))
            if (saved["machine"] == self._here()
                    and sorted(saved["order"]) == sorted(r.name for r in runners)):
                return sorted(runners, key=lambda r: saved["order"].index(r.name)), None
        except (OSError, ValueError, KeyError, TypeError):
            pass
        return runners, {r.name: [] for r in runners}

    def _next_runner(self, images: int):
        """The engine for this batch: the chosen one, or while choosing, each in turn."""
        if self._trial is None or images < TRIAL_MIN_IMAGES:
            return self._runners[0]
        return min(self._runners, key=lambda r: len(self._trial[r.name])
                   + (r.name in self._checked))

    def _timed(self, runner, seconds_per_image: float) -> None:
        """Record a trial batch; once every engine has its batches, choose and cache."""
        self._trial[runner.name].append(seconds_per_image)
        if min(len(t) for t in self._trial.values()) < TRIAL_BATCHES:
            return
        speed = {name: 1.0 / float(np.median(t)) for name, t in self._trial.items()}
        order = choose(speed)
        self._runners = sorted(self._runners, key=lambda r: order.index(r.name))[:1]
        self._trial = None
        self._say("  engines measured on this job (images/s, once on this machine): "
                  + ", ".join(f"{name} {v:.1f}" for name, v in speed.items())
                  + f": {self.engine}")
        if writable():
            text = json.dumps({"machine": self._here(), "order": order,
                               "images_per_second": {k: round(v, 1) for k, v in speed.items()}})
            try:
                atomic_write(self._choice_file,
                             lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
            except (DiskFullError, OSError):
                pass  # measured again next time

    def _run_keras(self, x: np.ndarray) -> list[np.ndarray]:
        if self._call is None:
            self._call = compiled(self.model)
        return self._call(x)

    def _disagreement(self, runner, out: list[np.ndarray], x: np.ndarray) -> str | None:
        """Why the engine's first outputs cannot stand for Keras', or None when they can."""
        tolerance = PARITY_TOLERANCE[runner.precision]
        for got, ref in zip(out, self._run_keras(x[:4])):
            scale = max(float(np.abs(ref).max()), 1.0)
            diff = float(np.abs(got[:4] - ref).max())
            if not diff <= tolerance * scale:  # NaN included
                return (f"{_named(runner.name, runner.precision)} differs from Keras by "
                        f"{diff:.3g} (tolerance "
                        f"{tolerance * scale:.3g})")
        return None

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        while self.engine != "keras":
            if self._runners is None:
                self._load()
                continue
            runner = self._next_runner(len(x))
            start = time.perf_counter()
            try:
                out = runner(x)
            except Exception as e:  # noqa: BLE001 - a failing engine hands over to the next
                self._fall_back(f"{runner.name} failed ({type(e).__name__}: {e})", runner)
                continue
            seconds = time.perf_counter() - start
            if runner.name not in self._checked:  # its first batch: checked, not timed
                reason = self._disagreement(runner, out, x)
                if reason:
                    self._fall_back(reason, runner)
                    continue
                self._checked.add(runner.name)
            elif self._trial is not None and len(x) >= TRIAL_MIN_IMAGES:
                self._timed(runner, seconds / len(x))
            return out
        return self._run_keras(x)


def _named(engine: str, precision: str) -> str:
    return engine + (f" {precision}" if precision != "f32" else "")


def choose(speed: dict[str, float]) -> list[str]:
    """Engine names fastest first from measured images/s; OpenVINO must beat TFLite by
    ``CHOICE_MARGIN`` to go first (TFLite is the engine with the longer record here)."""
    return sorted(speed, key=lambda name: -speed[name] / (CHOICE_MARGIN if name != "tflite"
                                                          else 1.0))


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
