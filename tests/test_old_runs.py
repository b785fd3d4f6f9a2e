"""A run folder written by graftkit 0.1.0 (before metrics.json had a schema version) still
loads, predicts as it did, serves, rebuilds its report and exports.

``tests/data/run-0.1.0`` was written by ``graft fit`` of that version on
``make_folder(classes=3, per_class=8)`` (seed 0) with a tiny ``.keras`` base, so the folder is
small; its data is made again here, and the folder's paths point to it (a run moved with its
data).
"""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest

from .conftest import DATA, make_folder

OLD = DATA / "run-0.1.0"
RECORDED = "/tmp/legacy/data"  # where its data was when it was written


@pytest.fixture
def old_run(tmp_path):
    data = make_folder(tmp_path / "data", classes=3, per_class=8)
    run = tmp_path / "run"
    shutil.copytree(OLD, run)
    for name in ("split.json", "metrics.json", "predictions.csv"):
        path = run / name
        path.write_text(path.read_text(encoding="utf-8").replace(RECORDED, str(data)),
                        encoding="utf-8")
    return run, data


def test_an_old_run_loads_and_predicts_what_it_recorded(old_run):
    import graftkit

    run, _ = old_run
    clf = graftkit.load(run)
    record = clf.record
    assert record.schema == 1 and "schema" not in (OLD / "metrics.json").read_text()
    assert record.backbone == "tiny_base.keras" and record.classes == clf.classes
    assert record.finished and record.option("seed") == 1337
    with open(run / "predictions.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    predictions = clf.predict([r["path"] for r in rows])
    assert [p.label for p in predictions] == [r["predicted"] for r in rows]
    np.testing.assert_allclose([p.probability for p in predictions],
                               [float(r["probability"]) for r in rows], atol=1e-5)
    # as the probabilities: float32 kernels differ between CPUs (6e-6 apart with AVX-512)
    np.testing.assert_allclose([p.ood_score for p in predictions],
                               [float(r["ood_score"]) for r in rows], rtol=1e-4, atol=1e-5)
    assert clf.evaluate(run.parent / "data")["num_images"] == 24


def test_an_old_run_serves_and_rebuilds_its_report(old_run):
    from fastapi.testclient import TestClient

    from graftkit.outputs.report import build_report
    from graftkit.serve.server import Service

    run, data = old_run
    service = Service(run, data=str(data))
    try:
        service.review.wait()
        client = TestClient(service.app, base_url="http://127.0.0.1")
        info = client.get("/info").json()
        assert info["backbone"] == "tiny_base.keras" and info["val_accuracy"] > 0
        image = data / "class_1" / "img_000.png"
        answer = client.post("/predict", files=[("file", (image.name, image.read_bytes(),
                                                           "image/png"))])
        assert answer.status_code == 200
        assert answer.json()["predictions"][0]["label"] in info["classes"]
        assert service.review.summary()["state"] == "ready"
    finally:
        service.batcher.close()
    (run / "report.html").unlink()
    assert build_report(run).is_file()


@pytest.mark.integration
def test_an_old_run_exports(old_run, tmp_path):
    from graftkit.deploy.export import export

    run, _ = old_run
    result = export(run, "tflite", out=tmp_path / "tflite")
    assert result.top1_agreement == 1.0 and result.images_checked == 6
