"""What the head predicts: one class per image (softmax) or a set of labels (sigmoids).

Everything that differs between the two lives here, so the phases, the caches and the run
folder stay one code path: the head's activation, the score that chooses the best
epoch (accuracy, or macro mAP for label sets: accuracy of a whole label set is too coarse to
rank epochs by), and the training targets (class indices, or multi-hot rows).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SINGLE = "single_label"
MULTI = "multi_label"


@dataclass(frozen=True)
class Task:
    """``multi_label``: several labels per image, each its own yes/no."""

    multi_label: bool = False

    @property
    def name(self) -> str:
        return MULTI if self.multi_label else SINGLE

    @property
    def activation(self) -> str:
        return "sigmoid" if self.multi_label else "softmax"

    @property
    def monitor(self) -> str:
        """The validation metric the best epoch is chosen by (Keras' log name)."""
        return "map" if self.multi_label else "accuracy"

    @property
    def monitor_label(self) -> str:
        return "mAP" if self.multi_label else "accuracy"

    @property
    def history_columns(self) -> tuple[str, ...]:
        """history.csv's columns: the loss and the monitored score, train and validation."""
        m = self.monitor
        return ("phase", "epoch", "loss", m, "val_loss", f"val_{m}", "seconds")

    def metrics(self, num_labels: int) -> list:
        if not self.multi_label:
            return ["accuracy"]
        import keras

        # Keras' PR-AUC per label, averaged: macro mAP (interpolated), streaming over batches.
        return [keras.metrics.AUC(curve="PR", multi_label=True, num_labels=num_labels,
                                  num_thresholds=400, name="map")]

    def targets(self, labels: Sequence, num_labels: int) -> np.ndarray:
        """Class indices (int32), or multi-hot rows (float32) for label sets."""
        if not self.multi_label:
            return np.asarray(labels, dtype=np.int32)
        out = np.zeros((len(labels), num_labels), np.float32)
        for i, names in enumerate(labels):
            out[i, list(names)] = 1.0
        return out


SINGLE_LABEL = Task(False)
MULTI_LABEL = Task(True)


def task_of(multi_label: bool) -> Task:
    return MULTI_LABEL if multi_label else SINGLE_LABEL
