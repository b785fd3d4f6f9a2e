"""What ``graft export`` claims against what a user measures on every validation image.

    .venv/bin/python benchmarks/export_check.py RUN [RUN ...]

For each run folder (a default ``graft fit`` of a set in ../shared/datasets), side by side:
- ``first images``: the samples graftkit used to take, the first 256 validation images in folder
  order for the check and the first 100 training images for int8 calibration;
- ``today``: every validation image up to 1,000 for the check (a stratified random sample
  beyond) and a stratified random sample of 100 training images for calibration.
Each TFLite export (float32 and int8) states its accuracy on its check sample; the script then
runs the exported file on every validation image of the run, as a user checking it would, and
prints both, with the Keras model's accuracy on every image and the file sizes (the open-set
bank in float32, as before, and in float16). Markdown rows on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

import numpy as np  # noqa: E402


def first_images(items: list, limit: int, seed: int) -> list:
    """The old samples: the first items on disk in folder order, 256 of the validation images
    (the old cap) or ``limit`` training images."""
    return [(p, label) for p, label in items if os.path.isfile(p)][:min(limit, 256)]


def float32_bank(original):
    def arrays(open_set, dense):
        out = original(open_set, dense)
        return {k: v.astype(np.float32) for k, v in out.items()}
    return arrays


def on_every_image(path: str, split: dict, classes: list[str], size: int) -> float:
    from graftkit.data.images import load_image
    from graftkit.deploy.export import _run_tflite

    items = [(p, label) for p, label in split["val"] if os.path.isfile(p)]
    x = np.stack([load_image(p, size) for p, _ in items]).astype(np.float32)
    probs = _run_tflite(Path(path), x)["probabilities"]
    y = np.array([classes.index(label) for _, label in items])
    return float((probs.argmax(1) == y).mean())


def main() -> None:
    from graftkit.classifier import load
    from graftkit.deploy import export as export_module
    from graftkit.outputs import open_set as open_set_module
    from graftkit.outputs.run import read_split

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    print("| run | export | samples | size MB | claimed accuracy (check sample) | accuracy on "
          "every val image | Keras on every val image |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        clf = load(run)
        split = read_split(run)
        items = [(p, label) for p, label in split["val"] if os.path.isfile(p)]
        keras_all = float((clf.predict_proba([p for p, _ in items]).argmax(1) ==
                           np.array([clf.classes.index(label) for _, label in items])).mean())
        for quantize in ("none", "int8"):
            for samples, bank in (("first images", "float32"), ("today", "float16")):
                saved = (export_module.stratified, open_set_module._graph_arrays,
                         export_module.mend.half_constants)
                if samples == "first images":  # and the bank in float32, as before
                    export_module.stratified = first_images
                    open_set_module._graph_arrays = float32_bank(saved[1])
                    export_module.mend.half_constants = lambda model, part: model
                try:
                    with tempfile.TemporaryDirectory() as out:
                        result = export_module.export(run, "tflite", quantize, out)
                        every = on_every_image(result.path, split, clf.classes, clf.image_size)
                        written = json.loads((Path(out) / "export.json").read_text())
                finally:
                    (export_module.stratified, open_set_module._graph_arrays,
                     export_module.mend.half_constants) = saved
                print(f"| {run.name} | tflite {quantize} | {samples} (bank {bank}) | "
                      f"{result.size_bytes / 1e6:.1f} | {result.accuracy:.4f} on "
                      f"{written['images_checked']} | {every:.4f} on {len(items)} | "
                      f"{keras_all:.4f} |", flush=True)


if __name__ == "__main__":
    main()
