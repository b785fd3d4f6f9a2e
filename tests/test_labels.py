"""The data loop: label issues (the confident-learning rule, the K-fold heads, where findings
appear) and suggestions for unlabelled images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from graftkit.labels.issues import (
    LabelIssue,
    confident_learning,
    find_issues,
    read_csv,
    thresholds,
    write_csv,
)

# --- the rule, on probabilities made by hand ------------------------------------------------


def test_thresholds_are_each_class_mean_self_confidence():
    probs = np.array([[0.9, 0.1], [0.7, 0.3], [0.2, 0.8], [0.4, 0.6]])
    labels = np.array([0, 0, 1, 1])
    np.testing.assert_allclose(thresholds(probs, labels), [0.8, 0.7])


def test_a_class_nobody_has_is_never_suggested():
    probs = np.array([[0.2, 0.1, 0.7], [0.9, 0.05, 0.05]])
    labels = np.array([0, 0])  # class 2 given to nobody: its threshold is above any probability
    flagged, suggested = confident_learning(probs, labels)
    assert flagged.tolist() == [] and suggested.tolist() == [0, 0]


def test_flagged_when_another_class_passes_its_threshold_and_the_top_class_differs():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([
        [0.95, 0.05],  # sure and right
        [0.90, 0.10],
        [0.25, 0.75],  # given 0, the model says 1 above class 1's threshold (0.717): flagged
        [0.10, 0.90],
        [0.20, 0.80],
        [0.55, 0.45],  # given 1, top class 0 at 0.55: below class 0's threshold (0.70)
    ])
    flagged, suggested = confident_learning(probs, labels)
    assert flagged.tolist() == [2]
    assert suggested[2] == 1
    # at 0.80 image 5 passes class 0's threshold: flagged too, and first (p_given 0.2 < 0.25)
    probs[5] = [0.8, 0.2]
    flagged, suggested = confident_learning(probs, labels)
    assert flagged.tolist() == [5, 2]
    assert suggested[5] == 0


def test_passing_a_threshold_is_not_enough_when_the_given_class_is_still_on_top():
    labels = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([[0.5, 0.45, 0.05], [0.9, 0.05, 0.05], [0.1, 0.6, 0.3], [0.05, 0.1, 0.85],
                      [0.1, 0.1, 0.8], [0.1, 0.1, 0.8]])
    # image 0: class 1 (0.45) passes class 1's threshold (0.35), but 0 stays on top
    flagged, suggested = confident_learning(probs, labels)
    assert 0 not in flagged.tolist()
    assert flagged.tolist() == [3]  # given 1, class 2 on top above its threshold
    assert suggested[3] == 2


def test_suggestion_is_the_likeliest_class_above_its_threshold():
    labels = np.array([0, 1, 1, 2, 2, 2])
    probs = np.array([[0.1, 0.5, 0.4],  # given a: b and c pass (0.5, 0.4); b has more
                      [0.1, 0.5, 0.4], [0.2, 0.5, 0.3],  # b's threshold 0.5
                      [0.3, 0.3, 0.4], [0.3, 0.3, 0.4], [0.3, 0.3, 0.4]])  # c's 0.4
    issues = find_issues(probs, labels, [f"f{i}.png" for i in range(6)], ["train"] * 6,
                         ["a", "b", "c"])
    assert [(i.path, i.given, i.suggested) for i in issues] == [("f0.png", "a", "b")]
    assert issues[0].p_given == pytest.approx(0.1) and issues[0].p_suggested == pytest.approx(0.5)
    assert issues[0].rank == 1


def test_label_issues_csv_round_trips(tmp_path):
    issues = [LabelIssue(1, "/d/train/a/x y.png", "train", "a", "b", 0.012345678, 0.9),
              LabelIssue(2, "/d/val/b/é,z.jpg", "val", "b", "a", 0.2, 0.7)]
    write_csv(tmp_path / "label_issues.csv", issues)
    header = (tmp_path / "label_issues.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "rank,path,split,given,suggested,p_given,p_suggested"
    back = read_csv(tmp_path / "label_issues.csv")
    assert [(i.path, i.given, i.suggested) for i in back] == [(i.path, i.given, i.suggested)
                                                               for i in issues]
    assert back[0].p_given == pytest.approx(0.012346, abs=1e-6)
    assert read_csv(tmp_path / "absent.csv") == []


# --- the folds and the heads --------------------------------------------------------------


def test_folds_are_stratified_and_seeded():
    from graftkit.train.cross_fit import stratified_folds

    labels = np.repeat([0, 1, 2], [50, 23, 7])
    fold = stratified_folds(labels, 5, seed=3)
    for c, n in ((0, 50), (1, 23), (2, 7)):
        counts = np.bincount(fold[labels == c], minlength=5)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1  # small classes fill the folds the others left short
    assert (stratified_folds(labels, 5, seed=3) == fold).all()
    assert (stratified_folds(labels, 5, seed=4) != fold).any()


def _blobs(n_per_class: int, classes: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (classes, dim))
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    return x.astype(np.float32), y


def test_heads_that_never_saw_an_image_find_its_flipped_label():
    """The K-fold heads score each image without having trained on it: a flipped label stands
    out, and the suggestion is its true class. (A Keras fit: the fit is what is tested.)"""
    from graftkit.train.cross_fit import HeadSettings, label_issues

    x, y = _blobs(40, 3)
    noisy = y.copy()
    flipped = [3, 47, 90, 101]
    for i in flipped:
        noisy[i] = (y[i] + 1) % 3
    paths = [f"img{i}.png" for i in range(len(y))]
    found = label_issues(x, noisy, paths, ["train"] * len(y), ["a", "b", "c"],
                         HeadSettings(epochs=10, dropout=0.2, lr=1e-2), folds=5, seed=0)
    assert found.checked == len(y) and found.folds == 5
    names = {i.path: i for i in found.issues}
    assert {f"img{i}.png" for i in flipped} <= set(names)
    for i in flipped:
        assert names[f"img{i}.png"].suggested == "abc"[y[i]]
    assert len(found.issues) <= len(flipped) + 2  # and not much else
    record = found.record()
    assert record["count"] == len(found.issues) and record["file"] == "label_issues.csv"
    assert "confident learning" in record["method"]


def test_out_of_fold_probabilities_are_seeded():
    from graftkit.train.cross_fit import HeadSettings, out_of_fold

    x, y = _blobs(10, 2, dim=4)
    a = out_of_fold(x, y, 2, HeadSettings(epochs=2), folds=2, seed=1)
    b = out_of_fold(x, y, 2, HeadSettings(epochs=2), folds=2, seed=1)
    np.testing.assert_array_equal(a, b)
    assert np.allclose(a.sum(axis=1), 1, atol=1e-5)
    assert not np.array_equal(a, out_of_fold(x, y, 2, HeadSettings(epochs=2), folds=2, seed=2))


def test_label_folds_option():
    from graftkit.errors import UsageError
    from graftkit.train.workflow import make_options

    assert make_options().label_folds == 5
    assert make_options(label_folds=0).label_folds == 0
    with pytest.raises(UsageError, match="--label-folds 1 leaves no images"):
        make_options(label_folds=1)
    assert "label_folds" not in make_options().fingerprint  # training is the same either way


# --- where they appear --------------------------------------------------------------------


def planted_folder(root):
    """Three colour classes with two images moved into the wrong class folder: their paths and
    true classes."""
    from tests.conftest import make_folder

    data = make_folder(root, classes=3, per_class=14)
    planted = {shutil.move(str(data / "class_0" / "img_003.png"),
                           str(data / "class_1" / "moved_0to1.png")): "class_0",
               shutil.move(str(data / "class_2" / "img_007.png"),
                           str(data / "class_0" / "moved_2to0.png")): "class_2"}
    return data, planted


def test_check_refuses_label_options_it_cannot_use(tmp_path, capsys):
    """A typo is answered before the scan and before TensorFlow."""
    from graftkit.cli import main

    assert main(["check", str(tmp_path), "--label-folds", "3"]) == 2
    assert "--base and --label-folds go with --labels" in capsys.readouterr().err
    assert main(["check", str(tmp_path), "--labels", "--label-folds", "1"]) == 2
    assert "--label-folds must be at least 2" in capsys.readouterr().err
    assert main(["check", str(tmp_path), "--labels", "--base", "efficientnet_lite9"]) != 0
    assert "did you mean efficientnet_lite" in capsys.readouterr().err


@pytest.mark.integration
def test_check_labels_finds_them_before_any_training(tmp_path, capsys):
    from graftkit.cli import main

    data, planted = planted_folder(tmp_path / "data")
    assert main(["check", str(data), "--labels"]) == 1  # warnings
    out = capsys.readouterr().out
    assert "labels: 2 of 42 labels look wrong" in out
    assert "class_1/moved_0to1.png  train  class_1 -> class_0" in out
    assert main(["check", str(data), "--labels", "--format", "json"]) == 1
    found = json.loads(capsys.readouterr().out)["label_issues"]
    assert {(i["path"], i["suggested"]) for i in found["issues"]} == set(planted.items())
    assert found["count"] == 2 and found["checked"] == 42


@pytest.mark.integration
def test_fit_finds_the_planted_wrong_labels(tmp_path, capsys):
    """graft fit names both planted images, with their true class, in the summary,
    label_issues.csv, metrics.json and report.html."""
    from graftkit.cli import main

    data, planted = planted_folder(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(run), "--image-size", "32", "--mode", "head",
                 "--head-epochs", "15", "--lr", "1e-2", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    issues = read_csv(run / "label_issues.csv")
    by_path = {i.path: i for i in issues}
    for path, truth in planted.items():
        assert path in by_path, (path, issues)
        assert by_path[path].suggested == truth
    assert len(issues) <= 4
    m = json.loads((run / "metrics.json").read_text())
    assert m["label_issues"]["count"] == len(issues) and m["label_issues"]["folds"] == 5
    assert f"label issues         {len(issues)} of 42 labels look" in out
    report = (run / "report.html").read_text()
    assert "id=label-issues" in report and "moved_0to1.png" in report
