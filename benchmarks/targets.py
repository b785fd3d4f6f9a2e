"""Where the exports run, measured on every validation image of real runs.

    .venv/bin/python benchmarks/targets.py RUN [RUN ...]     # rows in targets-runs.jsonl
    .venv/bin/python benchmarks/targets.py --table            # the markdown table of docs/export.md

For each run folder (a default ``graft fit`` of a set in ../shared/datasets):
- TFLite for MediaPipe: ``graft export --format tflite``, then MediaPipe's ImageClassifier on
  every validation image, given graftkit's pixels at the model's size and given the files
  themselves (MediaPipe decoding and resizing, as an app);
- ONNX in the browser: ``graft export --format onnx``, then graft serve's /browser/ page
  (ONNX Runtime Web) in headless Chromium, on the same two kinds of input (the page resizing
  the files with a canvas, as a web app would);
- Core ML: ``graft export --format coreml`` (its specification checked; it runs only on Apple
  systems).
Each against graft predict on the same files: top-1 agreement and the largest score difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
from rows import append, log  # noqa: E402

RESULTS = HERE / "targets-runs.jsonl"


def agreement(got: np.ndarray, expected: np.ndarray) -> dict:
    return {"top1_agreement": float((got.argmax(1) == expected.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(got - expected).max()),
            "disagree": int((got.argmax(1) != expected.argmax(1)).sum())}


def in_chromium(run: Path, files: list[str]) -> np.ndarray:
    """graft serve's /browser/ page on ``files``: the probabilities ONNX Runtime Web gave."""
    from playwright.sync_api import sync_playwright

    from graftkit.serve.server import Service

    service = Service(run)
    base = service.start()
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page()
            page.goto(f"{base}/browser/")
            page.wait_for_selector("#status[data-ready='true']", timeout=120_000)
            page.set_input_files("#files", files)
            page.wait_for_selector(f"#status[data-done='{len(files)}']", timeout=1_800_000)
            got = page.evaluate("window.graftResults.map(r => r.probabilities)")
            browser.close()
    finally:
        service.stop()
    return np.array(got)


def measure(run: Path) -> dict:
    import graftkit
    from graftkit.data.images import load_image
    from graftkit.deploy import tflite_metadata
    from graftkit.deploy.export import export
    from graftkit.outputs.run import read_split

    clf = graftkit.load(run)
    items = [(p, label) for p, label in read_split(run)["val"] if os.path.isfile(p)]
    paths = [p for p, _ in items]
    truth = np.array([clf.classes.index(label) for _, label in items])
    expected = clf.predict_proba(paths)
    data = json.loads((run / "metrics.json").read_text())["data"]
    row: dict = {"run": Path(data).name, "images": len(paths),
                 "accuracy": float((expected.argmax(1) == truth).mean())}
    log(f"{run.name}: tflite for MediaPipe...")
    tflite = export(run, "tflite", quantize="none")
    pixels = np.stack([load_image(p, clf.image_size) for p in paths])
    n = len(clf.classes)
    at_size = tflite_metadata.classify(Path(tflite.path), pixels, n)["probabilities"]
    from_files = tflite_metadata.classify_files(Path(tflite.path), paths, n)["probabilities"]
    row["mediapipe"] = {"size_mb": tflite.size_bytes / 1e6,
                        "at_model_size": agreement(at_size, expected),
                        "from_files": agreement(from_files, expected)}
    log(f"{run.name}: onnx in Chromium...")
    onnx = export(run, "onnx", quantize="none", out=run / "export" / "onnx")
    with tempfile.TemporaryDirectory() as tmp:
        from PIL import Image

        resized = []
        for i, img in enumerate(pixels):
            resized.append(str(Path(tmp) / f"{i:05d}.png"))
            Image.fromarray(img).save(resized[-1])
        at_size = in_chromium(run, resized)
    from_files = in_chromium(run, paths)
    row["browser"] = {"size_mb": onnx.size_bytes / 1e6,
                      "at_model_size": agreement(at_size, expected),
                      "from_files": agreement(from_files, expected)}
    log(f"{run.name}: coreml...")
    coreml = export(run, "coreml")
    row["coreml"] = {"size_mb": coreml.size_bytes / 1e6, "spec": coreml.coreml}
    return row


def table() -> str:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    latest = {r["run"]: r for r in rows}
    out = ["| run | target | size MB | accuracy | same top-1 as graft predict (model-size pixels) "
           "| largest score difference | runtime decodes and resizes the files: same top-1 "
           "| largest score difference |", "|---|---|---|---|---|---|---|---|"]
    for name, r in latest.items():
        mp, br, cm = r["mediapipe"], r["browser"], r["coreml"]
        n = r["images"]
        for target, m in (("TFLite, MediaPipe ImageClassifier", mp),
                          ("ONNX, ONNX Runtime Web in Chromium", br)):
            at, files = m["at_model_size"], m["from_files"]
            out.append(f"| {name} | {target} | {m['size_mb']:.1f} | {r['accuracy']:.4f} | "
                       f"{at['top1_agreement']:.4f} of {n} | {at['max_abs_diff']:.1e} | "
                       f"{files['top1_agreement']:.4f} ({files['disagree']} differ) | "
                       f"{files['max_abs_diff']:.2f} |")
        out.append(f"| {name} | Core ML (specification checked, not run) | {cm['size_mb']:.1f} "
                   "| - | - | - | - | - |")
    flags = sorted({r["cpu_flags"] for r in latest.values()})
    out.append("")
    out.append(f"CPU flags: {'; '.join(flags)}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="*", type=Path)
    parser.add_argument("--table", action="store_true")
    args = parser.parse_args()
    for run in args.runs:
        row = measure(run)
        append(RESULTS, row)
        log(json.dumps(row)[:300])
    if args.table:
        print(table())


if __name__ == "__main__":
    main()
