"""The demo: fine-tune the offline ImageNet EfficientNet-Lite0 on scikit-learn's digits.

scikit-learn ships the 1,797 real 8x8 scans of handwritten digits, so the demo needs no
download: they are written out as an ordinary class folder and go through ``graft fit`` like any
user's photos.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# The defaults choose 64 px for the 8x8 scans and fine-tune the whole base (cheap at 64 px; the
# digits are far from ImageNet: measured 0.93 -> 0.975). Digits must not be mirrored, and 8
# epochs instead of 5 gain about a point on them (benchmarks/RESULTS.md).
DEMO_SETTINGS = dict(fine_tune_epochs=8, augment="rotation=0.05,zoom=0.1")


def write_digits(folder: str | os.PathLike) -> Path:
    """scikit-learn's digits as ``folder/<digit>/<index>.png`` (gray, 0-255, dark ink on white)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(folder)
    digits = load_digits()
    for i, (image, target) in enumerate(zip(digits.images, digits.target)):
        d = folder / str(target)
        d.mkdir(parents=True, exist_ok=True)
        pixels = (255 - image * (255 / 16)).round().astype(np.uint8)
        Image.fromarray(pixels, "L").save(d / f"{i:04d}.png")
    return folder


def run_demo(out: str | os.PathLike = "demo-run", overwrite: bool = False, verbose="auto",
             log=print) -> dict:
    """Write the digits, fit, evaluate, predict one image; returns the run's metrics."""
    from graftkit.classifier import load
    from graftkit.train.workflow import fit

    out = Path(out)
    data = out / "digits"
    run_dir = out / "run"
    if not (data / "9").is_dir():
        write_digits(data)
    log(f"demo: scikit-learn digits written to {data}/ (10 classes, 1,797 images)")
    result = fit(data, run_dir, overwrite=overwrite, verbose=verbose, log=log,
                 **DEMO_SETTINGS)  # type: ignore[arg-type]  # options, all keyword-only
    from graftkit.outputs.summary import print_summary

    print_summary(result.metrics, run_dir)
    clf = load(run_dir)
    sample = sorted((data / "7").glob("*.png"))[0]
    pred = clf.predict([str(sample)], top_k=3)[0]
    log(f"\nprediction for {sample}: {pred.label} (p={pred.probability:.3f}); top 3: "
        + ", ".join(f"{lab} {p:.3f}" for lab, p in pred.top_k))
    log(f"\nopen {run_dir / 'report.html'} in a browser, then try:\n"
        f"      graft predict {run_dir} {sample}\n      graft evaluate {run_dir} {data}\n"
        f"      graft serve {run_dir}      # try page, HTTP API and data review in a browser\n"
        f"      graft inspect {run_dir}\n      graft export {run_dir} --format tflite")
    return result.metrics
