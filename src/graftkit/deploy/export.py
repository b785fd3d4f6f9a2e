"""``graft export``: the run's model for another runtime, verified by that runtime.

Every export takes raw 0-255 RGB (preprocessing is inside the model; augmentation never was)
and is checked after writing: the exported file is run by its own runtime (TensorFlow for a
SavedModel, the TFLite interpreter, onnxruntime) on the run's validation images and compared
with the Keras model. A float32 export must agree within 1e-4 on every probability and on every
top-1 label, or the export fails; a quantized one reports its accuracy beside the float32 one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from graftkit import defaults
from graftkit.data.sample import stratified
from graftkit.deploy import mend, tflite_metadata
from graftkit.errors import ExportError, UsageError
from graftkit.outputs.open_set import OOD_SCORE
from graftkit.quiet import silenced

FORMATS = ("savedmodel", "tflite", "onnx", "coreml")
QUANTIZE = {"savedmodel": ("none",), "tflite": ("none", "float16", "int8"),
            "onnx": ("none", "int8"), "coreml": ("none", "float16")}
FP32_TOLERANCE = 1e-4
OOD_TOLERANCE = 1e-3  # relative to the score (at least 1e-3 absolute)
# Validation images run through the exported model: every one up to this many (a sample of
# 256 of flowers5's 400 claimed 0.9453 for an export right on 0.9500 of all of them; the
# check costs seconds), a stratified random sample beyond.
MAX_CHECK_IMAGES = 1000
CALIBRATION_IMAGES = 100  # training images for int8 calibration
# What every export takes, as export.json records it for whoever feeds it images.
INPUT_NOTE = ("raw RGB pixel values 0-255 as float32, shape (batch, size, size, 3); the image "
              "turned upright by its EXIF orientation, alpha composited on white, then resized "
              "whole (squashed, not cropped) to size x size with bilinear interpolation "
              "(graftkit.data.images.load_image); normalisation is inside the model")


@dataclass
class ExportResult:
    """An exported model and how closely it matches the Keras model it came from."""

    path: str
    format: str
    quantize: str
    size_bytes: int
    keras_size_bytes: int
    images_checked: int
    max_abs_diff: float | None  # None: not run here (Core ML off Apple systems)
    top1_agreement: float | None  # multi-label: images given the same labels (at the thresholds)
    accuracy: float | None  # multi-label: None (see ``labels``)
    keras_accuracy: float | None
    # The "unknown" answer: the export's second output, and how it matched graft predict.
    rejection: dict | None = None
    ood_max_abs_diff: float | None = None
    known_agreement: float | None = None
    # the same, over the images farther from the threshold than the tolerance (must be 1.0)
    known_agreement_clear: float | None = None
    # which images: a stratified random sample of the validation images (every class)
    check_sample: str = ""
    calibration_images: int | None = None  # int8: training images it was calibrated on
    calibration_sample: str | None = None
    quantize_reason: str = ""  # why this quantization: asked for, or following the run
    input: dict | None = None  # what the exported model takes
    # multi-label runs: each label's threshold, and the export's decisions against Keras'
    labels: dict | None = None
    # TFLite: MediaPipe Tasks' metadata, and how MediaPipe's ImageClassifier ran the file
    mediapipe: dict | None = None
    # Core ML: its specification as checked (it runs only on Apple systems)
    coreml: dict | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _batches(x: np.ndarray, size: int = 32):
    for i in range(0, len(x), size):
        yield x[i: i + size]


def _named(outputs: dict) -> dict[str, np.ndarray]:
    """An export's outputs by name: ``probabilities`` (and ``ood_score``); a single unnamed
    output (a run without open-set statistics) is the probabilities."""
    if len(outputs) == 1:
        return {"probabilities": next(iter(outputs.values()))}
    return outputs


def _stack(parts: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.concatenate([np.asarray(p[k], dtype=np.float32) for p in parts])
            for k in parts[0]}


def _run_tflite(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    from graftkit.frozen.runtimes import interpreter

    interp = interpreter(model_path=str(path))
    runner = interp.get_signature_runner()  # outputs by name, whatever their tensor order
    name = interp.get_signature_list()["serving_default"]["inputs"][0]
    return _stack([_named(runner(**{name: b.astype(np.float32)})) for b in _batches(x)])


def _run_savedmodel(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import tensorflow as tf

    loaded = tf.saved_model.load(str(path))

    def run(b):
        out = loaded.serve(tf.constant(b))
        return _named({k: v.numpy() for k, v in out.items()} if isinstance(out, dict)
                      else {"output": out.numpy()})

    return _stack([run(b) for b in _batches(x)])


def _run_onnx(path: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    names = [o.name for o in session.get_outputs()]
    return _stack([_named(dict(zip(names, session.run(None, {name: b.astype(np.float32)}))))
                   for b in _batches(x)])


def _sample_note(kept: int, available: int, seed: int, what: str) -> str:
    if kept == available:
        return f"all {available} {what}"
    return f"{kept} of {available} {what}: a stratified random sample (seed {seed}, every class)"


def _images(items: list, size: int) -> tuple[np.ndarray, list[str], list[str]]:
    from graftkit.data.images import load_image

    if not items:
        raise ExportError("none of the run's images are readable any more: the export "
                          "cannot be verified; run graft export where the data is")
    x = np.stack([load_image(p, size) for p, _ in items]).astype(np.float32)
    return x, [label for _, label in items], [p for p, _ in items]


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def export(run_dir: str | os.PathLike, fmt: str = "savedmodel", quantize: str = "auto",
           out: str | os.PathLike | None = None,
           log: Callable[[str], None] | None = None) -> ExportResult:
    """Export a run's model for serving, checked against the Keras model on validation images.

    The exported model takes raw RGB pixels (its preprocessing is inside); ``labels.txt`` is
    written beside it. Up to 1,000 validation images (beyond, a stratified sample) run through
    the export, in its own runtime, and the Keras model, so a quantized model's cost is measured.

    Args:
        run_dir: a run folder written by ``graft fit``.
        fmt: ``"savedmodel"``, ``"tflite"`` (with MediaPipe's metadata where
            ``graftkit[mobile]`` is installed), ``"onnx"`` (needs ``graftkit[export]``) or
            ``"coreml"`` (needs ``graftkit[coreml]``; converted and its specification checked,
            not run, off Apple systems). Defaults to ``"savedmodel"``.
        quantize: ``"none"``; for TFLite also ``"float16"`` or ``"int8"`` (calibrated on 100
            training images, a stratified random sample; for a run whose frozen part ran in
            int8, on the images its engine was calibrated on); ONNX ``"int8"`` quantizes the
            weights only; Core ML ``"float16"`` computes in float16. ``"auto"`` follows the
            run: TFLite int8 for an int8 run, else none.
            Defaults to ``"auto"``.
        out: the folder to write. Defaults to ``run_dir/export/FORMAT[-QUANTIZE]``.
        log: told each step as it starts (a conversion takes a minute or two). Defaults to
            None.

    Returns:
        An ``ExportResult`` (``path``, sizes, what was checked and measured: ``export.json``).

    Example:
        >>> graftkit.export("runs/photos", fmt="tflite", quantize="int8").accuracy  # doctest: +SKIP
    """
    from graftkit.classifier import load
    from graftkit.outputs.run import MODEL_FILE, read_split

    check_request(fmt, quantize)
    clf = load(run_dir := Path(run_dir))
    int8_run = (clf.record.frozen_outputs or {}).get("precision") == "int8"
    quantize, reason = _quantization(fmt, quantize, int8_run)
    classes, size = clf.classes, clf.image_size
    model, float_part, open_set = _exported_model(clf)
    split = read_split(run_dir)
    seed = int(clf.record.options.get("seed", defaults.SEED))
    check_items = stratified(split["val"], MAX_CHECK_IMAGES, seed)
    calibration = _calibration_items(split, fmt, quantize, int8_run, seed)
    name = fmt if quantize == "none" else f"{fmt}-{quantize}"
    target_dir = Path(out) if out else run_dir / "export" / name
    target_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=target_dir))
    say = log or (lambda _line: None)
    try:
        if fmt == "coreml":
            return _write(_coreml(clf, model, open_set, quantize, reason, work, say), target_dir,
                          classes)
        say(f"converting to {name}" + (f" (calibrated on {len(calibration)} training images)"
                                       if calibration else "") + "...")
        with silenced():  # the converters' and runtimes' own log lines (XNNPACK, tf2onnx, ORT)
            built, run = _build(model, fmt, quantize, work, calibration, size, float_part)
            no_metadata = tflite_metadata.add(built, clf, open_set) if fmt == "tflite" else None
        say(f"checking it with its own runtime on {len(check_items)} validation images...")
        x, labels, paths = _images(check_items, size)
        outputs = _run_checked(run, built, x, name)
        result = (_compared_label_sets if clf.multi_label else _compared)(
            clf, x, labels, outputs["probabilities"], fmt, quantize)
        result.size_bytes = _size(built)
        result.keras_size_bytes = (run_dir / MODEL_FILE).stat().st_size
        result.check_sample = _sample_note(len(x), len(split["val"]), seed, "validation images")
        result.quantize_reason = reason
        if calibration is not None:
            result.calibration_images = len(calibration)
            result.calibration_sample = _calibration_note(calibration, split, int8_run, seed)
        if quantize == "none":
            _require_parity(result)
        if OOD_SCORE in outputs:
            _check_rejection(result, clf, paths, outputs[OOD_SCORE], fmt, quantize, int8_run)
        if fmt == "tflite":
            result.mediapipe = tflite_metadata.check(built, x, outputs, paths, clf.classes, say,
                                                     no_metadata, quantize)
        result.path = str(built)
        return _write(result, target_dir, classes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _require_parity(result: ExportResult) -> None:
    """A float32 export must give the Keras model's probabilities (within the tolerance) and
    top-1 labels (multi-label: the same labels, where not closer to a threshold than that)."""
    same = result.labels["same_labels_clear"] if result.labels else result.top1_agreement
    diff = result.max_abs_diff
    assert diff is not None and same is not None  # both measured by the comparison
    if diff > FP32_TOLERANCE or same < 1.0:
        raise ExportError(
            f"the {result.format} export disagrees with the Keras model (max difference "
            f"{diff:.2e}, top-1 agreement {result.top1_agreement:.4f}); nothing was written")


def _coreml(clf, model, open_set, quantize: str, reason: str, work: Path,
            say: Callable[[str], None]) -> ExportResult:
    """The Core ML package, its specification checked (Core ML runs only on Apple systems)."""
    from graftkit.deploy import coreml
    from graftkit.outputs.run import MODEL_FILE

    say(f"converting to coreml ({'float16' if quantize == 'float16' else 'float32'} compute)...")
    with silenced():
        built = coreml.build(model, clf, open_set, work, quantize)
    say("checking its specification: input, outputs, class labels...")
    size = clf.image_size
    return ExportResult(
        path=str(built), format="coreml", quantize=quantize, size_bytes=_size(built),
        keras_size_bytes=(clf.run_dir / MODEL_FILE).stat().st_size, images_checked=0,
        max_abs_diff=None, top1_agreement=None, accuracy=None, keras_accuracy=None,
        check_sample="none: Core ML runs only on Apple systems (coreml.run_on_a_mac says how)",
        quantize_reason=reason, coreml=coreml.check_spec(built, clf, open_set),
        input={"size": [size, size], "channels": 3, "how": INPUT_NOTE.replace(
            "as float32, shape (batch, size, size, 3)", "as an RGB image (Core ML image input)")})


def _write(result: ExportResult, target_dir: Path, classes: list[str]) -> ExportResult:
    """The checked export into place, with ``labels.txt`` and ``export.json`` beside it."""
    from graftkit.files import honour_umask, write_json, write_text

    built = Path(result.path)
    honour_umask(built)
    final = target_dir / ("saved_model" if result.format == "savedmodel" else built.name)
    if final.exists():
        shutil.rmtree(final) if final.is_dir() else final.unlink()
    os.replace(built, final)
    result.path = str(final)
    write_text(target_dir / "labels.txt", "".join(f"{c}\n" for c in classes))
    write_json(target_dir / "export.json", result.as_dict())
    return result


def _compared(clf, x: np.ndarray, labels: list[str], got: np.ndarray, fmt: str,
              quantize: str) -> ExportResult:
    """The export's probabilities on ``x`` against the Keras model's, and both accuracies."""
    ref = clf.model.predict(x, verbose=0)
    y = np.array([clf.classes.index(label) for label in labels])
    size = clf.image_size
    return ExportResult(
        path="", format=fmt, quantize=quantize, size_bytes=0, keras_size_bytes=0,
        images_checked=len(x), max_abs_diff=float(np.abs(got - ref).max()),
        top1_agreement=float((got.argmax(1) == ref.argmax(1)).mean()),
        accuracy=float((got.argmax(1) == y).mean()),
        keras_accuracy=float((ref.argmax(1) == y).mean()),
        input={"size": [size, size], "channels": 3, "how": INPUT_NOTE})


def _compared_label_sets(clf, x: np.ndarray, labels: list[str], got: np.ndarray, fmt: str,
                         quantize: str) -> ExportResult:
    """A multi-label export against the Keras model: probabilities, and the labels each
    gives at the run's thresholds (a float32 export must give the same ones, labels closer to
    their threshold than the tolerance excepted)."""
    from graftkit.outputs.multilabel import f1_scores, multi_hot

    ref = clf.model.predict(x, verbose=0)
    thresholds = clf.thresholds
    truth = multi_hot([[clf.classes.index(n) for n in text.split()] for text in labels],
                      len(clf.classes))
    given, expected = got >= thresholds, ref >= thresholds
    clear = np.abs(ref - thresholds) > FP32_TOLERANCE
    same = given == expected
    size = clf.image_size
    result = ExportResult(
        path="", format=fmt, quantize=quantize, size_bytes=0, keras_size_bytes=0,
        images_checked=len(x), max_abs_diff=float(np.abs(got - ref).max()),
        top1_agreement=float(same.all(axis=1).mean()), accuracy=None, keras_accuracy=None,
        input={"size": [size, size], "channels": 3, "how": INPUT_NOTE},
        labels={"thresholds": dict(zip(clf.classes, map(float, thresholds))),
                "how": "output probabilities holds one sigmoid per label (labels.txt order); "
                       "a label is given when its probability >= its threshold",
                "same_labels": float(same.all(axis=1).mean()),
                "same_labels_clear": float(same[clear].all()) if clear.any() else 1.0,
                "example_f1": f1_scores(truth, given)["example_f1"],
                "keras_example_f1": f1_scores(truth, expected)["example_f1"]})
    return result


def _run_checked(run, built: Path, x: np.ndarray, name: str) -> dict[str, np.ndarray]:
    """The export's outputs on ``x``; a runtime's own refusal (a kernel's check) is one error."""
    try:
        with silenced():
            return run(built, x)
    except (RuntimeError, ValueError) as exc:
        raise ExportError(f"the {name} export does not run in its own runtime "
                          f"({type(exc).__name__}: {str(exc).strip()}); nothing was "
                          "written") from None


def _check_rejection(result: ExportResult, clf, paths: list[str], scores: np.ndarray,
                     fmt: str, quantize: str, int8_run: bool = False) -> None:
    """The export's ``ood_score`` against ``graft predict``'s on the same files: a float32
    export must agree within the tolerance and give the same known/unknown decisions (images
    closer to the threshold than the tolerance excepted)."""
    open_set = clf.open_set
    from graftkit.data.inputs import Inputs

    # An int8 run predicts through its int8 engine; a float32 export of it computes the float32
    # model, so that is what it must match (an int8 export is compared with the run's own).
    fast = clf.fast
    clf.fast = quantize != "none" or not int8_run
    try:
        _, expected = clf.scored(Inputs.of_files(paths))
    finally:
        clf.fast = fast
    tolerance = OOD_TOLERANCE * np.maximum(1.0, np.abs(expected))
    diff = np.abs(scores.astype(np.float64) - expected)
    clear = np.abs(expected - open_set.threshold) > tolerance
    agree = (scores <= open_set.threshold) == (expected <= open_set.threshold)
    result.ood_max_abs_diff = float(diff.max())
    result.known_agreement = float(agree.mean())
    result.known_agreement_clear = float(agree[clear].mean()) if clear.any() else 1.0
    result.rejection = {**open_set.describe(), "output": OOD_SCORE,
                        "tolerance": f"{OOD_TOLERANCE:g} x max(1, |score|)",
                        "how": "the model's second output ood_score: an image is unknown when "
                               "ood_score > threshold (the run's threshold keeps "
                               f"{open_set.keep:.0%} of its validation images); probabilities "
                               "and the closest class are given either way"}
    result.rejection.pop("file", None)
    if quantize == "none" and ((diff > tolerance).any() or not agree[clear].all()):
        raise ExportError(
            f"the {fmt} export's ood_score disagrees with graft predict (max difference "
            f"{result.ood_max_abs_diff:.2e}, same known/unknown decision on "
            f"{result.known_agreement:.4f} of the images); nothing was written")


def _exported_model(clf) -> tuple:
    """The model to export, the layer an int8 TFLite export keeps in float32 and the run's
    ``OpenSet`` (read once): with the open-set score, outputs ``probabilities`` and
    ``ood_score`` by name; else the classifier, None, None."""
    open_set = clf.open_set
    if open_set is None or clf._features is None:
        return clf.model, None, None
    from graftkit.outputs.open_set import open_set_model

    return open_set_model(clf.model, open_set), OOD_SCORE, open_set


def _quantization(fmt: str, quantize: str, int8_run: bool) -> tuple[str, str]:
    """The quantization to build and why: as asked, or (``auto``) following the run."""
    if quantize != "auto":
        return quantize, f"--quantize {quantize}"
    if int8_run and fmt == "tflite":
        return "int8", ("the run's frozen part ran in int8 (--engine-precision): the export "
                        "follows it")
    return "none", ("the run computed in float32" if not int8_run else
                    f"{fmt} has no int8 to match the run's engine: float32")


def _engine_sample(split: dict) -> list:
    """The training items an int8 run's engine was calibrated on (the same fixed sample)."""
    from graftkit.frozen.precision import sample

    return sample([(p, label) for p, label in split["train"]])[0]


def _calibration_items(split: dict, fmt: str, quantize: str, int8_run: bool,
                       seed: int) -> list | None:
    """TFLite int8: the training items to calibrate on (an int8 run's own engine sample)."""
    if quantize != "int8" or fmt != "tflite":
        return None
    return (_engine_sample(split) if int8_run
            else stratified(split["train"], CALIBRATION_IMAGES, seed))


def _calibration_note(calibration: list, split: dict, int8_run: bool, seed: int) -> str:
    if int8_run:
        return f"the {len(calibration)} training images the run's int8 engine was calibrated on"
    return _sample_note(len(calibration), len(split["train"]), seed, "training images")


def check_request(fmt: str, quantize: str) -> None:
    """A format and quantization that exist, and the extra ONNX needs, before any work (and
    without importing anything: tf2onnx alone loads TensorFlow)."""
    import importlib.util

    if fmt not in FORMATS:
        raise UsageError(f"--format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if quantize not in QUANTIZE[fmt] and quantize != "auto":
        raise UsageError(f"--quantize {quantize} is not available for {fmt}; use "
                         f"{' or '.join(QUANTIZE[fmt])}")
    if fmt == "onnx" and any(importlib.util.find_spec(m) is None
                             for m in ("onnxruntime", "tf2onnx", "onnx")):
        raise UsageError("ONNX export needs the extra: pip install 'graftkit[export]'")
    if fmt == "coreml" and importlib.util.find_spec("coremltools") is None:
        from graftkit.deploy.coreml import INSTALL_HINT

        raise UsageError(f"Core ML export needs coremltools: {INSTALL_HINT}")


def _build(model, fmt: str, quantize: str, work: Path, calibration: list | None, size: int,
           float_part: str | None = None):
    """``(path, runner)``: the export written in ``work`` and the function that runs it;
    ``float_part`` names a layer that an int8 TFLite export keeps in float32."""
    saved = work / "savedmodel"
    model.export(str(saved), format="tf_saved_model", verbose=False)
    if fmt == "savedmodel":
        return saved, _run_savedmodel
    if fmt == "tflite":
        built = work / "model.tflite"
        model_bytes = _convert_tflite(saved, quantize, calibration, size, float_part)
        if float_part:
            model_bytes = mend.half_constants(model_bytes, float_part)
        built.write_bytes(mend.classes_first(model_bytes))
        return built, _run_tflite
    built = work / "model.onnx"
    model.export(str(built), format="onnx", verbose=False)
    if quantize == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = work / "model-int8.onnx"
        quantize_dynamic(str(built), str(quantized), weight_type=QuantType.QInt8)
        built = quantized
    if float_part:
        mend.half_onnx(built, float_part)
    mend.classes_first_onnx(built)
    return built, _run_onnx


def _convert_tflite(saved: Path, quantize: str, calibration: list | None, size: int,
                    float_part: str | None = None) -> bytes:
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
    if quantize == "float16":
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    elif quantize == "int8":
        # Integer kernels calibrated on training images (never the validation ones the
        # accuracy is reported on); input and output stay float32 raw pixels/probabilities.
        x, _, _ = _images(calibration or [], size)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([img[None]] for img in x)
        if float_part:
            return _quantize_except(converter, saved, float_part, x)
    return converter.convert()


def _quantize_except(converter, saved: Path, float_part: str, x: np.ndarray) -> bytes:
    """The int8 model with the ops of layer ``float_part`` left in float32.

    The open-set score divides pooled features by their norm: in 8 bits the squares of most
    features round to 0, an image's norm can too, and TFLite's int8 division then stops the
    model (and where it does not, the cosine similarities are too coarse to rank neighbours).
    TensorFlow's selective quantization keeps those few ops in float32."""
    import tensorflow as tf

    names = [t["name"] for t in
             tf.lite.Interpreter(model_content=tf.lite.TFLiteConverter.from_saved_model(
                 str(saved)).convert()).get_tensor_details()
             if f"/{float_part}" in t["name"]]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=names)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converter, debug_dataset=lambda: ([img[None]] for img in x[:1]),
        debug_options=options)
    return debugger.get_nondebug_quantized_model()


def summary(result: ExportResult) -> str:
    if result.coreml:
        spec = result.coreml
        return "\n".join([
            f"exported coreml ({result.quantize}) to {result.path}",
            f"  size {result.size_bytes / 1e6:.2f} MB (model.keras "
            f"{result.keras_size_bytes / 1e6:.2f} MB)",
            f"  specification checked: image input {spec['input']['size'][0]}x"
            f"{spec['input']['size'][1]} RGB, outputs {', '.join(spec['outputs'])}"
            + (f", {len(spec['class_labels'])} class labels" if spec["class_labels"] else ""),
            f"  not run: {spec['why_not_run'].split(';')[0]}; {spec['run_on_a_mac']}"])
    lines = [
        f"exported {result.format} ({result.quantize}) to {result.path}",
        f"  size {result.size_bytes / 1e6:.2f} MB (model.keras {result.keras_size_bytes / 1e6:.2f} MB)",
        f"  checked with its own runtime on {result.check_sample}: max "
        f"probability difference {result.max_abs_diff:.2e}, top-1 agreement "
        f"{result.top1_agreement:.4f}",
    ]
    if result.labels:
        lines[-1] = lines[-1].replace("top-1 agreement", "same labels on")
        lines.append(f"  example-based F1 {result.labels['example_f1']:.4f} (Keras model "
                     f"{result.labels['keras_example_f1']:.4f}); thresholds per label in "
                     "export.json")
    else:
        lines.append(f"  accuracy {result.accuracy:.4f} (Keras model "
                     f"{result.keras_accuracy:.4f})")
    if result.calibration_sample:
        lines.append(f"  int8 calibrated on {result.calibration_sample}")
    if result.rejection:
        r = result.rejection
        lines.append(f"  unknown images: output ood_score ({r['method']}), unknown when above "
                     f"{r['threshold']:.4g}; matches graft predict within "
                     f"{result.ood_max_abs_diff:.1e}, same decision on "
                     f"{result.known_agreement:.4f} of the images")
    mp = result.mediapipe
    if mp and mp["metadata"]:
        files = mp["from_files"]
        lines.append(f"  MediaPipe ImageClassifier reads it (metadata: labels, raw 0-255 input): "
                     f"scores within {mp['max_abs_diff']:.1e} of the TFLite interpreter; given "
                     f"the files to decode and resize itself, top-1 agreement "
                     f"{files['top1_agreement']:.4f}, scores within {files['max_abs_diff']:.2f}")
    elif mp:
        lines.append(f"  no MediaPipe metadata: {mp['why']}")
    return "\n".join(lines)


__all__ = ["ExportError", "ExportResult", "export", "summary"]
