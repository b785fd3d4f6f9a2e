"""Slow end-to-end runs on real photos and on the demo data (CI runs them too)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from graftkit.cli import main

from .conftest import SHARED

HYMENOPTERA = SHARED / "hymenoptera"


@pytest.mark.slow
@pytest.mark.skipif(not HYMENOPTERA.is_dir(), reason=f"{HYMENOPTERA} is absent (shared datasets)")
def test_default_fit_on_hymenoptera(tmp_path, capsys):
    code = main(["fit", str(HYMENOPTERA), "--out", str(tmp_path / "run")])
    out, err = capsys.readouterr()
    assert code == 0, err
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (metrics["num_train"], metrics["num_val"]) == (244, 153)
    assert metrics["val_accuracy"] >= 0.92, out
    head, fine = metrics["phases"]
    assert metrics["val_accuracy"] >= head["best_val_accuracy"] - 1e-6  # never worse than phase 1
    assert "cached views" in head["note"] and "cached activations" in fine["note"]
    assert metrics["engine"] and metrics["engine_key"]  # predict and evaluate reuse the engine
    _apps_answer_as_graft_predict(tmp_path / "run", tmp_path)


def _apps_answer_as_graft_predict(run, tmp_path) -> None:
    """Where the exports run, on the real run's validation images: MediaPipe's ImageClassifier
    (inside graft export's own check, every image) and ONNX Runtime Web in Chromium (every
    sixth: its WebAssembly takes a quarter second an image) give graft predict's top-1, scores
    within 1e-4."""
    import numpy as np

    import graftkit
    from graftkit.deploy.export import export
    from tests.test_browser import at_model_size, in_chromium

    mediapipe = export(run, "tflite").mediapipe
    assert mediapipe["images_checked"] == 153 and mediapipe["top1_agreement"] == 1.0
    assert mediapipe["max_abs_diff"] <= 1e-4
    export(run, "onnx")
    clf = graftkit.load(run)
    paths = [p for p, _ in json.loads((run / "split.json").read_text())["val"]][::6]
    assert len({Path(p).parent.name for p in paths}) == 2  # both classes
    expected = clf.predict_proba(paths)
    got, _ = in_chromium(run, at_model_size(paths, clf.image_size, tmp_path))
    probabilities = np.array([r["probabilities"] for r in got])
    assert (probabilities.argmax(1) == expected.argmax(1)).all()
    np.testing.assert_allclose(probabilities, expected, atol=1e-4)


@pytest.mark.slow
def test_demo_runs_offline_and_learns(tmp_path, capsys, monkeypatch):
    """The demo's whole path (the digits written offline, both phases through the whole base,
    evaluate, predict, the summary) with 2 fine-tuning epochs instead of 8: the full demo is
    ``make demo``, and benchmarks/oracle.py runs it to the last epoch."""
    from graftkit import demo

    monkeypatch.setattr(demo, "DEMO_SETTINGS", {**demo.DEMO_SETTINGS, "fine_tune_epochs": 2})
    metrics = demo.run_demo(tmp_path / "demo", verbose=0, log=lambda _m: None)
    assert [p["name"] for p in metrics["phases"]] == ["head", "fine_tune"]
    assert metrics["options"]["unfreeze"] == "all" and metrics["phases"][1]["epochs"] <= 2
    out = capsys.readouterr().out
    assert metrics["num_train"] + metrics["num_val"] == 1797
    assert metrics["val_accuracy"] >= 0.9, out
    assert (tmp_path / "demo" / "run" / "model.keras").is_file()
