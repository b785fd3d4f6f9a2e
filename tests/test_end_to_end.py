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
