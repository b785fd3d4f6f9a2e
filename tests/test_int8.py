"""The int8 engine of the frozen part: chosen by CPU, accepted by measurement, used everywhere."""

from __future__ import annotations

import csv
import hashlib
import json

import keras
import numpy as np
import pytest
from keras import layers

from graftkit.frozen import engine as engine_module
from graftkit.frozen import precision
from graftkit.frozen.cut import part_key
from graftkit.frozen.engine import FrozenPart, engine_path
from graftkit.frozen.precision import Calibration, EngineFile, cosines, resolve

SIZE = 48


def _net(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    x = keras.Input((SIZE, SIZE, 3))
    a = layers.Conv2D(8, 3, strides=2, activation="relu")(layers.Rescaling(1 / 255)(x))
    b = layers.Conv2D(16, 3, padding="same", activation="relu")(a)
    return keras.Model(x, [b, layers.GlobalAveragePooling2D()(b)])


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0, 255, (n, SIZE, SIZE, 3)).astype(np.float32)


RUNTIMES = ("tflite", "openvino")


def _on(runtime: str, monkeypatch) -> None:
    """int8 on ``runtime`` (OpenVINO is the rule's choice where NNCF is installed)."""
    from graftkit.frozen import runtimes

    monkeypatch.setattr(runtimes, "int8_runtime", lambda forced="": runtime)


def _engine_file(key: str, runtime: str):
    return (engine_path(f"{key}-int8ov-sample-a", ".zip") if runtime == "openvino"
            else engine_path(f"{key}-int8-sample-a"))


def _calibration(digest: str = "sample-a") -> Calibration:
    calibration = Calibration(digest, SIZE)
    calibration.images, calibration.held_out = _pixels(24, 1), _pixels(8, 2)
    return calibration


def test_auto_chooses_int8_where_the_cpu_has_8_bit_dot_products_or_openvino_avx2(
        monkeypatch):
    monkeypatch.delenv("GRAFTKIT_ENGINE_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "avx512_vnni"}))
    assert resolve("auto") == ("int8", "the CPU has 8-bit dot-product instructions "
                                       "(avx512_vnni)")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"asimddp"}))  # Arm
    assert resolve("auto")[0] == "int8"
    from graftkit.frozen import runtimes

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: False)
    chosen, why = resolve("auto")
    assert chosen == "f32" and "no 8-bit dot-product" in why
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: True)  # OpenVINO + NNCF
    chosen, why = resolve("auto")
    assert chosen == "int8" and why.startswith("OpenVINO's int8 kernels on this AVX2 CPU")
    monkeypatch.setenv("GRAFTKIT_ENGINE", "tflite")  # TFLite's int8 would be slower here
    assert resolve("auto")[0] == "f32"
    monkeypatch.delenv("GRAFTKIT_ENGINE")
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"sse4_2"}))  # no AVX2
    assert resolve("auto")[0] == "f32"
    assert resolve("int8") == ("int8", "--engine-precision int8")  # asked for: whatever the CPU
    monkeypatch.setenv("GRAFTKIT_ENGINE_PRECISION", "bf16")  # the older setting still counts
    assert resolve("auto")[0] == "bf16" and resolve("f32")[0] == "f32"


def test_a_typo_in_the_engine_precision_is_one_clear_error(tmp_path, capsys):
    from graftkit.cli import main

    with pytest.raises(SystemExit) as stop:  # argparse's usage error
        main(["fit", str(tmp_path), "--out", str(tmp_path / "run"), "--engine-precision",
              "int9"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "'int9'" in err and "'int8'" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(Exception, match="int9"):
        resolve("int9")


def test_exports_follow_the_runs_precision_unless_told():
    from graftkit.deploy.export import _quantization

    assert _quantization("tflite", "auto", int8_run=True)[0] == "int8"
    assert _quantization("tflite", "auto", int8_run=False) == ("none",
                                                               "the run computed in float32")
    assert _quantization("onnx", "auto", int8_run=True)[0] == "none"  # weights-only int8 there
    assert _quantization("savedmodel", "auto", int8_run=True)[0] == "none"
    assert _quantization("tflite", "float16", int8_run=True) == ("float16", "--quantize float16")


def test_cosines_of_outputs():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    assert cosines([a], [a]) == [1.0]
    assert cosines([a], [a[:, ::-1]]) == [0.0]
    assert cosines([np.zeros((1, 3))], [np.zeros((1, 3))]) == [1.0]  # all-zero rows agree


def test_the_calibration_sample_spans_the_classes_and_is_named_by_its_files(image_folder):
    from graftkit.data.folder import scan

    folder = scan(image_folder)
    items = [(p, str(y)) for p, y in zip(folder.train.paths, folder.train.labels)]
    digests = dict(zip(folder.train.paths, folder.digests(folder.train)))
    cal = Calibration.from_files(items, digests, SIZE, seed=0)
    assert not {"images", "held_out"} & set(vars(cal))  # nothing decoded before it is needed
    assert len(cal.images) + len(cal.held_out) == len(items)  # fewer than the sample size
    assert cal.images.shape[1:] == (SIZE, SIZE, 3) and cal.images.dtype == np.float32
    assert len(cal.held_out) >= 1
    assert {str(y) for p, y in items if p in cal.files} == {str(y) for _, y in items}
    assert not set(cal.files) & set(cal.held_out_files)
    again = Calibration.from_files(items, digests, SIZE, seed=0)
    assert again.digest == cal.digest
    changed = dict(digests)
    changed[cal.files[0]] = "another file's digest"
    assert Calibration.from_files(items, changed, SIZE, seed=0).digest != cal.digest


def test_fit_and_check_labels_calibrate_the_same_sample(image_folder, monkeypatch):
    """graft check --labels computes the rows a default fit reads: same precision, same sample."""
    from graftkit.data.folder import scan
    from graftkit.frozen.precision import engine_settings

    monkeypatch.delenv("GRAFTKIT_ENGINE_PRECISION", raising=False)
    folder = scan(image_folder)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx_vnni"}))
    chosen, _, cal = engine_settings(folder, SIZE)
    assert chosen == "int8" and cal is not None
    assert engine_settings(folder, SIZE, "int8")[2].digest == cal.digest
    assert engine_settings(folder, SIZE + 16, "int8")[2].digest != cal.digest  # another size
    # an export of the run draws the same images from split.json
    from graftkit.deploy.export import _engine_sample

    split = {"train": [[p, folder.label_text(y)] for p, y in zip(folder.train.paths,
                                                                  folder.train.labels)]}
    assert [p for p, _ in _engine_sample(split)] == cal.files
    from graftkit.frozen import runtimes

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: False)
    assert engine_settings(folder, SIZE)[::2] == ("f32", None)


def test_auto_keeps_float32_when_the_whole_base_is_fine_tuned(monkeypatch):
    """There phase 2 and predictions run the float32 base: a head fitted on int8 outputs would
    start phase 2 on other features. Asked for by name, int8 stays; the variable still rules."""
    monkeypatch.delenv("GRAFTKIT_ENGINE_PRECISION", raising=False)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx512_vnni"}))
    assert precision.resolve("auto")[0] == "int8"
    chosen, why = precision.resolve("auto", whole_base=True)
    assert chosen == "f32" and "whole base" in why
    assert precision.resolve("int8", whole_base=True)[0] == "int8"
    monkeypatch.setenv("GRAFTKIT_ENGINE_PRECISION", "bf16")
    assert precision.resolve("auto", whole_base=True)[0] == "bf16"


def test_int8_on_a_gpu_runs_keras_and_says_why(monkeypatch, private_cache):
    """The converted engines are CPU engines: with a GPU the frozen part runs on Keras there."""
    from graftkit import devices

    monkeypatch.setattr(devices, "gpus", lambda: ["/physical_device:GPU:0"])
    net = _net()
    part = FrozenPart(net, part_key(net, SIZE, "gpu"), precision="int8",
                      calibration=_calibration())
    assert part.engine == "keras" and part.precision == "f32"
    assert "int8 not used" in part.reasons[0] and "GPU" in part.reasons[0]
    assert "-gpu" in part.store_key and "int8" not in part.store_key


def test_int8_without_a_calibration_or_an_engine_file_runs_float32(private_cache):
    net = _net()
    part = FrozenPart(net, part_key(net, SIZE, "t"), precision="int8")
    assert part.precision == "f32" and part.engine == "tflite"


@pytest.mark.integration
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_int8_engine_is_accepted_by_measurement_and_kept_apart_by_its_sample(
        private_cache, monkeypatch, runtime):
    _on(runtime, monkeypatch)
    net = _net()
    key = part_key(net, SIZE, "int8")
    cal = _calibration()
    part = FrozenPart(net, key, precision="int8", calibration=cal, fixed_batch=True)
    x = _pixels(6, 5)
    out = part(x)
    assert part.label == f"{runtime} int8" and not part.reasons
    assert cal.accepted["cosine"] and min(cal.accepted["cosine"]) >= precision.INT8_MIN_COSINE
    ref = net.predict(x, verbose=0)
    assert min(cosines(out, ref)) >= precision.INT8_MIN_COSINE
    assert not np.allclose(out[1], ref[1], atol=1e-5)  # really integer arithmetic
    assert _engine_file(key, runtime).is_file()
    assert part.int8_engine() is not None
    assert part.int8_engine_name == precision.INT8_ENGINE_FILES[runtime]
    float_part = FrozenPart(net, key)
    assert part.store_key != float_part.store_key and "sample-a" in part.store_key
    other = FrozenPart(net, key, precision="int8", calibration=_calibration("sample-b"))
    assert other.store_key != part.store_key  # another sample: other rows in the cache


@pytest.mark.integration
def test_int8_that_strays_from_float32_falls_back_and_says_why(private_cache, monkeypatch):
    monkeypatch.setattr(engine_module, "INT8_MIN_COSINE", 1.5)  # nothing can pass
    net = _net(1)
    part = FrozenPart(net, part_key(net, SIZE, "stray"), precision="int8",
                      calibration=_calibration())
    said: list[str] = []
    part.notify = said.append
    out = part(_pixels(3))
    assert part.precision == "f32" and part.engine == "tflite"
    assert "follows float32 too loosely" in part.reasons[0]
    assert any("too loosely" in s and s.endswith("using tflite") for s in said)
    np.testing.assert_allclose(out[1], net.predict(_pixels(3), verbose=0)[1], atol=1e-4)
    assert part.int8_engine() is None


@pytest.mark.integration
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_an_int8_engine_that_fails_to_run_falls_back_and_says_why(private_cache, monkeypatch,
                                                                   runtime):
    from graftkit.frozen import runtimes

    def broken(self, x):  # TFLite: every call; OpenVINO: its int8 model's
        if getattr(self, "precision", "") == "f32" and runtime == "openvino":
            return real(self, x)
        raise RuntimeError("kernel missing")

    _on(runtime, monkeypatch)
    runner = runtimes.TFLiteRunner if runtime == "tflite" else runtimes.OpenVINORunner
    real = runner.__call__
    monkeypatch.setattr(runner, "__call__", broken)
    net = _net(3)
    part = FrozenPart(net, part_key(net, SIZE, "broken"), precision="int8",
                      calibration=_calibration())
    out = part(_pixels(2))  # no traceback: float32 runtimes next, then Keras
    assert part.reasons[0] == "int8 failed (RuntimeError: kernel missing)"
    assert part.precision == "f32"
    np.testing.assert_allclose(out[1], net.predict(_pixels(2), verbose=0)[1], atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("runtime", RUNTIMES)
def test_a_runs_int8_engine_file_serves_it_and_a_missing_one_falls_back(private_cache,
                                                                       tmp_path, monkeypatch,
                                                                       runtime):
    _on(runtime, monkeypatch)
    net = _net(2)
    key = part_key(net, SIZE, "file")
    trained = FrozenPart(net, key, precision="int8", calibration=_calibration())
    x = _pixels(4, 9)
    first = trained(x)
    content = trained.int8_engine()
    assert content is not None
    path = tmp_path / trained.int8_engine_name
    path.write_bytes(content)
    recorded = EngineFile(path, hashlib.sha256(content).hexdigest(), runtime)
    served = FrozenPart(net, key, precision="int8", engine_file=recorded)
    blank = served(np.zeros((1, SIZE, SIZE, 3), np.float32))  # a server's warm-up image
    assert served.precision == "int8" and not served.reasons  # accepted once, at fit time
    for a, b in zip(served(x), first):
        np.testing.assert_array_equal(a, b)  # the same engine: the same outputs
    assert blank[0].shape == (1, *first[0].shape[1:])
    gone = FrozenPart(net, key, precision="int8",
                      engine_file=EngineFile(tmp_path / "missing", recorded.sha256, runtime))
    gone(x)
    assert gone.precision == "f32" and "no int8 engine" in gone.reasons[0]
    path.write_bytes(content[:-1] + b"x")  # not the file the run recorded
    changed = FrozenPart(net, key, precision="int8", engine_file=recorded)
    np.testing.assert_allclose(changed(x)[1], net.predict(x, verbose=0)[1], atol=1e-4)
    assert changed.precision == "f32" and "sha256 differs" in changed.reasons[0]


@pytest.mark.integration
def test_an_int8_fit_predicts_with_the_engine_it_trained_on(tmp_path, private_cache):
    import graftkit
    from graftkit.frozen.precision import INT8_ENGINE_FILES
    from graftkit.frozen.runtimes import int8_runtime
    from tests.conftest import make_folder

    data = make_folder(tmp_path / "data", per_class=10)
    run = tmp_path / "run"
    options = {"image_size": 64, "head_epochs": 3, "fine_tune_epochs": 1, "unfreeze": 2,
               "batch_size": 8, "label_folds": 0, "verbose": 0, "log": lambda _m: None}
    clf = graftkit.fit(data, run, engine_precision="int8", **options)
    frozen = json.loads((run / "metrics.json").read_text())["frozen_outputs"]
    assert frozen["precision"] == "int8" and frozen["precision_reason"] == \
        "--engine-precision int8"
    assert min(frozen["int8"]["cosine"]) >= precision.INT8_MIN_COSINE
    runtime = int8_runtime()  # OpenVINO where NNCF is installed (make installs it)
    assert frozen["engine"] == runtime and (run / INT8_ENGINE_FILES[runtime]).is_file()
    loaded = graftkit.load(run)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    probs = loaded.predict_proba([r["path"] for r in rows])
    assert loaded._split is not None and loaded._split.frozen.label == f"{runtime} int8"
    written = np.array([float(r["probability"]) for r in rows])
    np.testing.assert_allclose(probs.max(axis=1), written, atol=2e-6)  # one engine for both
    assert [clf.classes[i] for i in probs.argmax(axis=1)] == [r["predicted"] for r in rows]
    # graft serve answers with the same engine
    from fastapi.testclient import TestClient

    from graftkit.serve.server import Service

    service = Service(run)
    try:
        client = TestClient(service.app, base_url="http://127.0.0.1")
        files = [r["path"] for r in rows[:3]]
        got = client.post("/predict", files=[("file", (f"{i}.png", open(f, "rb").read()))
                                             for i, f in enumerate(files)]).json()
        served = [p["probability"] for p in got["predictions"]]
        np.testing.assert_allclose(served, written[:3], atol=1e-4)
        assert service.classifier._split.frozen.label == f"{runtime} int8"
    finally:
        service.batcher.close()
    exported = graftkit.export(run, fmt="tflite")  # follows the run: int8, same images
    assert exported.quantize == "int8" and "follows" in exported.quantize_reason
    assert "the run's int8 engine was calibrated on" in exported.calibration_sample
    assert json.loads((run / "export" / "tflite-int8" / "export.json").read_text())[
        "quantize_reason"] == exported.quantize_reason
    assert graftkit.export(run, fmt="savedmodel").quantize == "none"
    graftkit.fit(data, run, overwrite=True, engine_precision="f32", **options)
    assert not any((run / name).exists()  # a float32 run over it: no stale engine
                   for name in INT8_ENGINE_FILES.values())


@pytest.mark.integration
def test_nncf_is_imported_without_its_telemetry(tmp_path):
    """NNCF reports usage to Google Analytics and writes a client id under ~/intel on import
    unless its telemetry package is missing: graftkit imports it with that package refused."""
    import os
    import subprocess
    import sys

    code = ("import sys; from graftkit.frozen.runtimes import _import_nncf; nncf = _import_nncf(); "
            "from nncf.telemetry import wrapper; "
            "assert not isinstance(wrapper.telemetry, wrapper.NNCFTelemetry); "
            "assert 'openvino_telemetry' not in sys.modules; "
            "import openvino_telemetry")  # importable again afterwards
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "NNCF_CI")}
    proc = subprocess.run([sys.executable, "-c", code], env={**env, "HOME": str(tmp_path)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-1000:]
    assert not (tmp_path / "intel").exists()


@pytest.mark.integration
def test_an_openvino_int8_run_without_openvino_runs_float32_and_says_what_to_install(
        private_cache, tmp_path, monkeypatch):
    from graftkit.frozen import runtimes

    _on("openvino", monkeypatch)
    net = _net(4)
    key = part_key(net, SIZE, "no-openvino")
    trained = FrozenPart(net, key, precision="int8", calibration=_calibration())
    x = _pixels(3, 7)
    trained(x)
    content = trained.int8_engine()
    assert content is not None and trained.label == "openvino int8"
    path = tmp_path / trained.int8_engine_name
    path.write_bytes(content)

    def missing(self, *args, **kwargs):  # a machine without the openvino extra
        raise ModuleNotFoundError("No module named 'openvino'")

    monkeypatch.setattr(runtimes.OpenVINORunner, "__init__", missing)
    served = FrozenPart(net, key, precision="int8", engine_file=EngineFile(
        path, hashlib.sha256(content).hexdigest(), "openvino"))
    out = served(x)
    assert (served.engine, served.precision) == ("tflite", "f32")
    assert "pip install 'graftkit[openvino]'" in served.reasons[0]
    np.testing.assert_allclose(out[1], net.predict(x, verbose=0)[1], atol=1e-4)


def test_int8_runs_on_openvino_on_x86_with_nncf_and_on_tflite_elsewhere(monkeypatch):
    from graftkit.frozen import runtimes

    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: True)
    for machine, runtime in (("x86_64", "openvino"), ("AMD64", "openvino"), ("arm64", "tflite"),
                             ("aarch64", "tflite")):
        monkeypatch.setattr(runtimes.platform, "machine", lambda m=machine: m)
        assert runtimes.int8_runtime() == runtime, machine
        assert runtimes.int8_runtime("tflite") == "tflite"
        assert runtimes.int8_runtime("openvino") == "openvino"  # asked for by name
        assert runtimes.int8_runtime("keras") == ""
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: False)  # no NNCF
    assert runtimes.int8_runtime() == "tflite" and runtimes.int8_runtime("openvino") == ""


@pytest.mark.integration
def test_a_head_kept_by_mode_auto_is_served_the_features_it_trained_on(tmp_path):
    """Phase 1 trains the head on the int8 engine's pooled output (the pretrained top blocks
    run by the engine). When --mode auto keeps that head, the final scores and graft predict
    read the same output, not the top blocks again in Keras (which round differently)."""
    import graftkit
    from graftkit.data.images import load_image
    from graftkit.graft import HEAD_DROPOUT
    from tests.conftest import make_folder

    data = make_folder(tmp_path / "data", per_class=10)
    run = tmp_path / "run"
    # phase 2 at a rate that wrecks it: the head is kept
    graftkit.fit(data, run, engine_precision="int8", image_size=64, head_epochs=3,
                 fine_tune_epochs=1, unfreeze=2, fine_tune_lr=0.5, batch_size=8,
                 label_folds=0, verbose=0, log=lambda _m: None)
    m = json.loads((run / "metrics.json").read_text())
    assert m["mode"]["chosen"] == "head" and m["frozen_outputs"]["precision"] == "int8"
    assert m["val_accuracy"] == pytest.approx(m["phases"][0]["best_val_accuracy"])
    loaded = graftkit.load(run)
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    paths = [r["path"] for r in rows]
    probs = loaded.predict_proba(paths)
    split = loaded._split
    assert split is not None and split.index == 1  # the engine's pooled output
    pixels = np.stack([load_image(p, 64) for p in paths]).astype(np.float32)
    pooled = split.frozen(pixels)[1]
    head = keras.Model(loaded.model.get_layer(HEAD_DROPOUT).input, loaded.model.output)
    np.testing.assert_allclose(probs, keras.ops.convert_to_numpy(head(pooled)), atol=1e-6)
    np.testing.assert_allclose(probs.max(axis=1), [float(r["probability"]) for r in rows],
                               atol=2e-6)  # the fit's final scores came the same way
