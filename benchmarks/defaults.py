"""The protocol that chose ``graft fit``'s defaults: every setting, 4 datasets, 3+ seeds.

    .venv/bin/python benchmarks/defaults.py --settings defaults,no-smoothing,... [--seeds 1,2,3]
    .venv/bin/python benchmarks/defaults.py --table   # the table of everything recorded so far
    .venv/bin/python benchmarks/defaults.py --probe   # the logistic-probe reference rows

Datasets: ``../shared/datasets/hymenoptera``, ``flowers5`` and ``pacs_art`` (their own
train/val folders; a pacs_art run is also scored on ``pacs_cartoon``, the same classes as
cartoons, never trained or chosen on), scikit-learn's digits (written out as a class folder;
the seed also draws its 20% validation split) and, for rules that depend on the data's size,
``union14`` (the three photo sets side by side, linked, never copied). Each run is
``graftkit.fit`` in this process with the defaults plus the setting's overrides, and one JSON
line per run is appended to ``--results`` (``benchmarks/defaults-runs.jsonl``): the graftkit
commit, validation accuracy of the final model, phase 1's best (head only), the mode chosen and
the seconds of the run. Frozen outputs are cached, so only the first run of a dataset at a
given cut pays for the frozen base: the table's seconds are the median over seeds, and the
first (cold) run's seconds are recorded in the JSON lines.
A measurement script, not a test: 2-8 minutes a run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared" / "datasets"
SCRATCH = Path(tempfile.gettempdir()) / "graftkit-bench"  # the digits folder and union links
DATASETS = ("hymenoptera", "flowers5", "digits", "pacs_art")
TARGETS = {"hymenoptera": 0.9608, "flowers5": 0.9542, "digits": 0.9805, "pacs_art": 0.955}
# A style-shift test set per dataset: the run is scored on it after training, never trained on
# or used to choose anything by itself (the paintings' classes drawn as cartoons).
STYLE_SHIFT = {"pacs_art": "pacs_cartoon"}

# Overrides of graftkit's defaults, by name. "defaults" is graftkit as shipped.
SETTINGS: dict[str, dict] = {
    "defaults": {},
    "head-epochs-20": {"head_epochs": 20},  # phase 1 before "auto" gave small sets 600 steps
    "head-only": {"mode": "head"},
    "head-only-256px": {"mode": "head", "image_size": 256},
    "head-only-288px": {"mode": "head", "image_size": 288},
    "head-only-320px": {"mode": "head", "image_size": 320},
    "head-only-heads-5-288px": {"mode": "head", "heads": 5, "image_size": 288},
    "288px": {"image_size": 288},
    "head-only-views-10": {"mode": "head", "views": 10},
    "head-only-heads-5": {"mode": "head", "heads": 5},
    "head-only-heads-5-256px": {"mode": "head", "heads": 5, "image_size": 256},
    "heads-5": {"heads": 5},
    "demo": {"fine_tune_epochs": 8, "augment": "rotation=0.05,zoom=0.1"},  # graft demo's
    "head-only-old": {"mode": "head", "label_smoothing": 0.0, "weight_decay": 0.0,
                      "schedule": "constant"},
    "head-only-constant": {"mode": "head", "schedule": "constant"},
    "head-only-no-smoothing": {"mode": "head", "label_smoothing": 0.0},
    "head-only-no-wd": {"mode": "head", "weight_decay": 0.0},
    "head-only-lr-3e-3": {"mode": "head", "lr": 3e-3},
    "head-only-cosine-3e-3": {"mode": "head", "lr": 3e-3, "schedule": "cosine"},
    "fine-tune-always": {"mode": "fine-tune"},
    # graftkit before this protocol: Adam, no smoothing, 1e-5, top 2 blocks, 224 px.
    "old-defaults": {"label_smoothing": 0.0, "weight_decay": 0.0, "schedule": "constant",
                     "fine_tune_lr": 1e-5, "unfreeze": 2, "image_size": 224,
                     "fine_tune_epochs": 5},
    "cosine": {"schedule": "cosine"},
    "224px": {"image_size": 224},
    "constant-lr": {"schedule": "constant"},
    "one-cycle": {"schedule": "one-cycle"},
    "no-smoothing": {"label_smoothing": 0.0},
    "smoothing-0.2": {"label_smoothing": 0.2},
    "no-weight-decay": {"weight_decay": 0.0},
    "weight-decay-0.05": {"weight_decay": 0.05},
    "ft-lr-1e-5": {"fine_tune_lr": 1e-5},
    "ft-lr-1e-4": {"fine_tune_lr": 1e-4},
    "ft-lr-3e-4": {"fine_tune_lr": 3e-4},
    "ft-lr-1e-3": {"fine_tune_lr": 1e-3},
    "lr-auto": {"lr": "auto", "fine_tune_lr": "auto"},
    "ft-lr-auto": {"fine_tune_lr": "auto"},  # phase 2's range test (its "climb" rule)
    "unfreeze-1": {"unfreeze": 1},
    "unfreeze-3": {"unfreeze": 3},
    "unfreeze-4": {"unfreeze": 4},
    "unfreeze-6": {"unfreeze": 6},  # Lite0: stages 6-7 and the final conv (cut at 18x18 for 288 px)
    "unfreeze-9": {"unfreeze": 9},  # Lite0: stages 5-7 and the final conv
    "unfreeze-all": {"unfreeze": "all"},
    "unfreeze-all-colour": {"unfreeze": "all", "augment": "basic,saturation,hue,grayscale"},
    "all-1e-4": {"unfreeze": "all", "fine_tune_lr": 1e-4},
    "all-1e-4-64px": {"unfreeze": "all", "fine_tune_lr": 1e-4, "image_size": 64,
                      "fine_tune_epochs": 8},
    "ft-epochs-5": {"fine_tune_epochs": 5},
    "ft-epochs-10": {"fine_tune_epochs": 10},
    "ft-epochs-15": {"fine_tune_epochs": 15},
    "head-epochs-10": {"head_epochs": 10},
    "head-epochs-40": {"head_epochs": 40},
    "views-1": {"views": 1},
    "views-3": {"views": 3},
    "views-10": {"views": 10},
    "dropout-0.5": {"dropout": 0.5},
    "dropout-0.7": {"dropout": 0.7},
    "dropout-0.2": {"dropout": 0.2},  # the head's rate everywhere (the Keras guide's)
    "dropout-0.5-style": {"dropout": 0.5, "augment": "style"},
    "gradual": {"unfreeze_schedule": "gradual"},
    "discriminative-0.5": {"lr_decay": 0.5},
    # Style robustness: colour changes a change of style brings (and random resized crops).
    # (--augment presets; runs before they existed spell them out, with the same strengths)
    "style": {"augment": "style"},
    "style-crop": {"augment": "style,crop"},
    "colour": {"augment": "basic,saturation,hue,grayscale"},  # style less brightness
    "grayscale": {"augment": "basic,grayscale"},
    "style-views-10": {"augment": "style", "views": 10},
    "style-views-1": {"augment": "style", "views": 1},
    # AugMix (mixed chains of autocontrast, equalize, posterize, solarize, rotate, shear,
    # translate): made for robustness to renditions.
    "augmix": {"augment": "basic,augmix"},
    "augmix-1": {"augment": "basic,augmix=1"},
    "style-augmix": {"augment": "style,augmix"},
    # Objects at more scales (a view scaled by up to 1 +- 0.3 instead of 0.1).
    "zoom-0.3": {"augment": "basic,zoom=0.3"},
    # Stronger offline backbones at their own size rule (1.3x pretraining: 320 / 352 px) and at 288.
    "lite1": {"base": "efficientnet_lite1"},
    "lite2": {"base": "efficientnet_lite2"},
    "lite1-288px": {"base": "efficientnet_lite1", "image_size": 288},
    "lite2-288px": {"base": "efficientnet_lite2", "image_size": 288},
    "lite2-style": {"base": "efficientnet_lite2", "augment": "style"},
    # the frozen part's engine in 8 bits (auto picks it only on CPUs with 8-bit dot products)
    "engine-int8": {"engine_precision": "int8"},
    # ... and float32 by name: on a CPU with 8-bit dot products "defaults" is int8
    "engine-f32": {"engine_precision": "f32"},
    # ... on each int8 runtime (``_engine``: $GRAFTKIT_ENGINE for the run)
    "engine-int8-openvino": {"engine_precision": "int8", "_engine": "openvino"},
    "engine-int8-tflite": {"engine_precision": "int8", "_engine": "tflite"},
}


# A larger set for rules that depend on the data's size: the three photo sets side by side as
# 14 classes (3,033 training / 849 validation images), linked from ../shared, never copied.
UNION = {"union14": ("hymenoptera", "flowers5", "pacs_art")}


def _union(name: str, scratch: Path, shared: Path) -> Path:
    folder = scratch / name
    if (folder / "val").is_dir():
        return folder
    tmp = scratch / f".{name}-{os.getpid()}"
    for part in UNION[name]:
        for split in ("train", "val"):
            for class_dir in sorted((shared / part / split).iterdir()):
                if not class_dir.is_dir():
                    continue
                target = tmp / split / f"{part}-{class_dir.name}"
                target.mkdir(parents=True, exist_ok=True)
                for f in sorted(class_dir.iterdir()):
                    if f.is_file():
                        (target / f.name).symlink_to(f.resolve())
    tmp.rename(folder)
    return folder


def dataset_path(name: str, scratch: Path, shared: Path = SHARED) -> Path:
    if name in UNION:
        return _union(name, scratch, shared)
    if name == "digits":
        from graftkit.demo import write_digits

        folder = scratch / "digits"
        if not (folder / "9").is_dir():
            write_digits(folder)
        return folder
    return shared / name


def source_commit() -> str:
    """The commit of the graftkit that runs (``+dirty`` when its sources differ from it)."""
    import subprocess

    import graftkit

    src = Path(graftkit.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "."],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def run_one(name: str, setting: str, seed: int, scratch: Path, shared: Path = SHARED,
            keep: Path | None = None) -> dict:
    from graftkit.train.workflow import fit

    data = dataset_path(name, scratch, shared)
    with tempfile.TemporaryDirectory() as tmp:
        out = (keep / f"{name}-{setting}-{seed}") if keep else Path(tmp) / "run"
        options = dict(SETTINGS[setting])
        engine = options.pop("_engine", None)
        if engine:
            os.environ["GRAFTKIT_ENGINE"] = engine
        start = time.perf_counter()
        try:
            result = fit(data, out, seed=seed, verbose=0, log=lambda _: None,
                         overwrite=keep is not None, **options)
        finally:
            if engine:
                os.environ.pop("GRAFTKIT_ENGINE", None)
        seconds = time.perf_counter() - start
        shift = ({"shift_accuracy": result.evaluate(shared / STYLE_SHIFT[name])["accuracy"]}
                 if name in STYLE_SHIFT else {})
    m = result.metrics
    return {"code": source_commit(), "dataset": name, "setting": setting,
            "overrides": SETTINGS[setting], "seed": seed,
            "val_accuracy": m["val_accuracy"], "phase1": m["phases"][0]["best_val_accuracy"],
            "mode": (m.get("mode") or {}).get("chosen"), "seconds": round(seconds, 1),
            "phases": [(p["name"], p["epochs"], p["seconds"]) for p in m["phases"]],
            "rates": {k: v for k, v in (m.get("learning_rates") or {}).items()
                      if k in ("head", "fine_tune")},
            "engine": " ".join(str((m.get("frozen_outputs") or {}).get(k, "")).replace("f32", "")
                               for k in ("engine", "precision")).strip(),
            "cpu": cpu_tag(), **shift}


def cpu_tag() -> str:
    """The CPU's vector and matrix extensions, beside each row's seconds (machines differ)."""
    from graftkit.frozen.precision import cpu_flags

    wide = sorted(f for f in cpu_flags() if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni",
                                                  "avx512_bf16", "amx_int8", "amx_bf16"))
    return " ".join(wide) or "unknown"


PROBE = "probe: logistic regression on Lite0 224 px pooled features"


def _pooled_features(base, paths: list[str], size: int = 224):
    """The base's pooled features of the plain images (no augmentation)."""
    import numpy as np

    from graftkit.data.images import load_image

    out = []
    for i in range(0, len(paths), 64):
        batch = np.stack([load_image(p, size) for p in paths[i:i + 64]]).astype("float32")
        out.append(base.predict(batch, verbose=0))
    return np.concatenate(out)


def probe_one(name: str, seed: int, scratch: Path, shared: Path = SHARED) -> dict:
    """The fixed reference row: an L2 logistic regression on standardised Lite0 features,
    its C chosen by 3-fold cross-validation on the training features alone."""
    import warnings

    import numpy as np
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from graftkit.backbones.registry import load_base
    from graftkit.data.folder import scan, scan_classes

    start = time.perf_counter()
    base, _ = load_base("efficientnet_lite0", 224)
    folder = scan(dataset_path(name, scratch, shared), seed=seed)
    train_x = _pooled_features(base, list(folder.train.paths))
    val_x = _pooled_features(base, list(folder.val.paths))
    probe = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=np.logspace(-4, 2, 13), cv=3, max_iter=5000, scoring="accuracy"))
    with warnings.catch_warnings():  # scikit-learn 1.8's notices of future defaults
        warnings.simplefilter("ignore", FutureWarning)
        probe.fit(train_x, np.asarray(folder.train.labels))
    row = {"code": "reference", "dataset": name, "setting": PROBE, "seed": seed,
           "val_accuracy": float(probe.score(val_x, np.asarray(folder.val.labels))),
           "C": float(probe[-1].C_[0])}
    if name in STYLE_SHIFT:
        by_class = scan_classes(shared / STYLE_SHIFT[name], [], {})
        paths = [p for ps in by_class.values() for p in ps]
        labels = [folder.classes.index(c) for c, ps in by_class.items() for _ in ps]
        row["shift_accuracy"] = float(probe.score(_pooled_features(base, paths), np.asarray(labels)))
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f} (n=1)"
    return f"{statistics.mean(values):.4f} ({min(values):.4f}-{max(values):.4f}, n={len(values)})"


# Commits that changed nothing graftkit computes (comments, messages, benchmark settings, this script):
# their runs are grouped with the commit named here (`git diff A B -- src` shows no other change).
SAME_AS = {"c6dab59": "464514c", "1f5e391": "464514c", "b82cbde": "464514c", "1b14f06": "464514c"}


def table(rows: list[dict], datasets=DATASETS) -> str:
    """One line per (code, setting): mean (spread, n) and median seconds on each dataset."""
    rows = [{**r, "code": SAME_AS.get(r.get("code", "?"), r.get("code", "?"))} for r in rows]
    groups = list(dict.fromkeys((r["code"], r["setting"]) for r in rows))
    shifts = [STYLE_SHIFT[d] for d in datasets if d in STYLE_SHIFT]
    head = ("| code | setting | " + " | ".join(f"{d} | s" for d in datasets)
            + "".join(f" | {s}" for s in shifts) + " | phase 1 (head) means |")
    lines = [head, "|" + "---|" * (3 + 2 * len(datasets) + len(shifts))]
    for code, setting in groups:
        cells, p1, shift_cells = [], [], []
        for d in datasets:
            runs = [r for r in rows if (r["code"], r["setting"]) == (code, setting)
                    and r["dataset"] == d]
            if not runs:
                cells += ["", ""]
                p1.append("-")
                shift_cells += [""] if d in STYLE_SHIFT else []
                continue
            cells += [_cell([r["val_accuracy"] for r in runs]),
                      f"{statistics.median(r['seconds'] for r in runs):.0f}"]
            p1.append(f"{statistics.mean(r['phase1'] for r in runs):.4f}"
                      if all("phase1" in r for r in runs) else "-")
            if d in STYLE_SHIFT:
                shift = [r["shift_accuracy"] for r in runs if "shift_accuracy" in r]
                shift_cells.append(_cell(shift) if shift else "")
        lines.append(f"| {code} | {setting} | " + " | ".join(cells)
                     + "".join(f" | {c}" for c in shift_cells) + " | " + " / ".join(p1) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="defaults")
    p.add_argument("--datasets", default=",".join(DATASETS))
    p.add_argument("--seeds", default="1,2,3")
    p.add_argument("--results", type=Path, default=HERE / "defaults-runs.jsonl")
    p.add_argument("--scratch", type=Path, default=SCRATCH)
    p.add_argument("--shared", type=Path, default=SHARED,
                   help="the folder holding the datasets (hymenoptera/, flowers5/, pacs_art/, ...)")
    p.add_argument("--table", action="store_true", help="print the table and stop")
    p.add_argument("--probe", action="store_true",
                   help="record the logistic-probe reference rows instead of graft fit runs")
    p.add_argument("--keep", type=Path, default=None,
                   help="keep each run folder as KEEP/<dataset>-<setting>-<seed> (else deleted)")
    args = p.parse_args()
    if not args.table:
        args.scratch.mkdir(parents=True, exist_ok=True)
        for setting in [PROBE] if args.probe else args.settings.split(","):
            if setting not in SETTINGS and not args.probe:
                raise SystemExit(f"unknown setting {setting!r}: one of {', '.join(SETTINGS)}")
            for name in args.datasets.split(","):
                for seed in (int(s) for s in args.seeds.split(",")):
                    row = (probe_one(name, seed, args.scratch, args.shared) if args.probe
                           else run_one(name, setting, seed, args.scratch, args.shared, args.keep))
                    print(json.dumps(row), flush=True)
                    with args.results.open("a", encoding="utf-8") as f:
                        f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in args.results.read_text().splitlines() if line.strip()]
    print(table(rows))


if __name__ == "__main__":
    main()
