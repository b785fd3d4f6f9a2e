"""Where the model looks, measured: the pointing game on a localisation set made from real photos,
the closest training images, and what ``--explain`` costs.

    .venv/bin/python benchmarks/explain.py make                       # the localisation set
    .venv/bin/python benchmarks/explain.py fit [--settings defaults,unfreeze-all]
    .venv/bin/python benchmarks/explain.py point [--settings ...]     # pointing game + floors
    .venv/bin/python benchmarks/explain.py cost [--settings defaults] # --explain vs plain predict
    .venv/bin/python benchmarks/explain.py closest RUN [RUN...]       # any run's validation images
    .venv/bin/python benchmarks/explain.py table

**make**: each flowers5 photo (centre square, ``OBJECT`` px) pasted at a seeded random place on
a seeded random ucm_multilabel aerial photo (``SIZE`` px): the image's class is the flower's,
and the box is known. ``PER_CLASS_TRAIN`` training and ``PER_CLASS_VAL`` validation photos per
class (flowers5's own train/val). **fit**: ``graftkit.fit`` with the defaults and a setting's
overrides. **point**: for every validation image, the heatmap of its true class
(``Classifier.explain(label=...)``): a hit when its peak is inside the pasted box; beside it the
floors: the image centre, and a uniformly random point (mean of 100 seeded draws). Also the
share of validation images whose closest training image has the same class (it should track
accuracy), and for images the open-set score calls unknown (aerial photos with no flower,
``--unknown``), the classes and similarities of their closest training images. **cost**: plain
``predict`` and ``explain`` over the same validation images, alternating, 3 rounds each, warm
engines: images per second. **closest**: for finished runs of real data sets (e.g.
hymenoptera, flowers5), the share of validation images whose closest training image has their
label, beside the run's accuracy. Results are JSON lines in ``benchmarks/explain-runs.jsonl`` with the
commit and CPU flags; ``table`` prints docs/explain.md's table. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
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

RESULTS = HERE / "explain-runs.jsonl"
SCRATCH = Path(tempfile.gettempdir()) / "graftkit-bench" / "explain"
SET = SCRATCH / "localisation"
SIZE, OBJECT = 288, 96
PER_CLASS_TRAIN, PER_CLASS_VAL = 120, 40
SETTINGS: dict[str, dict] = {
    "defaults": {},
    "unfreeze-all": {"unfreeze": "all"},
}


def _square(img, size: int):
    from PIL import Image

    side = min(img.size)
    left, top = (img.width - side) // 2, (img.height - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size),
                                                                 Image.Resampling.BILINEAR)


def make() -> None:
    """The localisation set: ``SET/{train,val}/<class>/*.jpg`` and ``SET/boxes.json``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    backgrounds = sorted((SHARED / "ucm_multilabel").rglob("*.jpg")) + \
        sorted((SHARED / "ucm_multilabel").rglob("*.tif"))
    boxes = {}
    for split, per_class in (("train", PER_CLASS_TRAIN), ("val", PER_CLASS_VAL)):
        for class_dir in sorted((SHARED / "flowers5" / split).iterdir()):
            out = SET / split / class_dir.name
            out.mkdir(parents=True, exist_ok=True)
            for photo in sorted(class_dir.iterdir())[:per_class]:
                with Image.open(photo) as img:
                    flower = _square(img.convert("RGB"), OBJECT)
                with Image.open(backgrounds[int(rng.integers(len(backgrounds)))]) as img:
                    canvas = _square(img.convert("RGB"), SIZE)
                x, y = (int(v) for v in rng.integers(0, SIZE - OBJECT + 1, size=2))
                canvas.paste(flower, (x, y))
                name = f"{split}/{class_dir.name}/{photo.stem}.jpg"
                canvas.save(SET / name, quality=92)
                boxes[name] = [x, y, x + OBJECT, y + OBJECT]
    (SET / "boxes.json").write_text(json.dumps(boxes, indent=0))
    log(f"{len(boxes)} images in {SET}")


def _run_dir(setting: str) -> Path:
    return SCRATCH / f"run-{setting}"


def fit(settings: list[str]) -> None:
    import graftkit

    for setting in settings:
        start = time.perf_counter()
        clf = graftkit.fit(SET, _run_dir(setting), verbose=0, **SETTINGS[setting])
        append(RESULTS, {"kind": "fit", "setting": setting,
                         "val_accuracy": clf.metrics["val_accuracy"],
                         "seconds": round(time.perf_counter() - start, 1)})
        log(f"{setting}: val accuracy {clf.metrics['val_accuracy']:.4f}")


def _val_images() -> list[tuple[str, str, list[int]]]:
    boxes = json.loads((SET / "boxes.json").read_text())
    return [(str(SET / name), name.split("/")[1], box) for name, box in boxes.items()
            if name.startswith("val/")]


def _inside(point: tuple[int, int], box: list[int]) -> bool:
    x, y = point
    return box[0] <= x < box[2] and box[1] <= y < box[3]


def point(settings: list[str]) -> None:
    import graftkit

    images = _val_images()
    rng = np.random.default_rng(1)
    centre = float(np.mean([_inside((SIZE // 2, SIZE // 2), b) for _, _, b in images]))
    draws = [np.mean([_inside(tuple(rng.integers(0, SIZE, 2)), b) for _, _, b in images])
             for _ in range(100)]
    for setting in settings:
        clf = graftkit.load(_run_dir(setting))
        scale = clf.image_size / SIZE  # heatmaps are at the model's input size
        hits, same, right = [], [], []
        for label in clf.classes:
            mine = [(p, b) for p, c, b in images if c == label]
            for (_, box), e in zip(mine, clf.explain([p for p, _ in mine], label=label)):
                x, y = e.peaks[label]
                hits.append(_inside((int(x / scale), int(y / scale)), box))
                same.append(e.closest[0]["label"] == label if e.closest else None)
                right.append(e.prediction.label == label)
        unknown = _unknown_closest(clf)
        row = {"kind": "point", "setting": setting, "images": len(hits),
               "pointing_game": float(np.mean(hits)),
               "pointing_game_grad_cam": _grad_cam_hits(clf, images),
               "centre_floor": centre,
               "random_floor": float(np.mean(draws)), "accuracy": float(np.mean(right)),
               "closest_same_label": float(np.mean([s for s in same if s is not None])),
               "unknown": unknown}
        append(RESULTS, row)
        log(json.dumps(row))


def _grad_cam_hits(clf, images) -> float:
    """The pointing game of plain Grad-CAM (for this head, the class activation map
    ``relu(map @ kernel[:, c])``), the variant graftkit's Grad-CAM++ is measured against."""
    from graftkit.data.images import load_image
    from graftkit.outputs.heatmaps import peak, upsample

    kernel = clf.model.get_layer("head_dense").get_weights()[0]
    maps = clf._feature_maps()  # the same maps explain() reads
    scale = clf.image_size / SIZE
    hits = []
    for path, label, box in images:
        m = maps(load_image(path, clf.image_size)[None])[0]
        cam = np.maximum(m @ kernel[:, clf.classes.index(label)], 0.0)
        x, y = peak(upsample(cam / max(float(cam.max()), 1e-12), clf.image_size))
        hits.append(_inside((int(x / scale), int(y / scale)), box))
    return float(np.mean(hits))


def _unknown_closest(clf) -> dict:
    """Aerial photos without a flower (val backgrounds not used as such): how many are called
    unknown, and how similar their closest training images are against known images'."""
    photos = sorted((SHARED / "ucm_multilabel").rglob("*.tif"))[::50][:40]
    photos = photos or sorted((SHARED / "ucm_multilabel").rglob("*.jpg"))[::50][:40]
    explained = clf.explain([str(p) for p in photos])
    known = clf.explain([p for p, _, _ in _val_images()[:40]])
    return {"images": len(explained),
            "called_unknown": float(np.mean([not e.prediction.known for e in explained])),
            "closest_similarity": float(np.mean([e.closest[0]["similarity"] for e in explained])),
            "closest_similarity_known": float(np.mean([e.closest[0]["similarity"]
                                                       for e in known]))}


def cost(settings: list[str]) -> None:
    import graftkit

    paths = [p for p, _, _ in _val_images()]
    for setting in settings:
        clf = graftkit.load(_run_dir(setting))
        clf.predict(paths[:40])  # engines converted and warm before the clock
        clf.explain(paths[:40])
        times: dict[str, list[float]] = {"predict": [], "explain": []}
        for _ in range(3):
            for name, call in (("predict", clf.predict), ("explain", clf.explain)):
                start = time.perf_counter()
                call(paths)
                times[name].append(len(paths) / (time.perf_counter() - start))
        row = {"kind": "cost", "setting": setting, "images": len(paths),
               "predict_images_per_s": statistics.median(times["predict"]),
               "explain_images_per_s": statistics.median(times["explain"]),
               **_command_seconds(_run_dir(setting))}
        row["explain_cost_ratio"] = row["predict_images_per_s"] / row["explain_images_per_s"]
        append(RESULTS, row)
        log(json.dumps(row))


def closest(runs: list[str]) -> None:
    import graftkit

    for run in runs:
        clf = graftkit.load(run)
        split = json.loads((Path(run) / "split.json").read_text())
        paths, labels = [p for p, _ in split["val"]], [c for _, c in split["val"]]
        explained = clf.explain(paths)
        row = {"kind": "closest", "run": Path(run).name, "data": clf.record.data,
               "images": len(paths),
               "accuracy": float(np.mean([e.prediction.label == c
                                          for e, c in zip(explained, labels)])),
               "closest_same_label": float(np.mean([e.closest[0]["label"] == c
                                                    for e, c in zip(explained, labels)])),
               "closest_3_majority": float(np.mean([
                   max(set(n := [x["label"] for x in e.closest]), key=n.count) == c
                   for e, c in zip(explained, labels)]))}
        append(RESULTS, row)
        log(json.dumps(row))


def _command_seconds(run: Path) -> dict:
    """``graft predict`` on the validation folder, plain and with ``--explain DIR`` (overlays
    written), alternating, 2 rounds each: the whole command's seconds, start-up included."""
    import subprocess

    graft = str(Path(sys.executable).parent / "graft")
    seconds: dict[str, list[float]] = {"command_predict_s": [], "command_explain_s": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(2):
            for name, extra in (("command_predict_s", []),
                                ("command_explain_s", ["--explain", tmp])):
                start = time.perf_counter()
                subprocess.run([graft, "predict", str(run), str(SET / "val"), "--format",
                                "json", *extra], check=True, capture_output=True)
                seconds[name].append(time.perf_counter() - start)
    return {name: round(min(v), 2) for name, v in seconds.items()}


def _markdown(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def table() -> None:
    rows = [json.loads(x) for x in RESULTS.read_text().splitlines()] if RESULTS.exists() else []
    points = {r["setting"]: r for r in rows if r["kind"] == "point"}  # the last of each
    _markdown(["setting", "val accuracy", "pointing game: Grad-CAM++ (graftkit)", "Grad-CAM",
               "centre floor", "random floor", "closest training image has the class"],
              [[s, f"{r['accuracy']:.4f}", f"{r['pointing_game']:.3f}",
                f"{r['pointing_game_grad_cam']:.3f}", f"{r['centre_floor']:.3f}",
                f"{r['random_floor']:.3f}", f"{r['closest_same_label']:.3f}"]
               for s in SETTINGS if (r := points.get(s))])
    near = {Path(r["data"]).name: r for r in rows if r["kind"] == "closest"}
    if near:
        print()
        _markdown(["data", "validation images", "accuracy",
                   "closest training image has the label", "majority of the 3 closest"],
                  [[name, str(r["images"]), f"{r['accuracy']:.3f}",
                    f"{r['closest_same_label']:.3f}", f"{r['closest_3_majority']:.3f}"]
                   for name, r in near.items()])
    costs = [r for r in rows if r["kind"] == "cost" and "command_predict_s" in r]
    if costs:
        print()
        by = {s: [r for r in costs if r["setting"] == s] for s in SETTINGS}
        _markdown(["setting", "predict images/s", "explain images/s", "cost ratio",
                   "graft predict s", "with --explain DIR s"],
                  [[s, *(mean_sd([r[k] for r in got], d) for k, d in (
                      ("predict_images_per_s", 1), ("explain_images_per_s", 1),
                      ("explain_cost_ratio", 2), ("command_predict_s", 1),
                      ("command_explain_s", 1)))]
                   for s, got in by.items() if got])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("make", "fit", "point", "cost", "closest", "table"))
    parser.add_argument("runs", nargs="*", help="closest: the run folders")
    parser.add_argument("--settings", default="defaults,unfreeze-all")
    args = parser.parse_args()
    settings = args.settings.split(",")
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown settings: {', '.join(unknown)}; one of {', '.join(SETTINGS)}")
    {"make": lambda: make(), "fit": lambda: fit(settings), "point": lambda: point(settings),
     "cost": lambda: cost(settings), "closest": lambda: closest(args.runs),
     "table": table}[args.what]()


if __name__ == "__main__":
    main()
