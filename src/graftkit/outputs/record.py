"""``metrics.json`` as a typed record with a schema version: what a run scored and what it ran.

Every reader goes through ``RunRecord`` (as timm's models go through ``PretrainedCfg``): the
classifier rebuilds its fast path from it, graft serve and the review page read the data and
the split options from it, the CLI tells a cluster's worker from its chief by it. Run folders
written before the schema had a version (schema 1) still load: ``from_json`` upgrades them, and
keys a newer graftkit wrote are kept untouched in ``extra`` so rewriting loses nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEMA_VERSION = 2
# 1: metrics.json before "schema" (graftkit 0.1.0): "engine_key" may be missing, with the
#    cached engine's key in "engine" instead of the engine's name.
# 2: "schema" written; every field below.

JSON = dict[str, Any]  # a section of metrics.json, as JSON gives it


@dataclass
class RunRecord:
    """One run's ``metrics.json``. Missing sections (an unfinished or hand-made run) are None."""

    val_accuracy: float | None = None
    balanced_accuracy: float | None = None
    backbone: str | None = None
    image_size: int | None = None
    data: str | None = None  # the data folder the run trained on, as given
    preprocessing: str | None = None
    classes: list[str] = field(default_factory=list)
    num_train: int = 0
    num_val: int = 0
    split: str | None = None
    skipped_files: list[JSON] = field(default_factory=list)
    phases: list[JSON] = field(default_factory=list)
    total_seconds: float | None = None
    engine: str | None = None  # the engine's name, e.g. "tflite"
    engine_key: str | None = None  # the cached engine file predict and serve reuse
    frozen_outputs: JSON | None = None
    precision: str | None = None
    distribution: JSON | None = None
    learning_rates: JSON | None = None
    mode: JSON | None = None
    options: JSON = field(default_factory=dict)
    class_weight: dict[str, float] | None = None
    per_class: JSON = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    check: JSON | None = None
    versions: JSON | None = None
    calibration: JSON | None = None
    open_set: JSON | None = None
    val_used_for: str | None = None
    test: JSON | None = None  # the held-out test split, scored once: first in the file
    label_issues: JSON | None = None  # count, checked, file, method, folds, seconds
    previous_run: JSON | None = None  # a refit: both models on the same validation images
    task: str = "single_label"  # or "multi_label": several labels per image, sigmoid outputs
    multi_label: JSON | None = None  # mAP, F1s, thresholds and per-label scores (multi-label)
    schema: int = SCHEMA_VERSION
    extra: JSON = field(default_factory=dict)  # keys this version does not know

    @classmethod
    def from_json(cls, data: JSON | None) -> RunRecord:
        """A record from ``metrics.json``'s content, older schemas upgraded."""
        data = dict(data or {})
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in data.items() if k in known}
        values.setdefault("schema", 1)
        if values["schema"] < 2:
            values.update(_upgrade_from_1(data))
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> JSON:
        """``metrics.json``'s content: the test scores first (the figure to trust) when the
        run had a test split, then every field in order, then the keys kept in ``extra``."""
        out: JSON = {"test": self.test} if self.test is not None else {}
        for f in dataclasses.fields(self):
            if f.name in ("test", "extra"):
                continue
            out[f.name] = getattr(self, f.name)
        out.update(self.extra)
        return out

    def option(self, name: str) -> Any:
        """A training option as the run used it; its declared default for runs that predate it."""
        if name in self.options:
            return self.options[name]
        from graftkit.options import FIT_OPTIONS

        return next((o.default for o in FIT_OPTIONS if o.name == name), None)

    @property
    def finished(self) -> bool:
        """A run written to the end (a worker of a cluster returns one without phases)."""
        return bool(self.phases)


def _upgrade_from_1(data: JSON) -> JSON:
    """Schema 1 stored the cached engine's key (16 hex digits) in "engine"."""
    import re

    engine = data.get("engine")
    if data.get("engine_key") is None and re.fullmatch(r"[0-9a-f]{16}", str(engine)):
        return {"engine_key": engine, "engine": None}
    return {}
