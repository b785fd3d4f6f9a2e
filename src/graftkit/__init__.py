"""graftkit: the Keras transfer-learning guide's two-phase workflow as a library and a CLI.

Public names load lazily, so ``graft --help`` does not pay for importing TensorFlow.
"""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"

_PUBLIC = {
    "fit": "graftkit.train.workflow",
    "lr_find": "graftkit.train.workflow",
    "load": "graftkit.classifier",
    "Classifier": "graftkit.classifier",
    "Prediction": "graftkit.classifier",
    "check": "graftkit.data.checks",
    "export": "graftkit.deploy.export",
    "freeze": "graftkit.graft",
    "unfreeze": "graftkit.graft",
    "GraftError": "graftkit.errors",
}

__all__ = [*_PUBLIC, "__version__"]


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'graftkit' has no attribute {name!r}")
