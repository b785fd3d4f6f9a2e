"""A refit against the run it refits: both models scored on the same validation images.

Comparing two runs' validation accuracies misleads: one seed to another moves a run by half a
point, and a refit may have relabelled or added validation images. So the images both runs
validated on are paired by content, each scored against its label *as it is now* (a relabelled
image counts by its new label for both), from the previous run's ``predictions.csv`` (no model
is loaded). McNemar's exact test on the images only one of the two gets right says whether the
two models differ by more than the choice of images explains.
"""

from __future__ import annotations

import math
from pathlib import Path

from graftkit.outputs.record import JSON


def mcnemar_p(only_now: int, only_before: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant pairs at 1/2."""
    n = only_now + only_before
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_now, only_before) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def against_previous(previous: Path, digests: list[str], labels: list[str],
                     predicted: list[str]) -> JSON:
    """``metrics.json``'s ``previous_run``: this run's validation images (content digests,
    labels now, this model's top class) against what ``previous`` predicted for the same
    contents. ``reason`` instead of scores when nothing can be paired."""
    from graftkit.errors import RunError
    from graftkit.outputs.run import read_predictions, read_split

    out: JSON = {"run": str(previous)}
    try:
        split = read_split(previous)
        digest_of = dict(zip((path for path, _label in split.get("val", [])),
                             split.get("val_sha256") or []))
        before = {digest_of[r["path"]]: r["predicted"] for r in read_predictions(previous)
                  if r.get("path") in digest_of and r.get("predicted")}
    except (RunError, OSError, ValueError, TypeError, AttributeError) as exc:
        # a missing or hand-edited file: the new run is trained already and must be written
        return {**out, "reason": f"its validation predictions cannot be read ({exc})"}
    pairs = [(label, now, before[d]) for d, label, now in zip(digests, labels, predicted)
             if d in before]
    if not pairs:
        return {**out, "reason": "no validation image of this run was a validation image of it"}
    n = len(pairs)
    only_now = sum(now == y != old for y, now, old in pairs)
    only_before = sum(old == y != now for y, now, old in pairs)
    right_now = sum(now == y for y, now, _ in pairs)
    right_before = sum(old == y for y, _, old in pairs)
    return {**out, "images": n, "val_accuracy": round(right_now / n, 6),
            "previous_val_accuracy": round(right_before / n, 6), "right_only_now": only_now,
            "right_only_before": only_before,
            "p_value": round(mcnemar_p(only_now, only_before), 6)}


def line(result: JSON) -> str:
    """The summary's and the log's line."""
    if "reason" in result:
        return f"not compared with {result['run']}: {result['reason']}"
    p = result["p_value"]
    verdict = "a clear difference" if p < 0.05 else "no clear difference"
    return (f"{result['val_accuracy']:.4f} here, {result['previous_val_accuracy']:.4f} for "
            f"{result['run']}, on the same {result['images']} validation images with their labels "
            f"as they are now: {result['right_only_now']} right only here, "
            f"{result['right_only_before']} only there (McNemar p = {p:.2g}: {verdict})")
