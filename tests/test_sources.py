"""Other data sources (CSV/TSV, --val), TTA in predict, TensorBoard logs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from graftkit.cli import main
from graftkit.data.folder import scan
from graftkit.errors import DataError

from .conftest import make_folder


def _csv(root, name="labels.csv", sep=",", header=True):
    lines = ["path" + sep + "label"] if header else []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        lines += [f"{f.relative_to(root)}{sep}{d.name}" for f in sorted(d.glob("*.png"))]
    (root / name).write_text("\n".join(lines) + "\n")
    return root / name


def test_csv_and_tsv_sources(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=5)
    a = scan(_csv(root))
    b = scan(_csv(root, "labels.tsv", "\t", header=False))
    assert a.classes == b.classes == ["class_0", "class_1"]
    assert len(a.train) + len(a.val) == 10 and a.val.paths == b.val.paths


def test_csv_rows_that_are_wrong(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "bad.csv").write_text("path,label\nclass_0/img_000.png\n")
    with pytest.raises(DataError, match="row 1"):
        scan(root / "bad.csv")
    (root / "escape.csv").write_text("class_0/img_000.png,../../etc\nclass_1/img_000.png,b\n")
    with pytest.raises(DataError, match="not usable"):
        scan(root / "escape.csv")
    (root / "missing.csv").write_text("gone.png,a\nclass_0/img_000.png,a\n"
                                      "class_1/img_000.png,b\nclass_1/img_001.png,b\n"
                                      "class_0/img_001.png,a\n")
    folder = scan(root / "missing.csv")
    assert [s["reason"] for s in folder.skipped] == ["file not found (dangling symbolic link?)"]


@pytest.mark.integration
def test_fit_with_csv_and_explicit_val(tmp_path, capsys):
    train = make_folder(tmp_path / "train", classes=2, per_class=8)
    val = make_folder(tmp_path / "val", classes=2, per_class=3, seed=3)
    code = main(["fit", str(_csv(train)), "--val", str(val), "--out", str(tmp_path / "run"),
                 "--image-size", "32", "--head-epochs", "3", "--fine-tune-epochs", "0",
                 "--tensorboard"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert (m["num_train"], m["num_val"]) == (16, 6) and m["split"].startswith("validation from")
    logs = list((tmp_path / "run" / "tensorboard" / "head").rglob("events.out.tfevents.*"))
    assert logs, "TensorBoard logs for phase 1"


def test_predict_tta_averages_the_mirror_image(trained_run):
    import graftkit
    from graftkit.data.images import load_image

    clf = graftkit.load(trained_run / "run")
    path = str(trained_run / "data" / "class_1" / "img_003.png")
    x = load_image(path, 32)[None].astype("float32")
    expected = (clf.model.predict(x, verbose=0) + clf.model.predict(x[:, :, ::-1], verbose=0)) / 2
    np.testing.assert_allclose(clf.predict_proba([path], tta=True), expected, atol=1e-6)
    seen = []
    clf.predict_proba([path] * 5, batch_size=1, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(5, 5)]


def test_predict_writes_a_file(trained_run, tmp_path, capsys):
    out = tmp_path / "p.csv"
    code = main(["predict", str(trained_run / "run"), str(trained_run / "data"), "--format", "csv",
                 "--tta", "--batch-size", "4", "--output", str(out)])
    assert code == 0
    rows = out.read_text().splitlines()
    assert rows[0] == "path,label,probability,top_k,known,ood_score" and len(rows) == 31


@pytest.mark.integration
def test_tfds_by_name_offline_with_mock_data(tmp_path, capsys):
    """The Keras guide's dataset by name, with TFDS's own mock data (nothing downloaded)."""
    tfds = pytest.importorskip("tensorflow_datasets", reason="the [tfds] extra is not installed")
    with tfds.testing.mock_data(num_examples=24):
        code = main(["fit", "tfds:cats_vs_dogs", "--out", str(tmp_path / "run"), "--image-size",
                     "32", "--head-epochs", "2", "--fine-tune-epochs", "0"])
    assert code == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["classes"] == ["cat", "dog"] and m["num_train"] + m["num_val"] == 24
    assert "tfds" in m["data"]


def test_tfds_bad_spec_is_a_usage_error(capsys):
    assert main(["check", "tfds:"]) == 2
    assert "tfds:NAME" in capsys.readouterr().err
