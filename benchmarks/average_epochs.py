"""Averaging the weights of phase 2's epochs (SWA, Izmailov et al. 2018) against its best epoch.

    .venv/bin/python benchmarks/average_epochs.py --dataset pacs_art --setting unfreeze-all \\
        --seed 1 --keep runs/keep --score ../shared/datasets/pacs_art/val \\
        ../shared/datasets/pacs_cartoon --starts 1,3,5

Runs one ``benchmarks/defaults.py`` run (kept in ``--keep``) while saving the model's weights
at the start of phase 2 and after each of its epochs (phase 2 runs at a constant learning rate,
as SWA wants), then scores on each ``--score`` folder the run's own model (the best epoch by
validation) and the mean of the weights of epochs k..last for each k in ``--starts``.
BatchNormalization is frozen in phase 2, so averaged weights need no new statistics.
The saving hook lives in this process only; graftkit itself is unchanged and the run's own
result is that of ``benchmarks/defaults.py``. A measurement script, not a test.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import defaults as protocol  # benchmarks/defaults.py, next to this file


def _record_phase_two(store: list) -> None:
    """Make ``KeepBest`` of phase 2 append the weights it sees to ``store`` (epoch 0 first)."""
    import graftkit.train.phases as phases

    plain_keep, plain_fit = phases.KeepBest, phases._fit_phase
    current = {"phase": None}

    class Recording(plain_keep):
        def on_train_begin(self, logs=None):
            if current["phase"] == "fine_tune":
                store.append(self._owner().get_weights())

        def on_epoch_end(self, epoch, logs=None):
            if current["phase"] == "fine_tune":  # before KeepBest may restore anything
                store.append(self._owner().get_weights())
            super().on_epoch_end(epoch, logs)

    def fit_phase(model, phase, *args, **kwargs):
        current["phase"] = phase
        try:
            return plain_fit(model, phase, *args, **kwargs)
        finally:
            current["phase"] = None

    phases.KeepBest, phases._fit_phase = Recording, fit_phase


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="pacs_art")
    p.add_argument("--setting", default="unfreeze-all", choices=sorted(protocol.SETTINGS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--keep", type=Path, required=True, help="folder for the run folder")
    p.add_argument("--score", nargs="+", required=True, help="labelled folders to score on")
    p.add_argument("--starts", default="1,3,5", help="first epochs of the averages")
    args = p.parse_args()

    import numpy as np

    import graftkit
    from graftkit.classifier import Classifier

    epochs: list = []
    _record_phase_two(epochs)
    row = protocol.run_one(args.dataset, args.setting, args.seed, protocol.SCRATCH, keep=args.keep)
    print(json.dumps(row), flush=True)
    if len(epochs) < 2:
        sys.exit("phase 2 did not run: nothing to average")
    run = graftkit.load(args.keep / f"{args.dataset}-{args.setting}-{args.seed}")
    last = len(epochs) - 1
    candidates = [("best epoch", run.model.get_weights())] + [
        (f"mean of epochs {k}-{last}", [np.mean(w, axis=0) for w in zip(*epochs[k:])])
        for k in (int(s) for s in args.starts.split(",")) if k < last]
    for name, weights in candidates:
        run.model.set_weights(weights)
        scored = Classifier(run.model, run.classes, fast=False)  # no engine cached for a mix
        scores = {folder: round(scored.evaluate(folder)["accuracy"], 4) for folder in args.score}
        print(json.dumps({"seed": args.seed, "weights": name, **scores}), flush=True)


if __name__ == "__main__":
    main()
