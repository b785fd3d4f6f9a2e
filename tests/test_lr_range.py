"""The learning-rate range test: its method on a known problem, and fit / lr-find using it."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from graftkit import defaults
from graftkit.cli import main
from graftkit.train.lr_range import before_the_climb, range_test, suggest, why

from .conftest import make_folder


def test_suggest_finds_the_steepest_fall_before_the_minimum():
    lrs = list(np.logspace(-6, 0, 61))
    logs = np.log10(lrs)
    # Flat, a fall centred at 1e-3, a minimum near 1e-2, then divergence.
    losses = list(2.0 - 1.5 / (1 + np.exp(-(logs + 3) * 4)) + np.maximum(0, logs + 2) ** 2)
    steepest, minimum = suggest(lrs, losses)
    assert 10 ** -3.2 <= steepest <= 10 ** -2.8
    assert 10 ** -2.2 <= minimum <= 10 ** -1.5
    # A settling moving average falls steeply over the first points: not a rate to suggest.
    settling = [3.0, 2.6, 2.2, *losses[3:]]
    assert 10 ** -3.2 <= suggest(lrs, settling)[0] <= 10 ** -2.8
    assert suggest([1e-3, 1e-2], [1.0, 0.5]) == (1e-3, 1e-2)  # too few points: minimum / 10


def test_from_a_trained_head_the_suggestion_stays_a_decade_below_the_climb():
    """Phase 2's curve: flat with batch noise (a dip at the start, a drift of a third), then a
    climb at 1e-3. The steepest fall lands on the noise; the climb rule a tenth of 1e-3."""
    rng = np.random.default_rng(0)
    lrs = list(np.logspace(-7, -2, 120))
    logs = np.log10(lrs)
    flat = 0.3 + 0.1 * (logs + 7) / 4 + rng.normal(0, 0.01, len(lrs))  # 0.3 -> 0.4 by 1e-3
    flat[12:20] -= 0.08  # a lucky run of batches early on
    losses = list(flat + np.where(logs > -3, 30 * (logs + 3) ** 2, 0.0))
    assert suggest(lrs, losses)[0] < 1e-5  # the noise's "steepest fall"
    assert 0.5e-4 <= before_the_climb(lrs, losses) <= 1.2e-4
    # A curve that never climbs has no edge: a tenth of its minimum's rate.
    assert before_the_climb(lrs, list(flat)) == pytest.approx(lrs[int(np.argmin(flat[12:])) + 12] / 10)
    text = why({"rule": "climb", "suggestion": 1e-4, "steps": 120})
    assert text == "a tenth of 0.001, where the smoothed loss starts to climb"


def _batches(seed=0, n=64, dim=16):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 0.7, (3, dim))  # overlapping: a too-large step overshoots
    while True:
        y = rng.integers(0, 3, n)
        yield (centres[y] + rng.normal(0, 1, (n, dim))).astype("float32"), y.astype("int32")


def test_range_test_rises_from_a_plateau_to_divergence_and_restores_the_weights():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((16,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(keras.optimizers.Adam(1e-7), "sparse_categorical_crossentropy")
    before = [w.copy() for w in model.get_weights()]
    test = range_test(model, _batches(), steps=120, min_lr=1e-6, max_lr=100.0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert test.losses[int(np.argmin(test.losses))] < 0.5 * test.losses[0]  # it learned
    assert len(test.lrs) < 120  # and stopped once the loss diverged
    assert 1e-4 <= test.suggestion <= test.minimum <= 10.0, test.as_dict()


@pytest.mark.slow
def test_lr_find_and_fit_lr_auto(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=12, size=40)
    common = ["--image-size", "32", "--batch-size", "8", "--head-epochs", "3", "--unfreeze", "2"]
    out = tmp_path / "lr"
    assert main(["lr-find", str(data), "--out", str(out), "--phase", "fine-tune", *common]) == 0
    printed = capsys.readouterr().out
    assert "suggested --fine-tune-lr" in printed and "where the smoothed loss starts to climb" \
        in printed  # phase 2 starts from a trained head: the climb rule
    assert printed.count("suggest") == 1, printed  # the answer, once
    assert not (out / "lr_find_head.png").exists()  # phase 1 ran at the given --lr
    assert (out / "lr_find_fine_tune.png").stat().st_size > 0
    assert not (out / "model.keras").exists() and not (out / ".checkpoint").exists()

    run = tmp_path / "run"
    assert main(["fit", str(data), "--out", str(run), "--lr", "auto", "--fine-tune-epochs", "1",
                 *common]) == 0
    assert capsys.readouterr().out.count("lr auto (head): range test over") == 1
    metrics = json.loads((run / "metrics.json").read_text())
    rates = metrics["learning_rates"]
    assert rates["head"] == rates["range_tests"]["head"]["suggestion"]  # the rate fit used
    assert 0 < rates["head"] < 1 and rates["fine_tune"] == defaults.FINE_TUNE_LR  # as given
    assert (run / "lr_find_head.png").is_file()
    assert metrics["options"]["lr"] == "auto"


def test_fine_tune_lr_auto_needs_cached_activations(tmp_path, capsys):
    data = make_folder(tmp_path / "data", per_class=4, size=32)
    code = main(["fit", str(data), "--out", str(tmp_path / "run"), "--unfreeze", "all",
                 "--fine-tune-lr", "auto"])
    assert code == 2
    assert "--fine-tune-lr auto" in capsys.readouterr().err
    assert main(["fit", str(data), "--out", str(tmp_path / "run"), "--lr", "fast"]) == 2
    assert "--lr must be a number or 'auto'" in capsys.readouterr().err
