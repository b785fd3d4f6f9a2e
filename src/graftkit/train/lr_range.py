"""The learning-rate range test (Smith, 2017; fastai's ``lr_find``) for a phase of ``graft fit``.

Method: train a copy of the phase's model for ``steps`` batches while the learning rate grows
exponentially from ``min_lr`` to ``max_lr``, one rate per batch, recording each batch's loss.
The loss is smoothed (exponential moving average, bias-corrected) and the test stops once it
passes ``diverge`` times its minimum. Weights are restored afterwards, so the test changes
nothing; on cached features and activations it takes seconds.

Two ways to read the curve, one per phase:

- ``steepest`` (phase 1, a new head from random weights): the rate where the smoothed loss falls
  fastest against log(rate) (over spans of a twentieth of the test, the first tenth skipped
  while the average settles), searched below the minimum's rate: well below where training
  diverges, high enough to learn quickly.
- ``climb`` (phase 2, from phase 1's trained head): the loss has little left to fall, so the
  curve is flat until it climbs, and its steepest fall is batch noise (it moved by four decades
  from seed to seed). The suggestion is a tenth of the last rate at which the smoothed loss is
  still within ``CLIMB_BAND`` times its median (fastai's advice for a model already trained: well
  before the loss gets worse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

STEPS = 200
MIN_LR = 1e-7
MAX_LR = 1.0
SMOOTHING = 0.95  # EMA factor of the loss
DIVERGE = 4.0  # stop once the smoothed loss passes this multiple of its minimum
CLIMB_BAND = 1.5  # "climbing": above this multiple of the curve's median
RULES = {"steepest": "steepest descent of the smoothed loss below its minimum",
         "climb": f"a tenth of the rate where the smoothed loss leaves {CLIMB_BAND:g}x its median "
                  "for good"}


@dataclass
class RangeTest:
    """What the range test saw: per step, the rate and the smoothed loss; and its choice."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # smoothed
    suggestion: float = float("nan")
    minimum: float = float("nan")  # the rate at the smoothed loss's minimum
    rule: str = "steepest"

    def as_dict(self) -> dict:
        return {"suggestion": self.suggestion, "minimum": self.minimum, "steps": len(self.lrs),
                "rule": self.rule, "method": RULES[self.rule]}

    def plot(self, path: Path, title: str = "") -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from graftkit.files import atomic_write

        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(self.lrs, self.losses)
        ax.set_xscale("log")
        ax.axvline(self.suggestion, color="tab:red", linestyle="--",
                   label=f"suggested {self.suggestion:.2g}")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss (smoothed)")
        ax.set_title(title or "learning-rate range test")
        ax.legend()
        fig.tight_layout()
        atomic_write(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


def why(test: dict) -> str:
    """How a test's suggestion (``RangeTest.as_dict``) was read off its curve, for a log line."""
    if test.get("rule") == "climb":
        return f"a tenth of {test['suggestion'] * 10:.3g}, where the smoothed loss starts to climb"
    return f"steepest fall of the smoothed loss; loss lowest at {test['minimum']:.3g}"


def suggest(lrs: list[float], losses: list[float]) -> tuple[float, float]:
    """``(steepest, minimum)``: the rate of the steepest fall before the minimum, and the minimum's.

    The slope is taken over spans of ``k`` points (a twentieth of the test), and the first tenth
    is skipped: there the moving average is still settling and its noise looks steep. With too
    few points to tell, a tenth of the minimum's rate.
    """
    n = len(losses)
    skip, k = max(3, n // 10), max(1, n // 20)
    i_min = skip + int(np.argmin(losses[skip:])) if n > skip else int(np.argmin(losses))
    minimum = float(lrs[i_min])
    if i_min - k <= skip:
        return minimum / 10, minimum
    logs, loss = np.log10(np.asarray(lrs)), np.asarray(losses)
    starts = np.arange(skip, i_min - k + 1)
    slopes = (loss[starts + k] - loss[starts]) / (logs[starts + k] - logs[starts])
    best = int(starts[int(np.argmin(slopes))]) + k // 2
    return float(lrs[best]), minimum


def before_the_climb(lrs: list[float], losses: list[float]) -> float:
    """A tenth of the last rate at which the smoothed loss is within ``CLIMB_BAND`` times its
    median (the first tenth of the test skipped, as in ``suggest``). A curve that never leaves
    the band gives a tenth of its minimum's rate, as ``suggest`` does with too few points."""
    skip = max(3, len(losses) // 10)
    skip = skip if len(losses) > skip else 0
    loss = np.asarray(losses[skip:])
    median = float(np.median(loss))
    if loss[-1] <= CLIMB_BAND * median:  # it never climbed: no edge to stay below
        return float(lrs[skip + int(np.argmin(loss))]) / 10
    under = np.flatnonzero(loss <= CLIMB_BAND * median)
    return float(lrs[skip + int(under.max())]) / 10


def range_test(model, batches, steps: int = STEPS, min_lr: float = MIN_LR,
               max_lr: float = MAX_LR, diverge: float = DIVERGE,
               rule: str = "steepest") -> RangeTest:
    """Run the test on a compiled ``model`` over ``batches`` (an iterable of ``(x, y[, w])``);
    ``rule`` reads the suggestion off the curve (``RULES``).

    ``model``'s optimizer must have a settable learning rate; its weights are restored after.
    """
    saved = model.get_weights()
    result = RangeTest(rule=rule)
    factor = (max_lr / min_lr) ** (1 / max(steps - 1, 1))
    avg, best = 0.0, math.inf
    try:
        for step, batch in enumerate(batches):
            if step >= steps:
                break
            lr = min_lr * factor ** step
            model.optimizer.learning_rate = lr
            logs = model.train_on_batch(*batch, return_dict=True)
            loss = float(logs["loss"])
            if not math.isfinite(loss):
                break
            avg = SMOOTHING * avg + (1 - SMOOTHING) * loss
            smooth = avg / (1 - SMOOTHING ** (step + 1))
            result.lrs.append(lr)
            result.losses.append(smooth)
            best = min(best, smooth)
            if step > 10 and smooth > diverge * best:
                break
    finally:
        model.set_weights(saved)
    if not result.lrs:
        raise ValueError("the range test got no finite loss")
    result.suggestion, result.minimum = suggest(result.lrs, result.losses)
    if rule == "climb":
        result.suggestion = before_the_climb(result.lrs, result.losses)
    return result
