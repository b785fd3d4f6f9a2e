"""A refit against the run before it: paired by content, scored by the labels as they are now."""

from __future__ import annotations

import numpy as np
import pytest

from graftkit.files import write_json
from graftkit.outputs.compare import against_previous, line, mcnemar_p
from graftkit.outputs.run import PREDICTIONS_FILE, SPLIT_FILE, write_predictions

CLASSES = ["ants", "bees"]


def previous_run(tmp_path, rows):
    """A run folder with the two files the comparison reads, written by graftkit's own
    writers: ``rows`` = (path, digest, label, predicted)."""
    run = tmp_path / "run"
    run.mkdir()
    write_json(run / SPLIT_FILE, {"train": [], "val": [[p, y] for p, _, y, _ in rows],
                                  "test": [], "train_sha256": [],
                                  "val_sha256": [d for _, d, _, _ in rows]})
    probs = np.array([[0.9, 0.1] if k == "ants" else [0.2, 0.8] for *_, k in rows])
    write_predictions(run / PREDICTIONS_FILE, [p for p, *_ in rows],
                      [CLASSES.index(y) for _, _, y, _ in rows], probs, CLASSES)
    return run


@pytest.mark.parametrize("only_now, only_before", [(0, 0), (1, 0), (3, 9), (12, 5), (40, 22)])
def test_mcnemar_p_is_the_exact_binomial_test_of_the_discordant_pairs(only_now, only_before):
    from scipy.stats import binomtest

    n = only_now + only_before
    want = 1.0 if n == 0 else binomtest(only_now, n, 0.5).pvalue
    assert mcnemar_p(only_now, only_before) == pytest.approx(want, rel=1e-9)
    assert mcnemar_p(only_before, only_now) == pytest.approx(want, rel=1e-9)


def test_images_pair_by_content_and_count_by_their_label_now(tmp_path):
    """A relabelled image (another path, another label) is one image scored by its new label
    for both models; images only one run validated on are left out."""
    run = previous_run(tmp_path, [
        ("d/ants/a.jpg", "A", "ants", "ants"),   # both right
        ("d/ants/b.jpg", "B", "ants", "bees"),   # relabelled to bees since: the old model was right
        ("d/bees/c.jpg", "C", "bees", "ants"),   # only the new model right
        ("d/bees/d.jpg", "D", "bees", "bees"),   # only the old model right
        ("d/bees/gone.jpg", "G", "bees", "ants"),  # not in the new validation images
    ])
    result = against_previous(run, ["A", "B", "C", "D", "NEW"],
                              ["ants", "bees", "bees", "bees", "ants"],
                              ["ants", "ants", "bees", "ants", "bees"])
    assert result == {"run": str(run), "images": 4, "val_accuracy": 0.5,
                      "previous_val_accuracy": 0.75, "right_only_now": 1,
                      "right_only_before": 2, "p_value": 1.0}
    assert line(result) == (f"0.5000 here, 0.7500 for {run}, on the same 4 validation images "
                            "with their labels as they are now: 1 right only here, 2 only there "
                            "(McNemar p = 1: no clear difference)")


def test_a_clear_difference_is_called_one(tmp_path):
    rows = [(f"d/ants/{i}.jpg", str(i), "ants", "bees" if i < 12 else "ants") for i in range(40)]
    run = previous_run(tmp_path, rows)
    result = against_previous(run, [d for _, d, _, _ in rows], ["ants"] * 40, ["ants"] * 40)
    assert (result["right_only_now"], result["right_only_before"]) == (12, 0)
    assert result["p_value"] < 0.001 and line(result).endswith(": a clear difference)")


def test_a_run_that_cannot_be_paired_says_why(tmp_path):
    missing = against_previous(tmp_path / "nope", ["A"], ["ants"], ["ants"])
    assert missing["run"] == str(tmp_path / "nope") and "cannot be read" in missing["reason"]
    assert line(missing).startswith(f"not compared with {tmp_path / 'nope'}: its validation")
    run = previous_run(tmp_path, [("d/ants/a.jpg", "A", "ants", "ants")])
    other = against_previous(run, ["Z"], ["ants"], ["ants"])
    assert other["reason"] == "no validation image of this run was a validation image of it"
    (run / "predictions.csv").write_text("path,label\nd/ants/a.jpg,ants\n")  # no answers in it
    assert "reason" in against_previous(run, ["A"], ["ants"], ["ants"])
    (run / "split.json").write_text('{"val": [3, 4], "val_sha256": ["A"]}')  # edited by hand
    assert "cannot be read" in against_previous(run, ["A"], ["ants"], ["ants"])["reason"]
    (run / "split.json").write_text('["not", "a", "split"]')
    assert "cannot be read" in against_previous(run, ["A"], ["ants"], ["ants"])["reason"]
