"""What each stage of ``fit`` hands to the next: small typed records, in pipeline order.

``RunContext`` (given) -> ``PreparedData`` (scan) -> ``Resume`` (checkpoint) -> ``ModelPlan``
(base, head, every "auto" resolved) -> ``Training`` (phase plan; the phases fill it) ->
``CutPlan`` (where the base is cut) -> ``FrozenOutputs`` (computed once) -> phases -> the run.
A stage takes the records it reads and returns its own; only ``Training`` changes after it is
made (the phases append their results and keep the best weights in it).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import keras

    from graftkit.backbones.registry import BaseInfo
    from graftkit.data.checks import CheckReport
    from graftkit.data.folder import ImageFolder
    from graftkit.frozen.cut import BaseSplit
    from graftkit.frozen.engine import FrozenPart
    from graftkit.frozen.extract import Extracted
    from graftkit.progress import ProgressFactory
    from graftkit.train.checkpoint import RunCheckpoint
    from graftkit.train.distribute import Distribution
    from graftkit.train.phases import Best, PhasePlan, PhaseResult
    from graftkit.train.workflow import FitOptions


@dataclass(frozen=True)
class RunContext:
    """Where one run writes and how it reports; the same for every stage."""

    run_dir: Path
    dist: Distribution
    log: Callable[[str], None]
    verbose: int | str
    writes: bool = True  # False for the range tests of lr-find: no checkpoint, no history
    started: float = field(default_factory=time.perf_counter)
    bars: ProgressFactory | None = None  # a progress bar for each long silent step
    previous: Path | None = None  # a refit: the run whose data this one's is compared with


@dataclass(frozen=True)
class PreparedData:
    """The data as scanned (every file decoded once) and what ``graft check`` says of it."""

    folder: ImageFolder
    checked: CheckReport


@dataclass(frozen=True)
class Resume:
    """The run's checkpoint, and its state when a run is resumed."""

    checkpoint: RunCheckpoint
    state: dict | None = None

    @property
    def epochs(self) -> int:
        """Epochs of the current phase already done (0 for a fresh run)."""
        return self.state["epoch"] if self.state else 0


@dataclass(frozen=True)
class ModelPlan:
    """The grafted model and the options with every "auto" resolved, with the reasons."""

    options: FitOptions
    base_model: keras.Model
    model: keras.Model
    info: BaseInfo
    size_reason: str = "given"
    unfreeze_reason: str = "given"
    class_weight: dict[int, float] | None = None

    @property
    def size(self) -> int:
        return self.info.image_size


@dataclass
class Training:
    """The phases' plan, and what they have done so far: each phase appends its result, the
    best weights by validation, its range test."""

    batch_size: int
    plan: PhasePlan
    best: Best
    phases: list[PhaseResult] = field(default_factory=list)
    lr_tests: dict[str, dict] = field(default_factory=dict)


@dataclass(frozen=True)
class CutPlan:
    """Where the base is cut: what is below is frozen, computed once per image and view."""

    fine_tune_epochs: int  # 0 when phase 2 does not run
    split: BaseSplit
    cached_phase2: bool  # phase 2 trains the top blocks on cached activations
    views: int
    need_cache: bool  # some phase trains on frozen outputs
    label_rows: bool  # only the plain view is needed, for the label issues after the run
    frozen_model: keras.Model  # pixels -> what the frozen part gives
    engine_key: str


@dataclass
class FrozenOutputs:
    """The frozen part's outputs for every training view and validation image.

    ``release()`` drops the rows once the last pass no longer needs them (they can be the
    largest thing a run holds).
    """

    part: FrozenPart
    train: Extracted | None
    val: Extracted | None
    seconds: float
    computed: int  # outputs computed (not read from the cache) by this run
    total: int  # outputs used, computed or read

    def release(self) -> None:
        self.train = self.val = None
