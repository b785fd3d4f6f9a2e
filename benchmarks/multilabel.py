"""Several labels per image, measured: graftkit's multi-label fit against the usual baseline.

    .venv/bin/python benchmarks/multilabel.py probe                 # the logistic baseline
    .venv/bin/python benchmarks/multilabel.py fit [--settings defaults,lr-3e-4] [--seeds 0,1,2]
    .venv/bin/python benchmarks/multilabel.py fit --cold ...        # an empty cache: a first run
    .venv/bin/python benchmarks/multilabel.py table

Data: ``../shared/datasets/ucm_multilabel`` (2,100 aerial photos, 17 labels, 3.3 per image;
``train.csv`` / ``val.csv``, every 5th image in val). **probe**: a one-vs-rest logistic
regression (scikit-learn's defaults: C=1, features as they are) on EfficientNet-Lite0's pooled features
at 224 px of the plain images, the usual baseline; scored like a graftkit run: macro mAP,
example-based, micro and macro F1 at 0.5 and with per-label thresholds cross-fitted over the
validation halves (``graftkit.outputs.multilabel``). **fit**: ``graftkit.fit`` with the
defaults plus a setting's overrides, one seed each (the seed of the initialisation and every
random stream; the split is the tables'); ``--cold`` gives it an empty ``GRAFTKIT_CACHE_DIR``
(weights converted, frozen base run: what a first run costs). Each result is a JSON line in
``benchmarks/multilabel-runs.jsonl`` with the commit and the CPU flags; ``table`` prints the
table of docs/multilabel.md. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from defaults import SHARED  # noqa: E402
from rows import append, log, mean_sd  # noqa: E402

DATA = SHARED / "ucm_multilabel"
RESULTS = HERE / "multilabel-runs.jsonl"
SCRATCH = Path(tempfile.gettempdir()) / "graftkit-bench" / "multilabel"
SETTINGS: dict[str, dict] = {
    "defaults": {},
    "views-5-lr-3e-4-ft-10": {"views": 5, "fine_tune_lr": 3e-4, "fine_tune_epochs": 10},
    "lr-1e-4": {"fine_tune_lr": 1e-4},
    "ft-lr-auto": {"fine_tune_lr": "auto"},  # phase 2's range test (its "climb" rule)
    "lr-3e-4": {"fine_tune_lr": 3e-4},
    "224px": {"image_size": 224},
    "224px-lr-3e-4": {"image_size": 224, "fine_tune_lr": 3e-4},
    "224px-lr-3e-4-views-3": {"image_size": 224, "fine_tune_lr": 3e-4, "views": 3},
    "views-3": {"views": 3},
    "views-3-ft-8": {"views": 3, "fine_tune_epochs": 8},
    "ft-7": {"fine_tune_epochs": 7},
    "lr-5e-4-ft-6": {"fine_tune_lr": 5e-4, "fine_tune_epochs": 6},
    "lr-5e-4-ft-7": {"fine_tune_lr": 5e-4, "fine_tune_epochs": 7},
    "views-3-lr-5e-4-ft-6": {"views": 3, "fine_tune_lr": 5e-4, "fine_tune_epochs": 6},
    "views-3-lr-5e-4-ft-7": {"views": 3, "fine_tune_lr": 5e-4, "fine_tune_epochs": 7},
    "engine-int8": {"engine_precision": "int8"},  # on OpenVINO where NNCF is installed
    # not an option of graft fit: the loss patched here, each label's positives weighted by
    # sqrt(negatives / positives) (clipped to 1-10), the usual remedy for rare labels
    "pos-weight-sqrt": {"_pos_weight_power": 0.5},
}


def _patched_loss(power: float):
    """Binary cross-entropy with positive weights per label, in place of graftkit's (the
    benchmark's own experiment: graftkit has no such option)."""
    from keras import ops

    from graftkit.data.folder import scan
    from graftkit.outputs.multilabel import multi_hot
    from graftkit.train import phases

    folder = scan(DATA)
    y = multi_hot(folder.train.labels, len(folder.classes))
    pos = y.sum(axis=0)
    w = np.clip(((len(y) - pos) / pos) ** power, 1.0, 10.0).astype("float32")

    def weighted(y_true, y_pred):
        p = ops.clip(y_pred, 1e-7, 1 - 1e-7)
        return -ops.mean(w * y_true * ops.log(p) + (1 - y_true) * ops.log(1 - p), axis=-1)

    original = phases._loss
    phases._loss = lambda plan: weighted if plan.task.multi_label else original(plan)
    return original




def _scores(labels, probs, classes, thresholds, cross_fit) -> dict:
    from graftkit.outputs.multilabel import scores

    s = scores(labels, probs, classes, thresholds, "auto", cross_fit=cross_fit)
    return {k: s[k] for k in ("map", "example_f1", "micro_f1", "macro_f1", "subset_accuracy")}


def probe() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from graftkit.data.folder import scan
    from graftkit.outputs.multilabel import fit_thresholds, multi_hot
    from graftkit.train.cross_fit import pooled_features

    folder = scan(DATA)
    start = time.perf_counter()
    features = pooled_features(folder, image_size=224, log=lambda _m: None)
    n = len(folder.train)
    y = multi_hot(folder.train.labels, len(folder.classes))
    model = OneVsRestClassifier(LogisticRegression(max_iter=5000)).fit(features[:n], y)
    probs = model.predict_proba(features[n:])
    truth = multi_hot(folder.val.labels, len(folder.classes))
    at_half = _scores(folder.val.labels, probs, folder.classes, np.full(len(folder.classes), 0.5),
                      False)
    tuned = _scores(folder.val.labels, probs, folder.classes, fit_thresholds(truth, probs), True)
    record({"task": "probe", "method": "logistic-224", "at_0.5": at_half, "thresholds": tuned,
            "seconds": round(time.perf_counter() - start, 1)})
    log(f"probe: mAP {tuned['map']:.4f}, example F1 {at_half['example_f1']:.4f} at 0.5, "
        f"{tuned['example_f1']:.4f} with per-label thresholds")


def fit(settings: list[str], seeds: list[int], cold: bool) -> None:
    import graftkit

    for name in settings:
        for seed in seeds:
            out = SCRATCH / f"{name}-s{seed}"
            shutil.rmtree(out, ignore_errors=True)
            cache = SCRATCH / "cold-cache"
            if cold:
                shutil.rmtree(cache, ignore_errors=True)
                os.environ["GRAFTKIT_CACHE_DIR"] = str(cache)
            options = dict(SETTINGS[name])
            power = options.pop("_pos_weight_power", None)
            original = _patched_loss(power) if power is not None else None
            start = time.perf_counter()
            try:
                clf = graftkit.fit(DATA, out, seed=seed, verbose=0, log=lambda _m: None,
                                   **options)
            finally:
                if original is not None:
                    from graftkit.train import phases

                    phases._loss = original
            seconds = time.perf_counter() - start
            m = clf.metrics
            s = m["multi_label"]
            record({"task": "fit", "setting": name, "overrides": SETTINGS[name], "seed": seed,
                    "cold": cold, "seconds": round(seconds, 1),
                    "frozen_seconds": (m.get("frozen_outputs") or {}).get("seconds"),
                    "image_size": m["image_size"], "mode": m["mode"]["chosen"],
                    "fine_tune_lr": (m.get("learning_rates") or {}).get("fine_tune"),
                    "engine": " ".join(str((m.get("frozen_outputs") or {}).get(k, ""))
                                       for k in ("engine", "precision")),
                    "calibrated": _calibrated(m.get("calibration") or {}),
                    **{k: s[k] for k in ("map", "example_f1", "micro_f1", "macro_f1",
                                         "subset_accuracy")}})
            log(f"{name} s{seed}{' cold' if cold else ''}: mAP {s['map']:.4f}, example F1 "
                f"{s['example_f1']:.4f} ({seconds:.0f} s)")


def _calibrated(c: dict) -> dict:
    """How many labels kept a temperature, and the mean held-out log-loss and ECE over the
    labels measured, before and after."""
    rows = [r for r in c.get("per_label", []) if "nll_after" in r]
    if not rows:
        return {"labels": 0}

    def mean(key, after=False):
        return float(np.mean([r[key if not after or r["applied"] else key.replace("after",
                                                                                 "before")]
                              for r in rows]))
    return {"labels": sum(r["applied"] for r in c["per_label"]), "measured": len(rows),
            "nll_before": mean("nll_before"), "nll_after": mean("nll_after", True),
            "ece_before": mean("ece_before"), "ece_after": mean("ece_after", True)}



def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text(encoding="utf-8").splitlines()
            if line.strip()] if RESULTS.is_file() else []
    out = ["| run | seeds | mAP | example F1 | micro F1 | macro F1 | seconds (warm / cold) |",
           "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if r["task"] == "probe"):
        t, h = r["thresholds"], r["at_0.5"]
        out.append(f"| one-vs-rest logistic, Lite0 224 px features | - | {t['map']:.4f} | "
                   f"{h['example_f1']:.4f} at 0.5, {t['example_f1']:.4f} tuned | "
                   f"{h['micro_f1']:.4f} at 0.5 | {h['macro_f1']:.4f} at 0.5 | - |")
    fits = [r for r in rows if r["task"] == "fit"]
    for name in dict.fromkeys(_setting(r) for r in fits):
        mine = [r for r in fits if _setting(r) == name]
        warm = [r["seconds"] for r in mine if not r["cold"]]
        cold = [r["seconds"] for r in mine if r["cold"]]
        seconds = (f"{statistics.median(warm):.0f}" if warm else "-") + " / " + \
            (f"{statistics.median(cold):.0f}" if cold else "-")
        out.append(f"| graftkit {name} | {len({r['seed'] for r in mine})} | "
                   f"{_mean([r['map'] for r in mine])} | {_mean([r['example_f1'] for r in mine])} "
                   f"| {_mean([r['micro_f1'] for r in mine])} | "
                   f"{_mean([r['macro_f1'] for r in mine])} | {seconds} |")
    return "\n".join(out)


def _setting(row: dict) -> str:
    """A row's setting, and the defaults it ran under where they were not today's (rows of
    earlier commits carry ``defaults_then``: "defaults" then meant other values)."""
    then = row.get("defaults_then")
    if not then:
        return row["setting"]
    return (f"{row['setting']} (on views {then['views']}, fine-tune lr {then['fine_tune_lr']:g}"
            f", {then['fine_tune_epochs']} epochs)")


def record(row: dict) -> None:
    append(RESULTS, row)


def _mean(values, digits: int = 4) -> str:
    return mean_sd(values, digits)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("probe", "fit", "table"))
    parser.add_argument("--settings", default="defaults")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--cold", action="store_true")
    args = parser.parse_args()
    if args.task == "probe":
        probe()
    elif args.task == "fit":
        unknown = [s for s in args.settings.split(",") if s not in SETTINGS]
        if unknown:
            parser.error(f"unknown setting(s): {', '.join(unknown)}; one of {', '.join(SETTINGS)}")
        fit(args.settings.split(","), [int(s) for s in args.seeds.split(",")], args.cold)
    else:
        print(table())


if __name__ == "__main__":
    main()
