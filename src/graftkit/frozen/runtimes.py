"""The runtimes that can run a converted frozen part: TensorFlow Lite (XNNPACK) and OpenVINO.

Both read the one TFLite file graftkit converts and caches, so adding a runtime costs no second
conversion. Each runner takes float32 pixels and returns one array per model output, in the
Keras model's order (matched by shape). In int8, OpenVINO runs a model NNCF quantized from that
file (``quantize_openvino``), kept as one zip of its IR files.
"""

from __future__ import annotations

import importlib.util
import io
import os
import platform
import sys
import tempfile
import zipfile
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


def engine_label(engine: str, precision: str = "f32") -> str:
    """"tflite", "openvino int8": the engine and, when not float32, its precision (logs, the
    run's summary and report)."""
    return engine + (f" {precision}" if precision != "f32" else "")


def openvino_int8_available() -> bool:
    """Whether OpenVINO can run int8 here: it and NNCF, which quantizes for it, are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def int8_runtime(forced: str = "") -> str:
    """Where int8 runs: on x86-64, OpenVINO quantized by NNCF where both are installed (1.3x
    TFLite's int8 on an AVX2 CPU), else TFLite (Arm's dot-product kernels are XNNPACK's
    strength; OpenVINO's int8 on Arm is not measured); ``$GRAFTKIT_ENGINE`` (``forced``) picks
    one ("" when it forces OpenVINO without NNCF, or Keras)."""
    if forced == "tflite":
        return "tflite"
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if (forced == "openvino" or (not forced and x86)) and openvino_int8_available():
        return "openvino"
    return "tflite" if not forced else ""


def _import_nncf():
    """NNCF without its usage telemetry: on import it would write a client id under ~/intel and
    report runs to Google Analytics unasked. It falls back to a stub when the telemetry package
    cannot be imported, so that import is refused for the moment NNCF is imported."""
    if "nncf" in sys.modules:
        return sys.modules["nncf"]
    missing = object()
    saved = sys.modules.get("openvino_telemetry", missing)
    sys.modules["openvino_telemetry"] = None
    try:
        import nncf
    finally:
        if saved is missing:
            del sys.modules["openvino_telemetry"]
        else:
            sys.modules["openvino_telemetry"] = saved
    import logging

    nncf.set_log_level(logging.ERROR)
    return nncf


_IR_FILES = ("model.xml", "model.bin")


def quantize_openvino(source: Path | bytes, image_shape: tuple, images: np.ndarray) -> bytes:
    """The float32 TFLite frozen part quantized to int8 for OpenVINO by NNCF's post-training
    quantization on ``images``, as one zip of the IR's two files.

    Every layer's weights keep 7 bits (NNCF's overflow fix, everywhere rather than in the first
    layer only): without 8-bit dot-product instructions the CPU plugin multiplies through
    16-bit sums that full 8-bit weights overflow (measured on Lite0 at 288 px with AVX2: mean
    cosine to float32 0.94 with the fix in the first layer, 0.98 with it in every layer)."""
    nncf = _import_nncf()
    import openvino as ov
    from nncf.quantization.advanced_parameters import (
        AdvancedQuantizationParameters,
        OverflowFix,
    )

    model = _read_tflite(ov.Core(), source)
    model.reshape({model.inputs[0].get_any_name(): [1, *image_shape]})
    with silenced():  # its progress bars
        quantized = nncf.quantize(
            model, nncf.Dataset([img[None] for img in np.asarray(images, np.float32)]),
            subset_size=len(images),
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.ENABLE))
    with tempfile.TemporaryDirectory() as tmp:
        ov.save_model(quantized, str(Path(tmp) / _IR_FILES[0]), compress_to_fp16=False)
        packed = io.BytesIO()
        with zipfile.ZipFile(packed, "w", zipfile.ZIP_STORED) as z:
            for name in _IR_FILES:  # fixed dates (node names still differ between runs)
                z.writestr(zipfile.ZipInfo(name, (2000, 1, 1, 0, 0, 0)),
                           (Path(tmp) / name).read_bytes())
    return packed.getvalue()


def _read_tflite(core, source: Path | bytes):
    if isinstance(source, bytes):  # not cached (a full disk): read from a scratch copy
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "part.tflite"
            path.write_bytes(source)
            return core.read_model(str(path))
    return core.read_model(str(source))


def _read_ir(core, packed: bytes):
    import openvino as ov

    with zipfile.ZipFile(io.BytesIO(packed)) as z:
        xml, weights = (z.read(name) for name in _IR_FILES)
    return core.read_model(xml, ov.Tensor(np.frombuffer(weights, dtype=np.uint8).copy()))


class OpenVINORunner:
    """OpenVINO's CPU plugin on the cached TFLite file, one image per call.

    The LATENCY hint on every core: the THROUGHPUT hint ran at half speed on 2 cores. The
    precision is set explicitly because the plugin picks bfloat16 by itself on CPUs with AMX.
    """

    name = "openvino"

    def __init__(self, source: Path | bytes, output_shapes: Sequence[tuple], image_shape: tuple,
                 precision: str = "f32"):
        """``source``: the TFLite file (or its bytes); for "int8", ``quantize_openvino``'s zip."""
        import openvino as ov

        if precision not in (*PRECISIONS, "int8"):
            raise ValueError(f"unknown precision {precision!r}")
        self.precision = precision
        self.output_shapes = list(output_shapes)
        core = ov.Core()
        if precision == "int8":
            model = _read_ir(core, source if isinstance(source, bytes) else source.read_bytes())
        else:
            model = _read_tflite(core, source)
        model.reshape({model.inputs[0].get_any_name(): [1, *image_shape]})
        compiled = core.compile_model(model, "CPU", {  # int8: the rest of the graph in float32
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads(),
            "INFERENCE_PRECISION_HINT": "f32" if precision == "int8" else precision})
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
