"""Samples/s of ``graft fit`` on one worker and on two workers (MultiWorkerMirroredStrategy).

    .venv/bin/python benchmarks/scaling.py ../shared/datasets/hymenoptera [--workers 1 2]

Each configuration runs in fresh processes with an empty cache: one worker is the default
strategy, N workers are N ``graft fit --strategy multi-worker`` processes on 127.0.0.1 with a
``TF_CONFIG`` each, sharing the cache folder and ``--out`` as the README's "Scaling out" says.
Phase 2 fine-tunes the whole base (``--unfreeze all``), the part that scales with replicas.
Prints wall seconds per phase, training samples/s of phase 2 and the ratio to one worker. On a
2-core CPU machine two workers share the same cores, so expect no speed-up there: the point is
that the run stays correct; on several GPUs or machines each worker brings its own.
A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from graftkit.train.distribute import loopback_configs


def run(data: Path, workers: int, options: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out, cache = Path(tmp) / "run", Path(tmp) / "cache"
        strategy = "multi-worker" if workers > 1 else "default"
        procs = []
        t = time.perf_counter()
        for config in loopback_configs(workers):
            env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": ""}
            if workers > 1:
                env["TF_CONFIG"] = config
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "graftkit.cli", "fit", str(data), "--out", str(out),
                 "--strategy", strategy, *options],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outputs = [p.communicate() for p in procs]
        wall = time.perf_counter() - t
        for p, (_, err) in zip(procs, outputs):
            if p.returncode != 0:
                sys.exit(f"{workers} worker(s) failed:\n{err[-3000:]}")
        metrics = json.loads((out / "metrics.json").read_text())
    digests = {m.group(1) for o, _ in outputs
               for m in [re.search(r"final weights sha256 ([0-9a-f]{16})", o)] if m}
    p1, p2 = metrics["phases"][0], metrics["phases"][1]
    return {"workers": workers, "replicas": metrics["distribution"]["replicas"],
            "phase1_s": p1["seconds"], "phase2_s": p2["seconds"], "phase2_epochs": p2["epochs"],
            "samples_s": metrics["num_train"] * p2["epochs"] / p2["seconds"],
            "val_accuracy": metrics["val_accuracy"], "wall_s": wall,
            "in_sync": len(digests) <= 1}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", type=Path)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each phase")
    parser.add_argument("--batch-size", type=int, default=16, help="per replica")
    args = parser.parse_args()
    options = ["--image-size", str(args.image_size), "--head-epochs", str(args.epochs),
               "--fine-tune-epochs", str(args.epochs), "--unfreeze", "all",
               "--batch-size", str(args.batch_size), "--no-augment"]
    rows = [run(args.data, n, options) for n in args.workers]
    base = rows[0]["samples_s"]
    print(f"\n{args.data}: graft fit {' '.join(options)}")
    print(f"{'workers':>8}{'replicas':>10}{'phase 1 s':>11}{'phase 2 s':>11}"
          f"{'phase 2 samples/s':>19}{'vs 1':>7}{'val acc':>9}{'wall s':>8}{'in sync':>9}")
    for r in rows:
        print(f"{r['workers']:>8}{r['replicas']:>10}{r['phase1_s']:>11.1f}{r['phase2_s']:>11.1f}"
              f"{r['samples_s']:>19.1f}{r['samples_s'] / base:>7.2f}{r['val_accuracy']:>9.4f}"
              f"{r['wall_s']:>8.1f}{'yes' if r['in_sync'] else 'NO':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
