"""``graft export --format coreml``: an ``.mlpackage`` for Apple apps, with its class labels and
its preprocessing inside, written by Apple's ``coremltools``.

Core ML runs only on Apple systems, so the file is converted and its specification checked
(the image input, the outputs, the class labels), not run: on a Mac, ``docs/export.md`` shows the
few lines that run it on the validation images. A single-label run becomes a Core ML classifier
(``classLabel`` and ``classLabel_probs``, what Vision's ``VNCoreMLRequest`` turns into
classification observations); a multi-label run keeps one ``probabilities`` array, since a
classifier names one label per image. ``ood_score`` is a further output where the run has one.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from graftkit.errors import ExportError
from graftkit.outputs.open_set import OOD_SCORE

INSTALL_HINT = "pip install 'graftkit[coreml]' (Linux x86-64 and macOS have coremltools wheels)"
PACKAGE = "model.mlpackage"
# iOS 16 / macOS 13: the ML program format with float32 compute and image inputs.
TARGET = "iOS16"
HOW_TO_RUN = (
    "on a Mac: import coremltools as ct; from PIL import Image; "
    "m = ct.models.MLModel('model.mlpackage'); "
    "m.predict({'image': Image.open(path).convert('RGB').resize((SIZE, SIZE), Image.BILINEAR)})")


def available() -> bool:
    return importlib.util.find_spec("coremltools") is not None


def build(model, clf, open_set, work: Path, quantize: str) -> Path:
    """The ``.mlpackage`` in ``work``: float32 compute (``quantize="none"``, graft predict's
    arithmetic) or float16 (``"float16"``, what the Neural Engine runs)."""
    import coremltools as ct
    import tensorflow as tf

    size = clf.image_size
    names = ["probabilities"] + ([OOD_SCORE] if open_set is not None else [])

    def outputs(image):
        out = model(image, training=False)
        return tuple(out[n] for n in names) if isinstance(out, dict) else out

    function = tf.function(outputs).get_concrete_function(
        tf.TensorSpec((1, size, size, 3), tf.float32, name="image"))
    precision = ct.precision.FLOAT16 if quantize == "float16" else ct.precision.FLOAT32
    common = {"minimum_deployment_target": getattr(ct.target, TARGET),
              "compute_precision": precision}
    # Converted in two steps: coremltools cannot make a classifier of a TensorFlow function with
    # a second output in one (its output types stop at the function's), from its own program it can.
    program = ct.convert([function], source="tensorflow", convert_to="milinternal",
                         inputs=[ct.ImageType(name="image", shape=(1, size, size, 3), scale=1.0,
                                              color_layout=ct.colorlayout.RGB)], **common)
    main = program.functions["main"]
    produced = [v.name for v in main.outputs]
    main.output_types = None
    config = None if clf.multi_label else ct.ClassifierConfig(
        list(clf.classes), predicted_probabilities_output=produced[0])
    mlmodel = ct.convert(program, convert_to="mlprogram", classifier_config=config, **common)
    spec = mlmodel.get_spec()
    for old, new in zip(produced, names):
        if old in {o.name for o in spec.description.output}:
            ct.utils.rename_feature(spec, old, new)
    mlmodel = ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir, skip_model_load=True)
    _describe(mlmodel, clf, open_set)
    built = work / PACKAGE
    mlmodel.save(str(built))
    return built


def _describe(mlmodel, clf, open_set) -> None:
    size = clf.image_size
    mlmodel.author = "graftkit"
    mlmodel.short_description = (
        f"{len(clf.classes)} {'labels' if clf.multi_label else 'classes'}; input: the whole image "
        f"resized to {size}x{size} (Vision: imageCropAndScaleOption .scaleFill), RGB")
    meta = mlmodel.user_defined_metadata
    meta["graftkit.classes"] = json.dumps(list(clf.classes))
    if clf.multi_label:
        meta["graftkit.thresholds"] = json.dumps([float(t) for t in clf.thresholds])
    if open_set is not None:
        described = open_set.describe()
        meta["graftkit.ood_threshold"] = f"{described['threshold']:.6g}"
        meta["graftkit.ood_how"] = f"{described['method']}: unknown when ood_score > threshold"


def check_spec(path: Path, clf, open_set) -> dict:
    """The written package read back: image input at the model's size in RGB, the outputs, the
    class labels in the classifier. Any difference is an ``ExportError``."""
    import coremltools as ct

    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    description = spec.description
    image = description.input[0].type.imageType
    outputs = {o.name: o.type.WhichOneof("Type") for o in description.output}
    expected = ({"probabilities": "multiArrayType"} if clf.multi_label else
                {"classLabel": "stringType", "classLabel_probs": "dictionaryType"})
    if open_set is not None:
        expected[OOD_SCORE] = "multiArrayType"
    labels = _class_labels(spec)
    problems = []
    if (description.input[0].name, image.width, image.height) != ("image", clf.image_size,
                                                                  clf.image_size):
        problems.append(f"input {description.input[0].name} {image.width}x{image.height}")
    if image.colorSpace != ct.proto.FeatureTypes_pb2.ImageFeatureType.RGB:
        problems.append("input not RGB")
    if outputs != expected:
        problems.append(f"outputs {outputs}")
    if not clf.multi_label and labels != list(clf.classes):
        problems.append(f"class labels {labels}")
    if problems:
        raise ExportError(f"the Core ML package is not what was asked ({'; '.join(problems)}); "
                          "nothing was written")
    return {"input": {"name": "image", "size": [image.width, image.height], "color": "RGB",
                      "scale": "raw 0-255 pixels (normalisation inside)"},
            "outputs": outputs, "class_labels": labels if not clf.multi_label else None,
            "deployment_target": TARGET, "ran": False,
            "why_not_run": "Core ML runs only on Apple systems; the specification was checked",
            "run_on_a_mac": HOW_TO_RUN.replace("SIZE", str(clf.image_size))}


def _class_labels(spec) -> list[str] | None:
    """The labels of the program's ``classify`` op (where an ML program classifier keeps them)."""
    function = spec.mlProgram.functions["main"]
    block = function.block_specializations[function.opset]
    for op in block.operations:
        if op.type == "classify":
            values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
            return [v.immediateValue.tensor.strings.values[0] for v in values]
    return None
