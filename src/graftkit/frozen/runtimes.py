"""The runtimes that can run a converted frozen part: TensorFlow Lite (XNNPACK) and OpenVINO.

Both read the one TFLite file graftkit converts and caches, so adding a runtime costs no second
conversion. Each runner takes float32 pixels and returns one array per model output, in the
Keras model's order (matched by shape).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from graftkit.errors import UsageError
from graftkit.quiet import silenced

ENGINE_ENV = "GRAFTKIT_ENGINE"  # forces one engine: "keras", "tflite" or "openvino"
ENGINES = ("keras", "tflite", "openvino")
# "bf16": OpenVINO computes in bfloat16 on CPUs that have it (AMX, AVX512-BF16); the frozen
# outputs are then cached apart from float32 ones. Unset or "f32": float32 everywhere.
PRECISION_ENV = "GRAFTKIT_ENGINE_PRECISION"
PRECISIONS = ("f32", "bf16")


def forced_engine() -> str:
    """The engine ``$GRAFTKIT_ENGINE`` forces, or "" (a typo is an error, not ignored)."""
    forced = os.environ.get(ENGINE_ENV, "").strip().lower()
    if forced and forced not in ENGINES:
        raise UsageError(f"{ENGINE_ENV}={forced!r} is not an engine: use one of "
                         f"{', '.join(ENGINES)}, or unset it to let graftkit choose")
    return forced


def wanted_precision() -> str:
    """The precision ``$GRAFTKIT_ENGINE_PRECISION`` asks for: "f32" (default) or "bf16"."""
    wanted = os.environ.get(PRECISION_ENV, "").strip().lower() or "f32"
    if wanted not in PRECISIONS:
        raise UsageError(f"{PRECISION_ENV}={wanted!r} is not a precision: use f32 or bf16")
    return wanted


def threads() -> int:
    return os.cpu_count() or 1


def _order(output_shapes: Sequence[tuple], found: Sequence[tuple]) -> list[int] | None:
    """Which of the runtime's outputs is each model output, by shape; None if one is missing
    or ambiguous (an engine cached for another cut of the network, say)."""
    order = []
    for shape in output_shapes:
        match = [i for i, s in enumerate(found) if tuple(s) == tuple(shape)]
        if len(match) != 1:
            return None
        order.append(match[0])
    return order


class TFLiteRunner:
    """TensorFlow Lite with its XNNPACK delegate, one image per call (fastest here)."""

    name = "tflite"
    precision = "f32"

    def __init__(self, content: bytes, output_shapes: Sequence[tuple]):
        self.output_shapes = list(output_shapes)
        with silenced():  # "INFO: Created TensorFlow Lite XNNPACK delegate" on stderr otherwise
            self._interp = interpreter(model_content=content, num_threads=threads())
            self._interp.allocate_tensors()
        details = self._interp.get_output_details()
        order = _order(self.output_shapes, [d["shape"][1:] for d in details])
        if order is None:
            raise ValueError("the engine's outputs do not match the model's")
        self._outputs = [details[i]["index"] for i in order]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        interp = self._interp
        inp = interp.get_input_details()[0]
        if tuple(inp["shape"]) != (1, *x.shape[1:]):
            interp.resize_tensor_input(inp["index"], (1, *x.shape[1:]))
            interp.allocate_tensors()
        results = [np.empty((len(x), *shape), dtype=np.float32) for shape in self.output_shapes]
        for i in range(len(x)):
            interp.set_tensor(inp["index"], x[i: i + 1])
            interp.invoke()
            for result, index in zip(results, self._outputs):
                result[i] = interp.get_tensor(index)[0]
        return results


def interpreter(**kwargs):
    """A TFLite interpreter: LiteRT's when installed, else TensorFlow's (deprecated, still
    shipped; its deprecation warning is silenced)."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import warnings

        import tensorflow as tf

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tf.lite.Interpreter(**kwargs)
    return Interpreter(**kwargs)


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def openvino_bf16() -> bool:
    """Whether OpenVINO's CPU plugin can compute in bfloat16 here (AMX or AVX512-BF16)."""
    if not openvino_available():
        return False
    import openvino as ov

    try:
        return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except RuntimeError:
        return False


class OpenVINORunner:
    """OpenVINO's CPU plugin on the cached TFLite file, one image per call.

    The LATENCY hint on every core: the THROUGHPUT hint ran at half speed on 2 cores. The
    precision is set explicitly because the plugin picks bfloat16 by itself on CPUs with AMX.
    """

    name = "openvino"

    def __init__(self, source: Path | bytes, output_shapes: Sequence[tuple], image_shape: tuple,
                 precision: str = "f32"):
        import openvino as ov

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}")
        self.precision = precision
        self.output_shapes = list(output_shapes)
        core = ov.Core()
        if isinstance(source, bytes):  # not cached (a full disk): read from a scratch copy
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "part.tflite"
                path.write_bytes(source)
                model = core.read_model(str(path))
        else:
            model = core.read_model(str(source))
        model.reshape({model.inputs[0].get_any_name(): [1, *image_shape]})
        compiled = core.compile_model(model, "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads(),
            "INFERENCE_PRECISION_HINT": precision})
        order = _order(self.output_shapes,
                       [tuple(o.get_shape())[1:] for o in compiled.outputs])
        if order is None:
            raise ValueError("the engine's outputs do not match the model's")
        self._outputs = order
        self._request = compiled.create_infer_request()

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        request = self._request
        results = [np.empty((len(x), *shape), dtype=np.float32) for shape in self.output_shapes]
        for i in range(len(x)):
            request.infer({0: x[i: i + 1]})
            for result, index in zip(results, self._outputs):
                result[i] = request.get_output_tensor(index).data[0]
        return results
