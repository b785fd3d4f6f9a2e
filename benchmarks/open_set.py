"""Which open-set score tells known images from unknown ones, and what calibration does.

    .venv/bin/python benchmarks/open_set.py [--runs DIR] [--pairs all] [--seed 1]
    .venv/bin/python benchmarks/open_set.py --table      # the table of the recorded lines

Trains (or reuses, from ``--runs``) one default ``graftkit.fit`` run per known dataset, then
for each pair (known dataset, unknown images) scores the run's validation images (known) and
the unknown set's validation images with every candidate of ``graftkit.outputs.open_set``,
fitted on the run's training images: AUROC, the share of unknown images accepted at the
threshold that keeps 95% of the known ones (FPR@95), and the share of known images rejected
when the threshold is chosen on one half of the validation images and applied to the other
(both ways, averaged). The calibration rows (ECE, NLL on held-out halves) come from the same
validation logits, raw (any temperature the run folded in is taken out first). One JSON line
per pair and score is appended to ``benchmarks/open-set-runs.jsonl``.
A measurement script, not a test: about 15 minutes with warm caches.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
RESULTS = HERE / "open-set-runs.jsonl"
# known dataset -> unknown image sets (their validation images); "near" pairs are hard by design.
PAIRS = {
    "hymenoptera": [("pacs_art", "far"), ("flowers5", "near")],
    "flowers5": [("pacs_art", "far")],
    "pacs_art": [("hymenoptera", "far")],
    "digits": [("photos", "far")],  # photos: hymenoptera's and flowers5's validation images
    "flowers3": [("flowers5-other2", "near")],  # 3 flower classes known, the other 2 not
}
FLOWERS3 = ("daisy", "dandelion", "roses")
CANDIDATES = [("msp", None), ("energy", None), ("mahalanobis", None),
              ("knn", 1), ("knn", 5), ("knn", 20)]


def dataset(name: str, scratch: Path) -> Path:
    from graftkit.demo import write_digits

    if name == "digits":
        folder = scratch / "digits"
        if not (folder / "9").is_dir():
            write_digits(folder)
        return folder
    if name == "flowers3":  # links to three of flowers5's class folders
        folder = scratch / "flowers3"
        for split in ("train", "val"):
            for c in FLOWERS3:
                link = folder / split / c
                if not link.exists():
                    link.parent.mkdir(parents=True, exist_ok=True)
                    link.symlink_to(SHARED / "flowers5" / split / c)
        return folder
    return SHARED / name


def unknown_paths(name: str) -> list[str]:
    from graftkit.data.folder import scan_classes

    def val(ds: str, skip=()) -> list[str]:
        by_class = scan_classes(SHARED / ds / "val", [], {})
        return sorted(p for c, ps in by_class.items() if c not in skip for p in ps)

    if name == "photos":
        return val("hymenoptera") + val("flowers5")
    if name == "flowers5-other2":
        return val("flowers5", skip=FLOWERS3)
    return val(name)


def run_for(name: str, runs: Path, seed: int):
    import graftkit

    out = runs / f"{name}-seed{seed}"
    if (out / "metrics.json").is_file():
        return graftkit.load(out), None
    start = time.perf_counter()
    clf = graftkit.fit(dataset(name, runs), out, seed=seed, verbose=0, log=lambda _: None)
    return clf, round(time.perf_counter() - start, 1)


def features(clf, paths: list[str]):
    """Penultimate features, raw logits and probabilities of image files."""
    from graftkit.graft import head_logits, with_features
    from graftkit.outputs.calibration import softmax
    from graftkit.outputs.evaluation import model_outputs

    two = with_features(clf.model)
    f, _ = model_outputs(two, paths, fast=clf._fast_path(two))
    t = (clf.metrics.get("calibration") or {}).get("temperature", 1.0)
    logits = head_logits(clf.model, f) * t  # the raw logits, any folded T taken out
    return f, logits, softmax(logits)


def measure(name: str, runs: Path, seed: int) -> list[dict]:
    from graftkit.outputs import calibration as cal
    from graftkit.outputs import open_set as osr

    clf, seconds = run_for(name, runs, seed)
    split = json.loads((clf.run_dir / "split.json").read_text())
    train_paths = [p for p, _ in split["train"]]
    train_labels = np.array([clf.classes.index(c) for _, c in split["train"]])
    val_paths = [p for p, _ in split["val"]]
    val_labels = np.array([clf.classes.index(c) for _, c in split["val"]])
    tf_, _, _ = features(clf, train_paths)
    vf, vlogits, vprobs = features(clf, val_paths)
    c = cal.calibrate(vlogits, val_labels, "auto")
    rows = [{"kind": "calibration", "dataset": name, "seed": seed,
             "val_accuracy": clf.metrics["val_accuracy"], "fit_seconds": seconds,
             **{k: c[k] for k in ("fitted_temperature", "ece_before", "ece_after",
                                   "nll_before", "nll_after", "applied")}}]
    for unknown, kind in PAIRS[name]:
        upaths = unknown_paths(unknown)
        uf, ulogits, uprobs = features(clf, upaths)
        for method, k in CANDIDATES:
            start = time.perf_counter()
            scorer = osr.fit_open_set(method, tf_, train_labels, len(clf.classes),
                                      k=k or osr.DEFAULT_K)
            vs = scorer.scores(vf, vprobs, vlogits)
            us = scorer.scores(uf, uprobs, ulogits)
            held = osr.held_out_rejection(vs, val_labels)
            rows.append({"kind": "open_set", "dataset": name, "unknown": unknown, "pair": kind,
                         "seed": seed, "method": method, "k": k,
                         "auroc": osr.auroc(vs, us), "fpr95": osr.fpr_at_95(vs, us),
                         "known_rejected_held_out": float(held),
                         "known": len(vs), "unknowns": len(us),
                         "seconds": round(time.perf_counter() - start, 3)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| known vs unknown | " + " | ".join(
        f"{m}{'' if k is None else f' k={k}'}" for m, k in CANDIDATES) + " |",
        "|---|" + "---|" * len(CANDIDATES)]
    pairs = sorted({(r["dataset"], r["unknown"], r["pair"]) for r in rows
                    if r["kind"] == "open_set"}, key=lambda p: (p[2], p[0]))
    for ds, un, kind in pairs:
        cells = []
        for m, k in CANDIDATES:
            hit = [r for r in rows if r["kind"] == "open_set" and r["dataset"] == ds
                   and r["unknown"] == un and r["method"] == m and r["k"] == k]
            cells.append("" if not hit else (f"{hit[-1]['auroc']:.3f} / {hit[-1]['fpr95']:.2f}"
                                             f" / {hit[-1]['known_rejected_held_out']:.3f}"))
        lines.append(f"| {ds} vs {un} ({kind}) | " + " | ".join(cells) + " |")
    lines += ["", "| dataset | val accuracy | T | ECE before | ECE after | NLL before | NLL after "
              "| applied (auto) |", "|---|---|---|---|---|---|---|---|"]
    latest = {r["dataset"]: r for r in rows if r["kind"] == "calibration"}  # as hit[-1] above
    for r in latest.values():
        lines.append(f"| {r['dataset']} | {r['val_accuracy']:.4f} | "
                     f"{r['fitted_temperature']:.3f} | {r['ece_before']:.4f} | "
                     f"{r['ece_after']:.4f} | {r['nll_before']:.4f} | {r['nll_after']:.4f} | "
                     f"{'yes' if r['applied'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", default="/tmp/graftkit-open-set-runs",
                    help="where the default runs are trained, or reused from")
    ap.add_argument("--datasets", default=",".join(PAIRS))
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--table", action="store_true", help="print the recorded table and stop")
    args = ap.parse_args()
    results = Path(args.results)
    if args.table:
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        print(table(rows))
        return
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in args.datasets.split(","):
        got = measure(name, runs, args.seed)
        with results.open("a") as f:
            for r in got:
                f.write(json.dumps(r) + "\n")
        rows += got
        print(table(rows), flush=True)


if __name__ == "__main__":
    main()
