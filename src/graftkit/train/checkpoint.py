"""Per-epoch checkpoints, so a killed or interrupted ``graft fit`` resumes where it stopped.

``RUN_DIR/.checkpoint/state.json`` is the commit point: it names the weights files of the last
completed epoch (model and optimizer state) and of the best epoch so far, the phases finished,
the history rows and the early-stopping counter. Weights files carry the epoch in their name and
are written before the state that names them, so a kill at any instant leaves a consistent
checkpoint: the state on disk always describes files that are complete.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import keras
import numpy as np

from graftkit.errors import RunError
from graftkit.files import atomic_write, write_json

CHECKPOINT_DIR = ".checkpoint"
STATE_FILE = "state.json"


class RunCheckpoint:
    """The checkpoint folder of one run."""

    def __init__(self, run_dir: Path, fingerprint: dict, writable: bool = True):
        self.dir = Path(run_dir) / CHECKPOINT_DIR
        self.fingerprint = fingerprint
        self.writable = writable  # False on the workers of a cluster other than the chief
        self.state: dict = {"fingerprint": fingerprint, "phases": [], "history": [],
                            "phase": None, "epoch": 0, "wait": 0, "best": None,
                            "best_file": None, "last_file": None}

    @property
    def exists(self) -> bool:
        return (self.dir / STATE_FILE).is_file()

    def load(self) -> dict:
        """Read the saved state; refuse one written by a different command."""
        try:
            state = json.loads((self.dir / STATE_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RunError(f"cannot read the checkpoint in {self.dir}: {exc}; "
                           "pass --overwrite to start again") from None
        if state.get("fingerprint") != self.fingerprint:
            changed = sorted(k for k in set(self.fingerprint) | set(state.get("fingerprint", {}))
                             if self.fingerprint.get(k) != state.get("fingerprint", {}).get(k))
            raise RunError(
                f"{self.dir.parent} holds an unfinished run of a different command "
                f"(differs in: {', '.join(changed)}); pass --overwrite to start again, or "
                "repeat the original command to resume it"
            )
        self.state = state
        return state

    def _save(self, name: str, write) -> str:
        if not self.writable:
            return name
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic_write(self.dir / name, write)
        return name

    def _save_weights(self, model: keras.Model, name: str) -> str:
        return self._save(name, model.save_weights)

    def commit(self, **changes) -> None:
        """Write the state (after the files it names), then drop files it no longer names."""
        self.state.update(changes)
        if not self.writable:
            return
        write_json(self.dir / STATE_FILE, self.state)
        keep = {STATE_FILE, self.state.get("best_file"), self.state.get("last_file")}
        for path in self.dir.iterdir():
            if path.name not in keep and not path.name.startswith("."):
                path.unlink(missing_ok=True)

    def _save_arrays(self, arrays: list, name: str) -> str:
        def write(tmp):
            with open(tmp, "wb") as f:
                np.savez(f, *arrays)

        return self._save(name, write)

    def save_epoch(self, model: keras.Model, phase: str, epoch: int, history: list[dict],
                   best, best_changed: bool, wait: int) -> None:
        last = self._save_weights(model, f"last-{phase}-{epoch}.weights.h5")
        changes = {"phase": phase, "epoch": epoch, "history": history, "wait": wait,
                   "last_file": last,
                   "best": {"val_accuracy": best.val_accuracy, "val_loss": best.val_loss}}
        if best_changed:
            changes["best_file"] = self._save_arrays(best.weights, f"best-{phase}-{epoch}.npz")
        self.commit(**changes)

    def save_phase(self, phases: list[dict], history: list[dict], best) -> None:
        """A phase is over: record it with the best weights so far; its epochs need no replay."""
        name = self._save_arrays(best.weights, f"best-{len(phases)}.npz")
        self.commit(phases=phases, history=history, phase=None, epoch=0, wait=0, last_file=None,
                    best_file=name,
                    best={"val_accuracy": best.val_accuracy, "val_loss": best.val_loss})

    def best_weights(self) -> list[np.ndarray] | None:
        name = self.state.get("best_file")
        if not name:
            return None
        with np.load(self.dir / name) as data:
            return [data[f"arr_{i}"] for i in range(len(data.files))]

    def load_last(self, model: keras.Model) -> None:
        """Model and optimizer state of the last completed epoch of the current phase."""
        if model.optimizer is not None and not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.dir / self.state["last_file"])

    def remove(self) -> None:
        if self.writable:
            shutil.rmtree(self.dir, ignore_errors=True)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the epoch after ``EpochLog`` and ``KeepBest`` have recorded it."""

    def __init__(self, checkpoint: RunCheckpoint, phase: str, history: list[dict], keep_best):
        super().__init__()
        self.checkpoint, self.phase, self.history, self.keep_best = (
            checkpoint, phase, history, keep_best)
        self._seen = None

    def on_epoch_end(self, epoch, logs=None):
        best = self.keep_best.best
        changed = best.weights is not None and best.weights is not self._seen
        self._seen = best.weights
        self.checkpoint.save_epoch(self.model, self.phase, epoch + 1, self.history, best,
                                   changed, self.keep_best.wait)
