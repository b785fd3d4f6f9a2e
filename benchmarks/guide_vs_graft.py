"""The Keras guide's transfer-learning loop against ``graft fit``, side by side in one run.

    .venv/bin/python benchmarks/guide_vs_graft.py ../shared/datasets/hymenoptera [--epochs 5]

(a) The guide, faithfully: ``image_dataset_from_directory``, flip + rotation augmentation in
the model, the base frozen and called with ``training=False``, Adam at its default rate for
phase 1; then ``base.trainable = True``, recompile with ``Adam(1e-5)``, phase 2. Same backbone
(EfficientNet-Lite0 with its preprocessing), image size and epochs as (b).
(b) ``graft fit`` with its defaults, first with an empty cache of frozen outputs and engines
(what a first run on new data costs), then again with another seed (what a rerun costs: the
frozen base is skipped). Each runs in its own process, so peak RSS is measured for each.
Prints wall seconds per phase, best and final validation accuracy, peak RSS and the ratios.
A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def guide(data: Path, epochs: int, size: int, seed: int) -> dict:
    import keras

    from graftkit.backbones import load_base

    keras.utils.set_random_seed(seed)
    train = keras.utils.image_dataset_from_directory(
        data / "train", image_size=(size, size), batch_size=32, seed=seed, verbose=False)
    val = keras.utils.image_dataset_from_directory(
        data / "val", image_size=(size, size), batch_size=32, shuffle=False, verbose=False)
    classes = len(train.class_names)
    train, val = train.prefetch(8), val.prefetch(8)
    base, _ = load_base("efficientnet_lite0", size)
    base.trainable = False
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.1)])
    inputs = keras.Input((size, size, 3))
    x = augmentation(inputs)
    x = base(x, training=False)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(classes, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t = time.perf_counter()
    h1 = model.fit(train, validation_data=val, epochs=epochs, verbose=2)
    s1 = time.perf_counter() - t
    base.trainable = True
    model.compile(optimizer=keras.optimizers.Adam(1e-5), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    t = time.perf_counter()
    h2 = model.fit(train, validation_data=val, epochs=epochs, verbose=2)
    s2 = time.perf_counter() - t
    v1, v2 = h1.history["val_accuracy"], h2.history["val_accuracy"]
    return {"phase1_s": s1, "phase2_s": s2, "phase1_best": max(v1), "phase1_final": v1[-1],
            "best": max(v1 + v2), "final": v2[-1]}


def graft(data: Path, seed: int) -> dict:
    from graftkit.train.workflow import fit

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        r = fit(data, Path(tmp) / "run", seed=seed, verbose=0)
        total = time.perf_counter() - t
    p = {ph["name"]: ph for ph in r.metrics["phases"]}
    return {"phase1_s": p["head"]["seconds"], "phase2_s": p.get("fine_tune", {}).get("seconds", 0),
            "phase1_best": p["head"]["best_val_accuracy"], "phase1_final": float("nan"),
            "best": max(ph["best_val_accuracy"] for ph in r.metrics["phases"]),
            "final": r.metrics["val_accuracy"], "total_s": total}


def _child(part: str, args, cache: str) -> dict:
    """One measurement in a fresh process (its own peak RSS), sharing the cache folder."""
    env = {**os.environ, "GRAFTKIT_CACHE_DIR": cache}
    cmd = [sys.executable, __file__, str(args.data), "--part", part, "--epochs", str(args.epochs),
           "--image-size", str(args.image_size), "--seed", str(args.seed)]
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"{part} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["process_s"] = time.perf_counter() - t
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path, help="a folder with train/ and val/ class folders")
    parser.add_argument("--epochs", type=int, default=5, help="epochs per phase of the guide")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--part", choices=("guide", "graft", "graft-again"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not (args.data / "train").is_dir() or not (args.data / "val").is_dir():
        print(f"{args.data} needs train/ and val/ class folders", file=sys.stderr)
        return 2
    if args.part:
        if args.part == "guide":
            result = guide(args.data, args.epochs, args.image_size, args.seed)
        else:
            result = graft(args.data, args.seed + (1 if args.part == "graft-again" else 0))
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(result))
        return 0
    with tempfile.TemporaryDirectory() as cache:
        g = _child("guide", args, cache)  # also converts the backbone weights into the cache
        w = _child("graft", args, cache)  # no frozen outputs, no engines cached yet
        again = _child("graft-again", args, cache)  # another seed: frozen outputs cached
    rows = [("phase 1 wall s", "phase1_s", "{:.1f}"), ("phase 2 wall s", "phase2_s", "{:.1f}"),
            ("phase 1 best val acc", "phase1_best", "{:.4f}"), ("best val acc", "best", "{:.4f}"),
            ("final val acc", "final", "{:.4f}"), ("peak RSS MB", "peak_rss_mb", "{:.0f}"),
            ("process wall s", "process_s", "{:.1f}")]
    print(f"\n{args.data} ({args.image_size} px; guide {args.epochs}+{args.epochs} epochs; "
          "graft fit defaults; graft rerun: seed +1, cache warm)")
    print(f"{'':24}{'guide':>10}{'graft fit':>12}{'guide/graft':>14}{'graft rerun':>14}")
    for label, key, fmt in rows:
        ratio = g[key] / w[key] if w[key] else float("nan")
        print(f"{label:24}{fmt.format(g[key]):>10}{fmt.format(w[key]):>12}{ratio:>14.2f}"
              f"{fmt.format(again[key]):>14}")
    total_g = g["phase1_s"] + g["phase2_s"]
    total_w = w["phase1_s"] + w["phase2_s"]
    total_a = again["phase1_s"] + again["phase2_s"]
    print(f"{'both phases wall s':24}{total_g:>10.1f}{total_w:>12.1f}{total_g / total_w:>14.2f}"
          f"{total_a:>14.1f}")
    print(f"(graft fit end to end, scan, check and outputs included: {w['total_s']:.1f} s; "
          f"rerun {again['total_s']:.1f} s; guide/graft end to end "
          f"{total_g / w['total_s']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
