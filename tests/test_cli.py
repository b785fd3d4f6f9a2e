"""The graft command end to end on generated images, and its one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import pytest

from graftkit.cli import main

from .conftest import make_folder


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.integration
def test_fit_writes_a_complete_run(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=10)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "fit", data, "--out", run, "--image-size", "32",
                             "--head-epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8",
                             "--unfreeze", "2", "--fine-tune-lr", "1e-4")
    assert code == 0, err
    assert "final val accuracy" in out and "phase 2 (fine-tune)" in out
    assert f"writing {run}: model, predictions, plots, report" in out  # not silent at the end
    for name in ("model.keras", "labels.json", "metrics.json", "history.csv", "curves.png",
                 "confusion_matrix.png"):
        assert (run / name).stat().st_size > 0, name
    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("val_accuracy", "backbone", "image_size", "classes", "num_train", "num_val",
                "skipped_files", "phases"):
        assert key in metrics
    assert [p["name"] for p in metrics["phases"]] == ["head", "fine_tune"]
    # The frozen pass is told apart from phase 1's training; together they fit in the run.
    frozen = metrics["frozen_outputs"]
    assert frozen["seconds"] > 0 and frozen["computed"] > 0
    assert 0 < sum(p["seconds"] for p in metrics["phases"]) + frozen["seconds"] \
        <= metrics["total_seconds"]
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("frozen pass"))
    assert f"{frozen['computed']:,} outputs computed" in line and f"{frozen['seconds']:.1f} s" in line
    assert metrics["image_size"] == 32 and metrics["num_train"] + metrics["num_val"] == 30
    assert metrics["val_accuracy"] >= metrics["phases"][0]["best_val_accuracy"] - 1e-6
    rows = list(csv.DictReader((run / "history.csv").read_text().splitlines()))
    assert list(rows[0]) == ["phase", "epoch", "loss", "accuracy", "val_loss", "val_accuracy",
                             "seconds"]
    assert [r["phase"] for r in rows] == ["head", "head", "fine_tune"]
    assert json.loads((run / "labels.json").read_text()) == ["class_0", "class_1", "class_2"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # no temp files left
    # The scores came through the frozen part's engine: the saved model in plain Keras agrees.
    import graftkit

    assert metrics["engine"] in ("keras", "tflite", "openvino", "openvino bf16")
    assert "cached activations" in metrics["phases"][1]["note"]
    record = metrics["frozen_outputs"]  # which engine and precision computed them
    views = metrics["options"]["views"] if metrics["options"]["augment"] else 1
    assert record["computed"] + record["from_cache"] == (metrics["num_train"] * views
                                                         + metrics["num_val"])
    assert record["engine"] in ("keras", "tflite", "openvino") and record["precision"] == "f32"
    assert record["fallbacks"] == []
    preds = list(csv.DictReader((run / "predictions.csv").read_text().splitlines()))
    from graftkit.classifier import Classifier

    plain = Classifier(graftkit.load(run).model, metrics["classes"], fast=False)
    probs = plain.predict_proba([r["path"] for r in preds])
    for r, p in zip(preds, probs):
        assert abs(float(r["probability"]) - p.max()) < 1e-4, r

    code, _out, err = run_cli(capsys, "fit", data, "--out", run, "--image-size", "32")
    assert code == 5 and "--overwrite" in err


@pytest.mark.integration
def test_a_rerun_on_a_warm_cache_repeats_the_first_run_exactly(tmp_path, capsys, monkeypatch):
    """The first run converts the weights and computes every frozen output; the rerun reads
    them all from the cache, so its engine first runs after phase 2 has trained the top blocks
    (only the cut activations it still computes can match Keras then). Same figures."""
    monkeypatch.setenv("GRAFTKIT_ENGINE", "tflite")
    monkeypatch.setenv("GRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", per_class=10)
    runs = []
    for name in ("first", "again"):
        code, out, err = run_cli(capsys, "fit", data, "--out", tmp_path / name, "--image-size",
                                 "32", "--head-epochs", "2", "--fine-tune-epochs", "2",
                                 "--batch-size", "8", "--unfreeze", "2", "--fine-tune-lr", "1e-3",
                                 "--mode", "fine-tune", "--engine-precision", "f32")
        assert code == 0, err  # f32: on every CPU (auto is int8 where it has 8-bit dot products)
        assert "differs from Keras" not in out + err
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        rows = [{k: v for k, v in r.items() if k != "seconds"} for r in
                csv.DictReader((tmp_path / name / "history.csv").read_text().splitlines())]
        runs.append((metrics, rows))
    (first, first_rows), (again, again_rows) = runs
    assert first["frozen_outputs"]["from_cache"] == 0 and again["frozen_outputs"]["computed"] == 0
    # a fully cached run still says which engine computed the rows it read, by name
    assert again["frozen_outputs"]["engine"] == first["frozen_outputs"]["engine"] == "tflite"
    assert again["engine"] == first["engine"] == "tflite"
    assert again["engine_key"] == first["engine_key"] and len(first["engine_key"]) == 16
    assert again["frozen_outputs"]["fallbacks"] == [] and first["frozen_outputs"]["fallbacks"] == []
    assert again_rows == first_rows and again["val_accuracy"] == first["val_accuracy"]
    assert again["confusion_matrix"] == first["confusion_matrix"]


def test_engine_settings_with_a_typo_stop_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GRAFTKIT_ENGINE", "tflte")
    assert main(["fit", str(tmp_path / "data"), "--out", str(tmp_path / "run")]) == 2
    assert "GRAFTKIT_ENGINE='tflte' is not an engine" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_saved_model_loads_in_plain_keras_and_takes_raw_pixels(trained_run):
    """What a user deploys: keras.models.load_model alone, raw 0-255 RGB in, probabilities out."""
    script = f"""
import os; os.environ['KERAS_BACKEND'] = 'tensorflow'
import sys; sys.modules['graftkit'] = None  # graftkit must not be needed
import numpy as np, keras
from PIL import Image
m = keras.models.load_model({str(trained_run / 'run' / 'model.keras')!r})
x = np.asarray(Image.open({str(trained_run / 'data' / 'class_2' / 'img_000.png')!r}).convert('RGB')
               .resize((32, 32), Image.BILINEAR), dtype='float32')[None]
p = m.predict(x, verbose=0)[0]
print(round(float(p.sum()), 4), int(p.argmax()))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    total, label = out.stdout.split()
    assert float(total) == 1.0 and label == "2"


def test_predict_formats(trained_run, capsys):
    run, data = trained_run / "run", trained_run / "data"
    code, out, _ = run_cli(capsys, "predict", run, data / "class_1", "--top-k", "2",
                           "--format", "json")
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert len(lines) == 10
    assert set(lines[0]) == {"path", "label", "probability", "top_k", "known", "ood_score"}
    assert all(isinstance(r["known"], bool) and r["ood_score"] >= 0 for r in lines)
    assert len(lines[0]["top_k"]) == 2 and lines[0]["top_k"][0][0] == lines[0]["label"]
    assert sum(r["label"] == "class_1" for r in lines) >= 8
    code, out, _ = run_cli(capsys, "predict", run, data / "class_0" / "img_000.png",
                           "--format", "csv")
    assert code == 0 and out.splitlines()[0] == "path,label,probability,top_k,known,ood_score"
    code, out, _ = run_cli(capsys, "predict", run, data / "class_0" / "img_000.png")
    assert code == 0 and "class_0" in out


def test_predict_and_suggest_skip_unreadable_files(trained_run, tmp_path, capsys):
    """Files are checked as they are decoded for scoring: a bad one is skipped with its reason
    on stderr, the others answered; none readable is one clear error, and no output file."""
    run, good = trained_run / "run", trained_run / "data" / "class_0" / "img_000.png"
    empty = tmp_path / "box" / "empty.jpg"
    empty.parent.mkdir()
    empty.write_bytes(b"")
    (tmp_path / "box" / "copy.png").write_bytes(good.read_bytes())
    code, out, err = run_cli(capsys, "predict", run, empty, good, "--format", "json")
    assert code == 0 and [json.loads(line)["path"] for line in out.splitlines()] == [str(good)]
    assert f"skipped {empty}: empty file (0 bytes)" in err
    code, out, err = run_cli(capsys, "suggest", run, tmp_path / "box", "--out", tmp_path / "s.csv")
    assert code == 0 and "wrote 1 suggestions" in out and "empty.jpg: empty file" in err
    code, _, err = run_cli(capsys, "predict", run, empty, "--output", tmp_path / "p.txt")
    assert code == 2 and err.strip().splitlines()[-1].endswith(
        "no readable image among the given paths") and "Traceback" not in err
    assert not (tmp_path / "p.txt").exists()


def test_suggest_averages_mirrors_where_the_run_trained_on_them(trained_run, monkeypatch):
    """The inbox's probabilities: each image averaged with its mirror image when the run's
    views were mirrored (the default augmentation), each image as it is otherwise."""
    import numpy as np

    import graftkit

    clf = graftkit.load(trained_run / "run")
    folder = trained_run / "data" / "class_1"
    files = sorted(str(f) for f in folder.glob("*.png"))

    def probability(**given):
        found = {s.path: s.probability for s in clf.suggest(folder, **given)}
        return [found[f] for f in files]

    mirrored = clf.predict_proba(files, tta=True).max(axis=1)
    plain = clf.predict_proba(files).max(axis=1)
    assert np.abs(mirrored - plain).max() > 1e-4
    assert clf.record.options["augment"]["flip"] is True
    np.testing.assert_allclose(probability(), mirrored, atol=1e-6)
    np.testing.assert_allclose(probability(tta=False), plain, atol=1e-6)
    monkeypatch.setitem(clf.record.options, "augment", {"zoom": 0.1})  # trained without mirrors
    np.testing.assert_allclose(probability(), plain, atol=1e-6)


def test_predict_matches_training_preprocessing(trained_run):
    """predict on a raw file equals the model on the pipeline's own decoding of that file."""
    import numpy as np

    import graftkit
    from graftkit.data.images import load_image

    clf = graftkit.load(trained_run / "run")
    path = str(trained_run / "data" / "class_0" / "img_001.png")
    direct = clf.model.predict(load_image(path, 32)[None].astype("float32"), verbose=0)[0]
    np.testing.assert_allclose(clf.predict_proba([path])[0], direct, atol=1e-6)


def test_evaluate(trained_run, capsys):
    run, data = trained_run / "run", trained_run / "data"
    code, out, _ = run_cli(capsys, "evaluate", run, data, "--format", "json")
    assert code == 0
    result = json.loads(out)
    assert result["num_images"] == 30 and result["accuracy"] >= 0.8
    assert set(result["per_class"]) == {"class_0", "class_1", "class_2"}
    code, out, _ = run_cli(capsys, "evaluate", run, data)
    assert code == 0 and "confusion matrix" in out and "precision" in out


def test_evaluate_tta_reports_its_gain_over_the_plain_images(trained_run, capsys):
    from pathlib import Path

    import numpy as np

    import graftkit
    from graftkit.data.images import load_image

    run, data = trained_run / "run", trained_run / "data"
    code, out, _ = run_cli(capsys, "evaluate", run, data, "--tta", "--format", "json")
    assert code == 0
    result = json.loads(out)
    clf = graftkit.load(run)
    paths = sorted(str(p) for p in data.rglob("*.png"))
    labels = [clf.classes.index(Path(p).parent.name) for p in paths]
    x = np.stack([load_image(p, 32) for p in paths]).astype("float32")
    probs = (clf.model.predict(x, verbose=0) + clf.model.predict(x[:, :, ::-1], verbose=0)) / 2
    expected = float(np.mean(probs.argmax(1) == np.array(labels)))
    assert result["tta"]["accuracy"] == pytest.approx(expected)
    assert result["tta"]["gain"] == pytest.approx(expected - result["accuracy"])
    code, out, _ = run_cli(capsys, "evaluate", run, data, "--tta")
    assert code == 0 and "with --tta (image and mirror image averaged): accuracy" in out


def test_evaluate_refuses_foreign_classes(trained_run, tmp_path, capsys):
    other = make_folder(tmp_path / "other", classes=2)
    (other / "class_1").rename(other / "giraffe")
    code, _, err = run_cli(capsys, "evaluate", trained_run / "run", other)
    assert code == 3 and "giraffe" in err and "Traceback" not in err


def test_inspect_and_backbones(trained_run, capsys):
    code, out, _ = run_cli(capsys, "inspect", trained_run / "run", "--format", "json")
    assert code == 0
    info = json.loads(out)
    head = next(r for r in info["layers"] if r["layer"] == "head_dense")
    assert (head["weights"], head["trainable_weights"], head["non_trainable_weights"]) == (2, 2, 0)
    assert info["totals"]["trainable_weights"] == 2  # saved frozen: only the head trains
    # ... and it says what the run fine-tuned, with the count the run's own log gave
    metrics = json.loads((trained_run / "run" / "metrics.json").read_text())
    fine = next(p for p in metrics["phases"] if p["name"] == "fine_tune")
    assert fine["note"] in info["totals"]["trained"] and "frozen again" in info["totals"]["trained"]
    code, out, _ = run_cli(capsys, "inspect", trained_run / "run")
    assert code == 0 and "fine-tuned the base: unfroze" in out
    code, out, _ = run_cli(capsys, "inspect", "efficientnet_lite0", "--all")
    assert code == 0 and "stem_bn" in out and "total:" in out
    code, out, _ = run_cli(capsys, "backbones", "--format", "json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenet_v2",
            "efficientnet_b0", "xception", "resnet50", "convnext_tiny"} <= set(rows)
    assert all(rows[f"efficientnet_lite{i}"]["weights_on_disk"] is True for i in range(3))
    assert rows["efficientnet_lite0"]["params"] == 3_413_024  # incl. BN statistics
    assert [rows[f"efficientnet_lite{i}"]["fit_size"] for i in range(3)] == [288, 320, 352]
    code, out, _ = run_cli(capsys, "backbones")
    assert code == 0 and "77.6" in out and "docs/backbones.md" in out


@pytest.mark.parametrize("argv,code,fragment", [
    (["fit", "{tmp}/missing", "--out", "{tmp}/r"], 3, "not found"),
    (["fit", "{one}", "--out", "{tmp}/r"], 3, "only one class"),
    (["fit", "{data}", "--out", "{tmp}/r", "--unfreeze", "lots"], 2, "--unfreeze"),
    (["fit", "{data}", "--out", "{tmp}/r", "--base", "nope"], 4, "unknown backbone"),
    (["fit", "{data}", "--out", "{tmp}/r", "--lr", "5"], 2, "--lr"),
    (["predict", "{tmp}", "x.jpg"], 5, "not a graftkit run"),
    (["inspect", "nothing-like-this"], 4, "not a run folder"),
])
def test_user_errors_are_one_line_with_an_exit_code(tmp_path, capsys, argv, code, fragment):
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    one = make_folder(tmp_path / "one", classes=1, per_class=3)
    argv = [a.format(tmp=tmp_path, data=data, one=one) for a in argv]
    got, _out, err = run_cli(capsys, *argv)
    assert got == code
    assert fragment in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_graft_console_script_help():
    out = subprocess.run([sys.executable, "-m", "graftkit.cli", "fit", "--help"],
                         capture_output=True, text=True, check=True).stdout
    assert "examples:" in out and "--unfreeze" in out


@pytest.mark.integration
def test_a_held_out_test_folder_is_scored_once_and_reported_first(tmp_path, capsys):
    """test/ beside train/ and val/: never trained or chosen on, scored at the end, first in
    the summary, metrics.json and the report; the validation figure says it was chosen on."""
    data = tmp_path / "data"
    make_folder(data / "train", per_class=8)
    make_folder(data / "val", per_class=3, seed=1)
    make_folder(data / "test", per_class=4, seed=2)
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "fit", data, "--out", run, "--image-size", "32",
                             "--head-epochs", "2", "--fine-tune-epochs", "1", "--batch-size", "8",
                             "--unfreeze", "2")
    assert code == 0, err
    assert "12 held-out test images" in out
    summary = out[out.index("\nsummary"):]
    assert summary.index("test accuracy") < summary.index("final val accuracy")
    assert "nothing chosen on them" in summary and "their accuracy is optimistic" in summary
    assert "test_predictions.csv" in summary
    metrics = json.loads((run / "metrics.json").read_text())
    assert next(iter(metrics)) == "test"  # first
    test = metrics["test"]
    assert test["num_images"] == 12 and 0 <= test["accuracy"] <= 1
    assert test["data"] == str(data / "test") and len(test["confusion_matrix"]) == 3
    assert metrics["num_train"] == 24 and metrics["num_val"] == 9  # test/ is not trained on
    split = json.loads((run / "split.json").read_text())
    assert len(split["test"]) == 12 and not {p for p, _ in split["test"]} & \
        {p for p, _ in split["train"] + split["val"]}
    rows = list(csv.DictReader((run / "test_predictions.csv").read_text().splitlines()))
    assert len(rows) == 12
    assert sum(r["label"] == r["predicted"] for r in rows) / 12 == pytest.approx(test["accuracy"])
    page = (run / "report.html").read_text()
    assert page.index("id=test-accuracy") < page.index("id=accuracy") and "id=test>" in page

    # graft evaluate on the data folder takes test/; on val/ it says the run chose on them
    code, out, err = run_cli(capsys, "evaluate", run, data, "--format", "json")
    assert code == 0 and json.loads(out)["num_images"] == 12
    assert json.loads(out)["chosen_on"]["count"] == 0
    code, out, err = run_cli(capsys, "evaluate", run, data / "val")
    assert code == 0 and "9 of 9 images are the run's own validation images" in err
    code, out, err = run_cli(capsys, "check", data)
    assert code in (0, 1) and "test" in out.splitlines()[1]  # a test column in the counts


def test_without_a_test_set_the_summary_says_how_to_get_one(trained_run, capsys):
    from graftkit.outputs.summary import print_summary

    metrics = json.loads((trained_run / "run" / "metrics.json").read_text())
    assert "test" not in metrics and "best epoch" in metrics["val_used_for"]
    print_summary(metrics, trained_run / "run")
    out = capsys.readouterr().out
    assert "test accuracy" not in out and "a test/ folder beside train/ (or --test)" in out


def test_train_and_test_folders_without_val_and_a_test_table(tmp_path):
    from graftkit.data.checks import check
    from graftkit.data.folder import scan

    data = tmp_path / "data"
    make_folder(data / "train", per_class=10)
    make_folder(data / "test", per_class=3, seed=4)
    folder = scan(data)  # was: two classes named "train" and "test"
    assert folder.classes == ["class_0", "class_1", "class_2"]
    assert len(folder.train) + len(folder.val) == 30 and len(folder.test) == 9
    table = tmp_path / "held.csv"
    table.write_text("".join(f"{p},{p.parent.name}\n" for p in sorted((data / "test").rglob("*.png"))))
    other = scan(data / "train", test=table)
    assert len(other.test) == 9 and other.test_source == str(table)
    # a test image that is a training image is a leak, like a validation one
    trained = next(p for p in folder.train.paths if "class_0" in p)
    shutil.copy(trained, data / "test" / "class_0" / "copy.png")
    leaks = [f for f in check(data).findings if f.kind == "leak"]
    assert [f.message for f in leaks] == ["exact duplicate across test and train: test "
                                          "overstates accuracy"]
