"""Exports in every format, each run by its own runtime and compared with the Keras model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graftkit.cli import main
from graftkit.deploy.export import export
from graftkit.errors import UsageError


@pytest.fixture(scope="module")
def float32_exports(trained_run, tmp_path_factory):
    """Each format's float32 export of the shared run, made once: its own test checks it, the
    quantized exports compare their size with it."""
    made = {}

    def get(fmt: str):
        if fmt not in made:
            out = tmp_path_factory.mktemp(f"export-{fmt}")
            made[fmt] = (export(trained_run / "run", fmt, out=out), out)
        return made[fmt]
    return get


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["savedmodel", "tflite", "onnx"])
def test_float32_exports_match_keras(float32_exports, trained_run, fmt):
    result, out = float32_exports(fmt)
    assert result.images_checked == 6  # the run's validation images
    assert result.max_abs_diff <= 1e-4 and result.top1_agreement == 1.0
    assert result.accuracy == result.keras_accuracy
    assert (out / "labels.txt").read_text().split() == ["class_0", "class_1", "class_2"]
    written = json.loads((out / "export.json").read_text())
    assert written["format"] == fmt
    assert written["check_sample"] == "all 6 validation images"
    assert written["input"]["size"] == [32, 32] and "bilinear" in written["input"]["how"]
    assert written["calibration_images"] is None
    # the "unknown" answer travels with the export: its ood_score gives graft predict's decisions
    # (an image at the threshold itself, here the highest of 6 scores, may fall either side)
    assert result.known_agreement_clear == 1.0 and result.ood_max_abs_diff <= 1e-3
    rejection = written["rejection"]
    assert rejection["output"] == "ood_score" and rejection["method"] == "knn"
    assert rejection["threshold"] > 0 and rejection["known_if"] == "ood_score <= threshold"
    _bank_is_float16(result.path, fmt)
    assert _output_names(result.path, fmt)[0] in ("probabilities", None)  # read first by apps
    if fmt == "tflite":
        _mediapipe_reads_it(result.path, written, out, trained_run / "run")


def _output_names(path: str, fmt: str) -> list:
    """The outputs in the file's own order, the order a classifier runtime reads them."""
    if fmt == "onnx":
        import onnx

        return [o.name for o in onnx.load(path).graph.output]
    if fmt == "tflite":
        import tensorflow as tf

        interp = tf.lite.Interpreter(model_path=path)
        signature = interp._get_full_signature_list()["serving_default"]["outputs"]
        by_tensor = {index: name for name, index in signature.items()}
        return [by_tensor[d["index"]] for d in interp.get_output_details()]
    return [None]


def _mediapipe_reads_it(path: str, written: dict, out, run) -> None:
    """As an app would use it: MediaPipe's ImageClassifier loads the file unchanged, names the
    classes from its metadata and gives graft predict's scores on the validation images."""
    import mediapipe as mp
    from mediapipe.tasks.python import vision
    from mediapipe.tasks.python.core import base_options

    import graftkit
    from graftkit.data.images import load_image

    checked = written["mediapipe"]
    assert checked["metadata"] is True and checked["images_checked"] == 6
    assert checked["max_abs_diff"] <= 1e-4 and checked["top1_agreement"] == 1.0
    assert 0 <= checked["from_files"]["top1_agreement"] <= 1
    paths = [p for p, _ in json.loads((run / "split.json").read_text())["val"]]
    expected = graftkit.load(run).predict_proba(paths)
    options = vision.ImageClassifierOptions(
        base_options=base_options.BaseOptions(model_asset_path=path), max_results=-1)
    classes = (out / "labels.txt").read_text().split()
    with vision.ImageClassifier.create_from_options(options) as classifier:
        for p, want in zip(paths, expected):
            image = mp.Image(image_format=mp.ImageFormat.SRGB, data=load_image(p, 32))
            result = classifier.classify(image)
            assert [c.head_name for c in result.classifications] == ["probabilities", "ood_score"]
            got = {c.category_name: c.score for c in result.classifications[0].categories}
            assert set(got) == set(classes)
            np.testing.assert_allclose([got[c] for c in classes], want, atol=1e-4)


def _bank_is_float16(path: str, fmt: str) -> None:
    """The bank of training features is the largest part of an export; the converters fold the
    layer's float16 bank back to float32, so the files are mended after conversion (TFLite: a
    float16 constant expanded by DEQUANTIZE; ONNX: a float16 initializer and a Cast node), and
    the parity checks above still hold."""
    bank = 24 * 1280  # the run's 24 training images x Lite0's 1,280 features
    if fmt == "tflite":
        from tensorflow.lite.python import schema_py_generated as fb
        from tensorflow.lite.tools import flatbuffer_utils

        model = flatbuffer_utils.read_model(path)
        stored = [(t.type, len(model.buffers[t.buffer].data)) for t in model.subgraphs[0].tensors
                  if t.buffer and model.buffers[t.buffer].data is not None
                  and int(np.prod(t.shape)) == bank]
        assert stored == [(fb.TensorType.FLOAT16, 2 * bank)]  # no float32 copy left beside it
    elif fmt == "onnx":
        import onnx

        inits = onnx.load(path).graph.initializer
        halves = [i for i in inits if "ood_score" in i.name]
        assert [i.data_type for i in halves if int(np.prod(i.dims)) == bank] == \
            [onnx.TensorProto.FLOAT16]  # no float32 copy left beside it


@pytest.mark.slow
@pytest.mark.parametrize("fmt,quantize", [("tflite", "float16"), ("tflite", "int8"),
                                          ("onnx", "int8")])
def test_quantized_exports_report_size_and_accuracy(trained_run, float32_exports, tmp_path, fmt,
                                                    quantize, capfd):
    code = main(["export", str(trained_run / "run"), "--format", fmt, "--quantize", quantize,
                 "--out", str(tmp_path / "q")])
    out, err = capfd.readouterr()  # file descriptors: the converters' C++ logs would show here
    assert code == 0
    noise = ("INFO:", "WARNING", "Warning", "fully_quantize")
    assert not [line for line in (out + err).splitlines() if any(n in line for n in noise)], out + err
    result = json.loads((tmp_path / "q" / "export.json").read_text())
    assert result["quantize"] == quantize and 0 <= result["accuracy"] <= 1
    if (fmt, quantize) == ("tflite", "int8"):  # every training image: fewer than 100
        assert result["calibration_images"] == 24
        assert result["calibration_sample"] == "all 24 training images"
        assert "int8 calibrated on all 24 training images" in out
        # a conversion takes minutes on real runs: each step is said as it starts
        assert "converting to tflite-int8 (calibrated on 24 training images)..." in err
        assert "checking it with its own runtime on 6 validation images..." in err
        _int8_keeps_the_open_set_score_in_float32(result)
        # MediaPipe's own TFLite build may round an integer op one 1/256 step the other way
        assert result["mediapipe"]["tolerance"] == 4 / 256
        assert result["mediapipe"]["max_abs_diff"] <= 4 / 256
    fp32, _ = float32_exports(fmt)
    assert result["size_bytes"] < fp32.size_bytes  # quantization shrinks the file
    assert "accuracy" in out and "Keras model" in out


def _int8_keeps_the_open_set_score_in_float32(result: dict) -> None:
    """In 8 bits the squares of most pooled features round to 0, so an image's norm can too, and
    TFLite's int8 division then stops the model (seen on a real run): the score's ops stay
    float32 (the pooled features it reads are still 8-bit, so it is close to graft predict's,
    not equal)."""
    import tensorflow as tf

    tensors = tf.lite.Interpreter(model_path=result["path"]).get_tensor_details()
    division = [t for t in tensors if "/ood_score" in t["name"] and "truediv" in t["name"]]
    assert division and all(t["dtype"] == np.float32 for t in division)
    assert any(t["dtype"] == np.int8 for t in tensors)  # the network itself is quantized
    assert 0 < result["ood_max_abs_diff"] < 0.5 and result["known_agreement"] > 0.5


def _reuse_the_float32_tflite(float32_exports, monkeypatch) -> None:
    """The shared run's float32 TFLite file, converted once already, stands in for the build
    (the SavedModel and the conversion): the tests using it are about what comes after."""
    import shutil

    from graftkit.deploy import export as export_module

    converted = float32_exports("tflite")[0].path

    def build(_model, _fmt, _quantize, work, *_rest):
        path = work / "model.tflite"
        shutil.copyfile(converted, path)
        return path, export_module._run_tflite  # looked up now: a test may replace it

    monkeypatch.setattr(export_module, "_build", build)


def test_an_export_its_runtime_refuses_is_an_export_error(trained_run, float32_exports,
                                                          tmp_path, monkeypatch):

    from graftkit.deploy import export as export_module
    from graftkit.errors import ExportError

    def refuses(path, x):
        raise RuntimeError("tensorflow/lite/kernels/div.cc:242 data[i] != 0 was not true.")

    _reuse_the_float32_tflite(float32_exports, monkeypatch)
    monkeypatch.setattr(export_module.tflite_metadata, "with_metadata", lambda model, *_: model)
    monkeypatch.setattr(export_module, "_run_tflite", refuses)
    with pytest.raises(ExportError, match="does not run in its own runtime .*nothing was written"):
        export(trained_run / "run", "tflite", out=tmp_path / "t")
    assert not list((tmp_path / "t").glob("*.tflite")) and not (tmp_path / "t" / "export.json").exists()


def test_unsupported_quantization_is_a_usage_error(trained_run):
    with pytest.raises(UsageError, match="not available for savedmodel"):
        export(trained_run / "run", "savedmodel", quantize="int8")


def test_check_and_calibration_samples_cover_every_class(tmp_path):
    """The first images in folder order are one or two classes: the samples are stratified,
    random and seeded, and skip files no longer on disk."""
    from graftkit.deploy.export import stratified

    items = []
    for c in ("a", "b", "c"):
        for i in range(100):
            path = tmp_path / f"{c}{i}.png"
            path.write_bytes(b"x")
            items.append((str(path), c))
    items.append((str(tmp_path / "gone.png"), "c"))
    sample = stratified(items, 30, seed=1)
    assert [label for _, label in sample].count("a") == 10
    assert {label for _, label in sample} == {"a", "b", "c"} and len(set(sample)) == 30
    assert sample == stratified(items, 30, seed=1) and sample != stratified(items, 30, seed=2)
    assert sample != items[:30] and all("gone" not in p for p, _ in stratified(items, 400, 0))
    assert len(stratified(items, 400, seed=0)) == 300
    uneven = [(p, c) for p, c in items if c != "a"] + [(items[0][0], "a")]
    assert [c for _, c in stratified(uneven, 3, seed=0)].count("a") == 1  # a class of one


def test_without_mediapipe_the_tflite_file_is_written_and_says_what_to_install(
        trained_run, float32_exports, tmp_path, monkeypatch, capsys):

    from graftkit.deploy import tflite_metadata

    _reuse_the_float32_tflite(float32_exports, monkeypatch)
    monkeypatch.setattr(tflite_metadata, "available", lambda: False)
    monkeypatch.setattr(tflite_metadata, "with_metadata",
                        lambda *_a: pytest.fail("metadata written without MediaPipe"))
    code = main(["export", str(trained_run / "run"), "--format", "tflite", "--out",
                 str(tmp_path / "t")])
    assert code == 0
    written = json.loads((tmp_path / "t" / "export.json").read_text())
    assert written["mediapipe"]["metadata"] is False
    assert "pip install 'graftkit[mobile]'" in written["mediapipe"]["why"]
    def changed_writers(*_a):
        raise AttributeError("no add_image_input")

    monkeypatch.setattr(tflite_metadata, "available", lambda: True)  # installed, but it fails
    monkeypatch.setattr(tflite_metadata, "with_metadata", changed_writers)
    assert main(["export", str(trained_run / "run"), "--format", "tflite", "--out",
                 str(tmp_path / "t2")]) == 0
    written = json.loads((tmp_path / "t2" / "export.json").read_text())
    assert "metadata writer failed (AttributeError: no add_image_input)" in \
        written["mediapipe"]["why"]
    out = capsys.readouterr().out
    assert "no MediaPipe metadata: MediaPipe is not installed" in out
    assert "pip install 'graftkit[mobile]' and export again" in out
    assert "no MediaPipe metadata: MediaPipe's metadata writer failed" in out


@pytest.mark.parametrize("fields,version", [
    ({}, "1.0.0"),
    ({"file_type": "TENSOR_AXIS_LABELS"}, "1.0.0"),
    ({"file_type": "VOCABULARY"}, "1.0.1"),
    ({"input_units": True}, "1.1.0"),
    ({"file_type": "VOCABULARY", "file_version": "2"}, "1.4.1"),
    ({"custom": True, "file_type": "VOCABULARY"}, "1.5.0"),
])
def test_the_metadata_parser_version_follows_mediapipes_rule(fields, version):
    """MediaPipe's wheels leave out the compiled function that stamps metadata with the oldest
    parser able to read it; graftkit's stand-in gives the versions its C++ rule gives."""
    pytest.importorskip("mediapipe", reason="the mobile extra")
    import flatbuffers
    from mediapipe.tasks.metadata import metadata_schema_py_generated as fb

    from graftkit.deploy.tflite_metadata import _parser_version

    tensor = fb.TensorMetadataT()
    if "file_type" in fields:
        f = fb.AssociatedFileT()
        f.name, f.type = "labels.txt", getattr(fb.AssociatedFileType, fields["file_type"])
        f.version = fields.get("file_version")
        tensor.associatedFiles = [f]
    graph = fb.SubGraphMetadataT()
    graph.outputTensorMetadata = [tensor]
    if fields.get("input_units"):
        unit = fb.ProcessUnitT()
        unit.optionsType, unit.options = fb.ProcessUnitOptions.NormalizationOptions, \
            fb.NormalizationOptionsT()
        graph.inputProcessUnits = [unit]
    if fields.get("custom"):
        custom = fb.CustomMetadataT()
        custom.name = "x"
        graph.customMetadata = [custom]
    metadata = fb.ModelMetadataT()
    metadata.subgraphMetadata = [graph]
    builder = flatbuffers.Builder(0)
    builder.Finish(metadata.Pack(builder), b"M001")
    assert _parser_version(bytes(builder.Output())) == version


@pytest.mark.slow
def test_coreml_export_is_a_classifier_with_its_labels_and_the_open_set_score(trained_run,
                                                                               tmp_path, capsys):
    """Core ML runs only on Apple systems: here the package is converted and its specification
    read back as coremltools would hand it to Xcode (image input, outputs, class labels)."""
    import os
    import stat

    ct = pytest.importorskip("coremltools", reason="coremltools has wheels for Linux x86-64 "
                                                   "and macOS only")
    before = os.umask(0o022)
    try:
        code = main(["export", str(trained_run / "run"), "--format", "coreml", "--out",
                     str(tmp_path / "c")])
    finally:
        os.umask(before)
    assert code == 0
    # coremltools writes through mkstemp (0600): the package is readable like any file written
    package = tmp_path / "c" / "model.mlpackage"
    modes = {p.relative_to(package): stat.S_IMODE(p.stat().st_mode)
             for p in [package, *package.rglob("*")]}
    assert all(m in (0o644, 0o755) for m in modes.values()), modes
    written = json.loads((tmp_path / "c" / "export.json").read_text())
    assert written["format"] == "coreml" and written["images_checked"] == 0
    assert written["coreml"]["ran"] is False and "Apple" in written["coreml"]["why_not_run"]
    assert "MLModel('model.mlpackage')" in written["coreml"]["run_on_a_mac"]
    spec = ct.models.MLModel(written["path"], skip_model_load=True).get_spec()
    image = spec.description.input[0]
    assert image.name == "image" and (image.type.imageType.width, image.type.imageType.height) \
        == (32, 32)
    assert [o.name for o in spec.description.output] == ["classLabel", "classLabel_probs",
                                                         "ood_score"]
    assert spec.description.predictedFeatureName == "classLabel"
    assert written["coreml"]["class_labels"] == ["class_0", "class_1", "class_2"]
    meta = spec.description.metadata.userDefined
    assert json.loads(meta["graftkit.classes"]) == ["class_0", "class_1", "class_2"]
    threshold = json.loads((trained_run / "run" / "metrics.json").read_text())["open_set"]
    assert float(meta["graftkit.ood_threshold"]) == pytest.approx(threshold["threshold"], rel=1e-5)
    out = capsys.readouterr().out
    assert "specification checked: image input 32x32 RGB" in out and "not run: Core ML" in out


def test_coreml_without_coremltools_says_what_to_install(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "coremltools" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'graftkit\[coreml\]'"):
        export(tmp_path, "coreml")  # refused before the run is read
