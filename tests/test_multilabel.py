"""Several labels per image: the tables, the checks, the head's targets, the metrics and
thresholds, and a real fit on generated images (integration)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest

from graftkit.errors import DataError, UsageError

# Each image is a mix of colour patches: one label per patch colour present.
PATCHES = {"red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 60, 220)}


def _image(path: Path, labels: list[str], size: int, rng) -> None:
    from PIL import Image

    arr = rng.integers(0, 40, (size, size, 3)).astype(np.uint8)
    half = size // 2
    corners = [(0, 0), (0, half), (half, 0), (half, half)]
    for (y, x), name in zip(corners, labels):
        arr[y:y + half, x:x + half] = np.array(PATCHES[name]) * 0.8 + arr[y:y + half, x:x + half] * 0.2
    Image.fromarray(arr).save(path)


def make_table_folder(root: Path, n_train: int = 36, n_val: int = 18, size: int = 32,
                      seed: int = 0) -> Path:
    """``root/train.csv``, ``root/val.csv`` (path,labels) and the images they name."""
    rng = np.random.default_rng(seed)
    names = list(PATCHES)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        rows = ["path,labels"]
        for i in range(n):
            k = 1 + i % 3  # 1, 2 or 3 labels
            labels = sorted(rng.choice(names, k, replace=False).tolist())
            name = f"images/{split}_{i:03d}.png"
            _image(root / name, labels, size, rng)
            rows.append(f"{name},{' '.join(labels)}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


# --- data --------------------------------------------------------------------------------


def test_tables_in_a_folder_are_label_sets(tmp_path):
    from graftkit.data.folder import scan

    root = make_table_folder(tmp_path / "d")
    folder = scan(root)
    assert folder.multi_label and folder.classes == ["blue", "green", "red"]
    assert len(folder.train) == 36 and len(folder.val) == 18 and folder.split_source == "tables"
    first = (root / "train.csv").read_text().splitlines()[1].split(",")
    assert folder.train.paths[0] == str(root / first[0])
    assert folder.label_text(folder.train.labels[0]) == first[1]
    assert all(isinstance(y, tuple) for y in folder.train.labels)


def test_one_table_is_split_with_its_seed(tmp_path):
    from graftkit.data.folder import scan

    root = make_table_folder(tmp_path / "d")
    a = scan(root / "train.csv", val_split=0.25, seed=3)
    b = scan(root / "train.csv", val_split=0.25, seed=3)
    assert a.multi_label and len(a.val) == 9 and len(a.train) == 27
    assert a.val.paths == b.val.paths and "seeded split" in a.split_source
    assert sorted(a.train.paths + a.val.paths) == sorted(scan(root).train.paths)


def test_label_separator_and_the_multi_label_switch(tmp_path):
    from graftkit.data.folder import scan

    img = tmp_path / "a.png"
    _image(img, ["red"], 16, np.random.default_rng(0))
    (tmp_path / "t.csv").write_text("path,label\n" + "a.png,red;blue\na.png,green\n" * 2)
    single = scan(tmp_path / "t.csv", val_split=0.5)  # path,label: one class per cell
    assert not single.multi_label and single.classes == ["green", "red;blue"]
    multi = scan(tmp_path / "t.csv", val_split=0.5, multi_label=True, label_sep=";")
    assert multi.multi_label and multi.classes == ["blue", "green", "red"]
    labels = sorted(multi.label_text(y) for y in multi.train.labels + multi.val.labels)
    assert labels == ["blue red", "blue red", "green", "green"]


def test_multi_label_needs_a_table(tmp_path):
    from graftkit.data.folder import scan
    from tests.conftest import make_folder

    with pytest.raises(UsageError, match="path,labels"):
        scan(make_folder(tmp_path / "d"), multi_label=True)


def test_validation_labels_unknown_to_training_are_refused(tmp_path):
    from graftkit.data.folder import scan

    root = make_table_folder(tmp_path / "d")
    with open(root / "val.csv", "a") as f:
        f.write("images/val_000.png,red purple\n")
    with pytest.raises(DataError, match="purple"):
        scan(root)


def test_check_reports_label_sets(tmp_path):
    from graftkit.data.checks import check

    root = tmp_path / "d"
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = ["path,labels"]
    for i in range(24):  # red and green always together; blue on 3 images only
        labels = ["green", "red"] + (["blue"] if i < 3 else [])
        _image(root / "images" / f"{i}.png", labels, 32, rng)
        rows.append(f"images/{i}.png,{' '.join(labels)}")
    (root / "train.csv").write_text("\n".join(rows[:19]) + "\n")
    (root / "val.csv").write_text("\n".join([rows[0]] + rows[19:]) + "\n")
    report = check(root)
    kinds = {f.kind: f.message for f in report.findings}
    assert "2.17 labels per training image (2-3)" in kinds["label_cardinality"]
    assert kinds["rare_label"].startswith("blue: 3 images in training")
    assert kinds["label_not_in_val"].startswith("blue: no validation image")
    assert "green and red are on exactly the same training images" in kinds["labels_together"]
    assert report.counts["red"] == {"train": 18, "val": 6}
    assert "imbalance" not in kinds


# --- the task ------------------------------------------------------------------------------


def test_targets_are_multi_hot_rows():
    from graftkit.task import MULTI_LABEL, SINGLE_LABEL

    y = MULTI_LABEL.targets([(0, 2), (), (1,)], 3)
    np.testing.assert_array_equal(y, [[1, 0, 1], [0, 0, 0], [0, 1, 0]])
    assert y.dtype == np.float32
    assert SINGLE_LABEL.targets([2, 0], 3).dtype == np.int32
    assert MULTI_LABEL.history_columns[3] == "map" and MULTI_LABEL.activation == "sigmoid"


def test_view_cycle_serves_multi_hot_batches():
    from graftkit.train.phases import view_cycle

    views = [np.arange(12, dtype=np.float32).reshape(6, 2)]
    y = np.eye(3, dtype=np.float32)[[0, 1, 2, 0, 1, 2]]
    xb, yb = next(iter(view_cycle(views, y, 6, seed=0)))
    assert yb.shape == (6, 3) and yb.dtype.name == "float32"
    # each row keeps its own labels through the shuffle
    rows = np.asarray(xb)[:, 0].astype(int) // 2
    np.testing.assert_array_equal(np.asarray(yb), y[rows])


# --- metrics and thresholds ----------------------------------------------------------------


def test_best_threshold_maximises_f1_and_rare_labels_fall_back():
    from graftkit.outputs.multilabel import FALLBACK, MIN_POSITIVES, best_threshold

    truth = np.array([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], bool)
    scores = np.array([0.9, 0.8, 0.7, 0.3, 0.25, 0.2, 0.1, 0.05, 0.04, 0.01])
    t = best_threshold(truth, scores)
    assert 0.2 < t < 0.25  # all five positives above it, no negative
    rare = np.zeros(10, bool)
    rare[:MIN_POSITIVES - 1] = True
    assert best_threshold(rare, scores) == FALLBACK


def test_scores_of_perfect_and_imperfect_predictions():
    from graftkit.outputs.multilabel import fit_thresholds, multi_hot, scores

    labels = [(0,), (0, 1), (1,), (), (0, 1)] * 4
    truth = multi_hot(labels, 2)
    perfect = truth.astype(np.float32) * 0.8 + 0.1
    s = scores(labels, perfect, ["a", "b"], np.full(2, 0.5))
    assert s["map"] == 1.0 and s["example_f1"] == 1.0 and s["subset_accuracy"] == 1.0
    assert s["micro_f1"] == 1.0 and s["per_label"][0]["positives"] == 12
    # one image loses label b, another gains label a: F1 per image by hand
    worse = perfect.copy()
    worse[1, 1] = 0.0  # (0, 1) -> (0,): 2*1/(2+1) = 2/3
    worse[2, 0] = 0.9  # (1,) -> (0, 1): 2/3
    s = scores(labels, worse, ["a", "b"], np.full(2, 0.5))
    assert s["example_f1"] == pytest.approx((18 + 2 * 2 / 3) / 20)
    assert s["subset_accuracy"] == pytest.approx(18 / 20)
    np.testing.assert_allclose(fit_thresholds(truth, worse, 0.3), [0.3, 0.3])


def test_a_temperature_per_label_is_kept_only_where_it_helps():
    from graftkit.graft import build_head
    from graftkit.outputs.calibration import fold_temperature
    from graftkit.outputs.multilabel import calibrate_labels

    rng = np.random.default_rng(0)
    n = 600
    true_logits = rng.normal(0, 2, (n, 2))
    truth = rng.random((n, 2)) < 1 / (1 + np.exp(-true_logits))
    logits = true_logits * np.array([3.0, 1.0])  # label 0 over-confident, label 1 as it is
    cal = calibrate_labels(logits, truth, ["over", "fine"])
    over, fine = cal["per_label"]
    assert over["applied"] and 2.4 < over["temperature"] < 3.6
    assert over["nll_after"] < over["nll_before"]
    assert fine["temperature"] == 1.0 or abs(fine["temperature"] - 1) < 0.15
    assert calibrate_labels(logits, truth, ["over", "fine"], "none")["applied"] is False
    head = build_head(3, 2, 0.0, "sigmoid")
    kernel, bias = head.get_layer("head_dense").get_weights()
    fold_temperature(head, [2.0, 1.0])
    k2, b2 = head.get_layer("head_dense").get_weights()
    np.testing.assert_allclose(k2, kernel / [2.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(b2, bias / [2.0, 1.0], rtol=1e-6)


def test_cross_fitted_f1_does_not_see_its_own_images():
    """Thresholds fitted on the very images they score overstate F1; the cross-fitted
    figure, on noise, does not."""
    from graftkit.outputs.multilabel import cross_fitted_decisions, f1_scores, fit_thresholds

    rng = np.random.default_rng(0)
    truth = rng.random((400, 5)) < 0.3
    probs = rng.random((400, 5))  # no information
    own = f1_scores(truth, probs >= fit_thresholds(truth, probs))["micro_f1"]
    crossed = f1_scores(truth, cross_fitted_decisions(truth, probs))["micro_f1"]
    assert crossed < own


# --- a real fit ------------------------------------------------------------------------------


@pytest.mark.integration
def test_fit_multi_label_end_to_end(tmp_path):
    """Sigmoid head, best epoch by mAP, thresholds stored, the run folder complete."""
    import keras

    from graftkit.train.workflow import fit

    root = make_table_folder(tmp_path / "d", n_train=48, n_val=24)
    run = tmp_path / "run"
    clf = fit(root, run, image_size=32, head_epochs=12, fine_tune_epochs=1, batch_size=8,
              lr=1e-2, verbose=0, log=lambda _m: None)
    m = json.loads((run / "metrics.json").read_text())
    assert m["task"] == "multi_label" and m["val_accuracy"] is None
    assert m["options"]["views"] == 3 and m["options"]["fine_tune_lr"] == 5e-4  # the task's
    s = m["multi_label"]
    assert s["map"] > 0.9, s  # three colours in fixed corners: easy
    assert len(s["per_label"]) == 3 and all(0 < r["threshold"] < 1 for r in s["per_label"])
    assert "val_map" in (run / "history.csv").read_text().splitlines()[0]
    model = keras.saving.load_model(run / "model.keras", compile=False)
    assert model.get_layer("head_dense").activation.__name__ == "sigmoid"
    rows = (run / "predictions.csv").read_text().splitlines()
    assert rows[0].startswith("path,labels,predicted,loss") and len(rows) == 25
    assert "label_issues" not in {p.name for p in run.iterdir()}
    assert json.loads((run / "split.json").read_text())["val"][0][1] == \
        (root / "val.csv").read_text().splitlines()[1].split(",")[1]
    report = (run / "report.html").read_text()
    assert "id=per-label" in report and "id=missed-added" in report and "id=pr-curves" in report
    assert "id=label-calibration" in report and m["calibration"]["method"].endswith("per label")
    assert (run / "pr_curves.png").stat().st_size > 1000
    assert clf.metrics["multi_label"]["map"] == s["map"]
    # predictions: the labels above their thresholds, every label's probability
    import graftkit
    from graftkit.errors import RunError

    loaded = graftkit.load(run)
    image = str(root / "images/val_000.png")
    probs = loaded.predict_proba([image])[0]
    answer = loaded.predict(image)[0]
    assert set(answer.probabilities) == {"blue", "green", "red"}
    expected = [c for c, p, t in zip(loaded.classes, probs, loaded.thresholds) if p >= t]
    assert sorted(answer.labels) == sorted(expected)
    assert answer.as_dict()["labels"] == answer.labels
    # explain: a heatmap for each label given (the likeliest when none is)
    why = loaded.explain(image)[0]
    assert list(why.heatmaps) == (answer.labels or [answer.label])
    assert why.prediction.labels == answer.labels
    assert all(h.shape == (32, 32) for h in why.heatmaps.values())
    # evaluate: the same scores as the fit's at the stored thresholds (the fit's F1s are
    # cross-fitted, so only mAP must agree)
    scored = loaded.evaluate(root)
    assert scored["map"] == pytest.approx(s["map"], abs=1e-6)
    assert scored["chosen_on"]["count"] == 24 and scored["num_images"] == 24
    # what answers one class per image refuses, never an argmax of sigmoids
    with pytest.raises(RunError, match="multi-label run"):
        loaded.suggest(str(root / "images"))
    # export: sigmoid outputs checked label by label, the thresholds in export.json
    exported = graftkit.export(run, fmt="tflite")
    assert exported.labels["same_labels_clear"] == 1.0 and exported.accuracy is None
    written = json.loads((run / "export" / "tflite" / "export.json").read_text())
    assert written["labels"]["thresholds"] == dict(zip(loaded.classes,
                                                       map(float, loaded.thresholds)))
    assert (run / "export" / "tflite" / "labels.txt").read_text().split() == loaded.classes
    # MediaPipe reads the sigmoids as one head, its labels from the metadata
    assert written["mediapipe"]["metadata"] and written["mediapipe"]["max_abs_diff"] <= 1e-4
    # Core ML: no classifier (it names one label per image), the sigmoids and the thresholds
    if importlib.util.find_spec("coremltools") is not None:
        coreml = graftkit.export(run, fmt="coreml").coreml
        assert coreml["class_labels"] is None and "probabilities" in coreml["outputs"]
        assert "classLabel" not in coreml["outputs"]


@pytest.mark.integration
def test_serve_a_multi_label_run(tmp_path):
    """POST /predict answers with the labels above their thresholds; /info says the task; the
    review page edits the table in a browser (a label added, one taken away, undone); --inbox,
    which suggests one class, refuses."""
    from fastapi.testclient import TestClient

    from graftkit.errors import RunError
    from graftkit.serve.server import Service
    from graftkit.train.workflow import fit

    root = make_table_folder(tmp_path / "d", n_train=30, n_val=15)
    run = tmp_path / "run"
    fit(root, run, image_size=32, head_epochs=8, fine_tune_epochs=0, batch_size=8, lr=1e-2,
        verbose=0, log=lambda _m: None, label_folds=0)
    service = Service(run, data=str(root))
    try:
        client = TestClient(service.app, base_url="http://127.0.0.1")
        image = root / "images" / "val_001.png"
        got = client.post("/predict", files={"file": (image.name, image.read_bytes())}).json()
        p = got["predictions"][0]
        want = service.classifier.predict(str(image))[0]
        assert p["labels"] == want.labels and set(p["probabilities"]) == {"blue", "green", "red"}
        info = client.get("/info").json()
        assert info["task"] == "multi_label" and info["val_map"] > 0.5
        service.review.wait(60)
        state = client.get("/review/api/items", headers={"X-Graft-Token": service.token}).json()
        assert state["state"] == "ready" and state["mode"] == "table" and state["can_move"]
        before = (root / "val.csv").read_text()
        _edit_labels_in_the_browser(service, root)
        assert (root / "val.csv").read_text() == before
    finally:
        service.stop()
        service.batcher.close()
    with pytest.raises(RunError, match="--inbox answers one class per image"):
        Service(run, inbox=str(root / "images"))

    # graft refit after the table was edited: one image relabelled, counted by content
    rows = (root / "train.csv").read_text().splitlines()
    path, labels = rows[1].split(",")
    rows[1] = f"{path},{'red' if labels != 'red' else 'blue'}"
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    from graftkit.cli import main

    assert main(["refit", str(run)]) == 0
    refit = json.loads((tmp_path / "run-2" / "metrics.json").read_text())
    assert refit["task"] == "multi_label" and refit["options"]["fine_tune_epochs"] == 0


def _edit_labels_in_the_browser(service, root: Path) -> None:
    """The review page on a multi-label table: add the model's extra label (or one from the
    menu), take a label away, then undo both from the card; the table follows each click."""
    from tests.test_report import CHROMIUM
    from tests.test_serve import browser_or_skip, until

    sync_playwright = browser_or_skip()
    base = service.start()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox",
                                                                    "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        console: list[str] = []
        page.on("console", lambda m: console.append(m.text))
        page.goto(f"{base}/review?token={service.token}")
        page.wait_for_selector("#top_losses .card .chips", timeout=60_000)

        def notice(start: str) -> None:
            until(page, "() => { const m = document.getElementById('message');"
                        f" return !m.hidden && m.textContent.startsWith('{start}'); }}")

        card = next(c for c in page.locator("#top_losses .card").all()  # one with a label to add
                    if c.locator("select option").count() > 1 and c.locator(".chip").count())
        key = card.get_attribute("data-key")
        row = key  # the table's path cells are relative to it, as the keys are
        table = root / "val.csv"

        def labels_now() -> list[str]:
            cell = next(line.split(",")[1] for line in table.read_text().splitlines()
                        if line.split(",")[0] == row)
            return sorted(cell.split())

        given = labels_now()
        menu = card.locator("select")
        extra = next(o.get_attribute("value") for o in menu.locator("option").all()
                     if o.get_attribute("value"))
        menu.select_option(extra)
        card.locator("button.add").click()
        notice("edited")
        assert labels_now() == sorted([*given, extra])
        chips = card.locator(".chip")
        assert sorted(c.get_attribute("data-label") for c in chips.all()) == labels_now()
        gone = given[0]
        card.locator(f".chip[data-label='{gone}'] button.remove").click()
        notice("edited")
        assert gone not in labels_now()
        shots = os.environ.get("GRAFTKIT_SCREENSHOTS")
        if shots:  # for looking at the page by eye
            page.screenshot(path=str(Path(shots) / "review-labels.png"), full_page=True)
        card.locator(".restore").click()  # both edits of this image, undone at once
        notice("undone")
        assert labels_now() == given
        assert page.locator("#recent").is_hidden()
        assert [m for m in console if "Content Security Policy" in m] == []
        browser.close()
