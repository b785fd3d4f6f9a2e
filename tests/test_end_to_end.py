"""Slow end-to-end runs on real photos and on the demo data (CI runs them too)."""

from __future__ import annotations

import json

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


@pytest.mark.slow
def test_demo_runs_offline_and_learns(tmp_path, capsys):
    from graftkit.demo import run_demo

    metrics = run_demo(tmp_path / "demo", verbose=0, log=lambda _m: None)
    out = capsys.readouterr().out
    assert metrics["num_train"] + metrics["num_val"] == 1797
    assert metrics["val_accuracy"] >= 0.9, out
    assert (tmp_path / "demo" / "run" / "model.keras").is_file()
