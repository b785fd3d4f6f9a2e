"""Calibrated probabilities and the "unknown" answer: the maths, the run folder, every output."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from graftkit.outputs import calibration as cal
from graftkit.outputs import open_set as osr


def _overconfident(n: int = 600, classes: int = 4, t: float = 2.5, seed: int = 0):
    """Logits whose labels were drawn from softmax(logits / t): T = t calibrates them."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (n, classes))
    p = cal.softmax(logits / t)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return logits, labels


def test_the_fitted_temperature_is_the_one_the_labels_were_drawn_with():
    logits, labels = _overconfident(4000, t=2.5)
    assert cal.fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.08)


def test_ece_is_zero_for_calibrated_confidences_and_large_for_overconfident_ones():
    labels = np.zeros(100, dtype=int)
    right = np.tile([0.9, 0.1], (100, 1))
    labels[:10] = 1  # 90% right at confidence 0.9
    assert cal.ece(right, labels) == pytest.approx(0.0, abs=1e-9)
    sure = np.tile([0.99, 0.01], (100, 1))
    labels[:50] = 1  # 50% right at confidence 0.99
    assert cal.ece(sure, labels) == pytest.approx(0.49, abs=1e-9)


def test_auto_calibration_lowers_held_out_ece_and_never_changes_the_argmax():
    logits, labels = _overconfident()
    out = cal.calibrate(logits, labels, "auto")
    assert out["applied"] and out["temperature"] > 1.5
    assert out["ece_after"] < out["ece_before"] and out["nll_after"] < out["nll_before"]
    after = cal.softmax(logits / out["temperature"])
    assert (after.argmax(1) == logits.argmax(1)).all()
    none = cal.calibrate(logits, labels, "none")
    assert not none["applied"] and none["temperature"] == 1.0
    few = cal.calibrate(logits[:10], labels[:10], "auto")  # too few images to fit on
    assert not few["applied"] and "fewer than" in few["reason"]


def test_folding_the_temperature_keeps_stock_keras_layers(tmp_path):
    import keras

    from graftkit.graft import build_classifier

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs))
    model = build_classifier(keras.Model(inputs, x, name="base"), 3)
    model.get_layer("head_dense").set_weights([np.random.default_rng(0).normal(0, 3, (4, 3))
                                               .astype("float32"), np.zeros(3, "float32")])
    images = np.random.default_rng(1).uniform(0, 255, (5, 8, 8, 3)).astype("float32")
    before = model.predict(images, verbose=0)
    cal.fold_temperature(model, 2.0)
    model.save(tmp_path / "m.keras")
    after = keras.saving.load_model(tmp_path / "m.keras").predict(images, verbose=0)
    np.testing.assert_allclose(after, cal.softmax(np.log(before) / 2.0), atol=1e-5)
    assert (after.argmax(1) == before.argmax(1)).all()
    np.testing.assert_allclose(after.sum(1), 1.0, atol=1e-5)


def _clusters(seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, 16)) * 4
    train = np.concatenate([c + rng.normal(0, 0.5, (40, 16)) for c in centres])
    labels = np.repeat(np.arange(3), 40)
    known = np.concatenate([c + rng.normal(0, 0.5, (10, 16)) for c in centres])
    unknown = rng.normal(0, 1, (30, 16)) * 4 + 20
    return train.astype("float32"), labels, known.astype("float32"), unknown.astype("float32")


@pytest.mark.parametrize("method", ["knn", "mahalanobis"])
def test_feature_scores_separate_unseen_images_of_the_classes_from_others(method):
    train, labels, known, unknown = _clusters()
    scorer = osr.fit_open_set(method, train, labels, 3)
    ks, us = scorer.scores(known, None), scorer.scores(unknown, None)
    assert osr.auroc(ks, us) == 1.0
    assert osr.fpr_at_95(ks, us) == 0.0


def test_the_threshold_keeps_the_share_asked_for():
    scores = np.arange(100, dtype=float)
    t = osr.choose_threshold(scores, 0.95)
    assert (scores <= t).mean() == pytest.approx(0.95, abs=0.011)
    assert osr.choose_threshold(np.array([]), 0.95) == float("inf")


@pytest.mark.parametrize("method", osr.METHODS)
def test_the_graph_score_of_exports_is_the_numpy_score(method, tmp_path):
    """open_set_model (what exports run) computes the file's formula, after a save/load."""
    import keras

    from graftkit.graft import HEAD_DENSE, build_classifier, with_features

    inputs = keras.Input((8, 8, 3))
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(6, 3)(inputs))
    model = build_classifier(keras.Model(inputs, x, name="base"), 3)
    rng = np.random.default_rng(0)
    train = rng.uniform(0, 255, (30, 8, 8, 3)).astype("float32")
    features = with_features(model).predict(train, verbose=0)[0]
    scorer = osr.fit_open_set(method, features, np.arange(30) % 3, 3, k=3)
    scorer.threshold = 0.5
    scorer.save(tmp_path / "o.npz")
    scorer = osr.OpenSet.load(tmp_path / "o.npz")
    images = rng.uniform(0, 255, (7, 8, 8, 3)).astype("float32")
    graph = osr.open_set_model(model, scorer).predict(images, verbose=0)
    f, p = with_features(model).predict(images, verbose=0)
    kernel, bias = model.get_layer(HEAD_DENSE).get_weights()
    expected = scorer.scores(f, p, f.astype(np.float64) @ kernel + bias)  # by hand, not head_logits
    np.testing.assert_allclose(graph["ood_score"], expected, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(graph["probabilities"], p, atol=1e-6)


# --- a real run: metrics, files, predict / evaluate / CLI ----------------------------------

def test_a_run_records_calibration_and_its_open_set_threshold(trained_run):
    import graftkit

    run = trained_run / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    c = metrics["calibration"]
    for key in ("temperature", "ece_before", "ece_after", "nll_before", "nll_after"):
        assert isinstance(c[key], float)
    o = metrics["open_set"]
    assert o["file"] == "open_set.npz" and (run / o["file"]).is_file()
    assert o["method"] == "knn" and o["threshold"] > 0 and o["keep"] == 0.95
    clf = graftkit.load(run)
    assert clf.open_set.threshold == pytest.approx(o["threshold"])
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0].endswith("ood_score,known") and len(rows) == 1 + metrics["num_val"]
    report = (run / "report.html").read_text()
    assert "id=calibration" in report and "id=open-set" in report and "<svg" in report


def test_predict_says_unknown_above_the_threshold_and_reject_none_never(trained_run, capsys):
    import graftkit
    from graftkit.cli import main

    run, image = trained_run / "run", trained_run / "data" / "class_0" / "img_000.png"
    clf = graftkit.load(run)
    auto = clf.predict([image])[0]
    assert auto.ood_score is not None and auto.known == (auto.ood_score <= clf.threshold())
    strict = clf.predict([image], reject=-1.0)[0]  # every score is >= 0: all unknown
    assert not strict.known and strict.label == auto.label  # label: still the closest class
    assert str(strict).startswith(f"unknown (closest: {auto.label} ")
    assert clf.predict([image], reject="none")[0].known
    assert main(["predict", str(run), str(image), "--reject", "-1"]) == 0
    out = capsys.readouterr().out
    assert f"unknown (closest: {auto.label}" in out and "1 of 1 images unlike" in out
    assert main(["predict", str(run), str(image), "--reject", "none", "--format", "json"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert line["known"] is True and line["ood_score"] == pytest.approx(auto.ood_score, rel=1e-5)
    for bad in ("maybe", "nan", "inf", "-inf"):  # nan would call every image unknown
        assert main(["predict", str(run), str(image), f"--reject={bad}"]) == 2
        assert "--reject must be auto, none or a finite threshold" in capsys.readouterr().err


def test_evaluate_reports_the_share_it_would_reject(trained_run, capsys):
    from graftkit.cli import main

    assert main(["evaluate", str(trained_run / "run"), str(trained_run / "data")]) == 0
    assert "score above the run's threshold" in capsys.readouterr().out


def test_a_run_without_open_set_statistics_answers_known_with_a_note(trained_run, tmp_path,
                                                                     capsys):
    from graftkit.cli import main

    old = tmp_path / "old"
    shutil.copytree(trained_run / "run", old)
    (old / "open_set.npz").unlink()
    image = trained_run / "data" / "class_0" / "img_000.png"
    assert main(["predict", str(old), str(image), "--format", "json"]) == 0
    captured = capsys.readouterr()
    line = json.loads(captured.out)
    assert line["known"] is True and line["ood_score"] is None
    assert "no open-set statistics" in captured.err


def test_the_knn_bank_is_a_fixed_sample_beyond_its_limit(monkeypatch):
    from graftkit import defaults

    train, labels, known, _ = _clusters()
    monkeypatch.setattr(defaults, "OPEN_SET_MAX_BANK", 30)
    a = osr.fit_open_set("knn", train, labels, 3)
    b = osr.fit_open_set("knn", train, labels, 3)
    assert a.arrays["bank"].shape == (30, 16)
    np.testing.assert_array_equal(a.arrays["bank"], b.arrays["bank"])  # the same sample each time
