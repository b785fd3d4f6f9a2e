"""Behaviour oracle for refactors: the same commands must give the same figures.

    .venv/bin/python benchmarks/oracle.py record before.json     # on the old code
    .venv/bin/python benchmarks/oracle.py record after.json      # on the new code
    .venv/bin/python benchmarks/oracle.py compare before.json after.json

TensorFlow's deterministic ops are on and every random stream is seeded, so ``graft fit`` with
the defaults gives the same validation accuracy, confusion matrix and history rows (wall
seconds aside) on the same machine, before and after a change that keeps behaviour. ``record``
runs ``graft fit`` on hymenoptera and flowers5 (top blocks on cached activations) and the
demo's digits (the whole base), each in its own process with an empty ``GRAFTKIT_CACHE_DIR``:
a warm cache would skip the code under test, and a cached engine changes which engine runs.
``compare`` prints each figure that differs and exits 1 when any does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATASETS = HERE.parent.parent / "shared" / "datasets"
SETS = ("hymenoptera", "flowers5", "digits")


def _graft() -> list[str]:
    return [sys.executable, "-m", "graftkit.cli"]


def _run(name: str, work: Path) -> dict:
    env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(work / "cache")}
    if name == "digits":
        cmd = [*_graft(), "demo", "--out", str(work / "demo")]
        run_dir = work / "demo" / "run"
    else:
        run_dir = work / "run"
        cmd = [*_graft(), "fit", str(DATASETS / name), "--out", str(run_dir)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    with open(run_dir / "history.csv", encoding="utf-8", newline="") as f:
        history = [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(f)]
    return {"val_accuracy": metrics["val_accuracy"],
            "confusion_matrix": metrics["confusion_matrix"],
            "mode": metrics.get("mode", {}).get("chosen"),
            "phases": [[p["name"], p["epochs"], p["best_val_accuracy"]]
                       for p in metrics["phases"]],
            "history": history}


def record(path: Path, sets: list[str]) -> None:
    out = {}
    for name in sets:
        with tempfile.TemporaryDirectory(prefix=f"oracle-{name}-") as tmp:
            out[name] = _run(name, Path(tmp))
        print(f"{name}: val_accuracy {out[name]['val_accuracy']:.4f}, "
              f"{len(out[name]['history'])} history rows", flush=True)
    path.write_text(json.dumps(out, indent=1) + "\n", encoding="utf-8")


def compare(a: Path, b: Path) -> int:
    before = json.loads(a.read_text(encoding="utf-8"))
    after = json.loads(b.read_text(encoding="utf-8"))
    differ = 0
    for name in sorted(set(before) | set(after)):
        x, y = before.get(name), after.get(name)
        if x is None or y is None:
            print(f"{name}: only in {'after' if x is None else 'before'}")
            differ += 1
            continue
        for key in x:
            if x[key] != y.get(key):
                differ += 1
                print(f"{name}: {key} differs\n  before {x[key]}\n  after  {y.get(key)}")
        if all(x[k] == y.get(k) for k in x):
            print(f"{name}: identical (val_accuracy {x['val_accuracy']:.4f}, "
                  f"{len(x['history'])} history rows, confusion matrix, phases, mode)")
    return 1 if differ else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    subs = parser.add_subparsers(dest="action", required=True)
    r = subs.add_parser("record")
    r.add_argument("output", type=Path)
    r.add_argument("--sets", default=",".join(SETS))
    c = subs.add_parser("compare")
    c.add_argument("before", type=Path)
    c.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.action == "record":
        record(args.output, args.sets.split(","))
        return 0
    return compare(args.before, args.after)


if __name__ == "__main__":
    sys.exit(main())
