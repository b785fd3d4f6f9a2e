"""Option values parsed and checked without TensorFlow, so a typo is answered at once."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from graftkit import defaults
from graftkit.errors import UsageError


def number_or_auto(value, name: str) -> float | str:
    if str(value) == "auto":
        return "auto"
    try:
        return float(value)
    except (TypeError, ValueError):
        raise UsageError(f"{name} must be a number or 'auto' (got {value!r})") from None


def count_or_auto(value, name: str) -> int | str:
    if str(value) == "auto":
        return "auto"
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not number.is_integer():
        raise UsageError(f"{name} must be a whole number or 'auto' (got {value!r})")
    return int(number)


def parse_unfreeze(unfreeze) -> int | str:
    if str(unfreeze) in ("all", "auto"):
        return str(unfreeze)
    try:
        n = int(unfreeze)
    except ValueError:
        raise UsageError(f"--unfreeze must be auto, all or a number of blocks (got {unfreeze!r})"
                         ) from None
    if n < 1:
        raise UsageError(f"--unfreeze must be auto, all or at least 1 (got {n})")
    return n


def parse_unfreeze_schedule(value: str | None) -> tuple[int, ...]:
    """``none``/``""``: every block at once; ``gradual``: one more block per epoch (ULMFiT);
    ``0,1,3``: the epochs (from 0) at which blocks start, counting down from the top."""
    if value in (None, "", "none"):
        return ()
    if value == "gradual":
        return tuple(range(64))
    try:
        epochs = tuple(int(e) for e in str(value).split(","))
    except ValueError:
        raise ValueError("--unfreeze-schedule must be none, gradual or epochs like 0,1,3 "
                         f"(got {value!r})") from None
    if any(e < 0 for e in epochs) or list(epochs) != sorted(epochs):
        raise ValueError(f"--unfreeze-schedule epochs must be 0 or more and not decrease "
                         f"(got {value!r})")
    return epochs


# --- every option of graft fit (and lr-find), declared once ---------------------------------
#
# The CLI's arguments (in these groups), fit()'s keywords, FitOptions' fields and the CLI
# reference (docs/cli.md, scripts/cli_reference.py) are all made from this list.

@dataclass(frozen=True)
class Interval:
    """The numbers an option takes, as scikit-learn's ``Interval`` constraint states them.

    ``closed`` says which ends belong to it: "both", "left", "right" or "neither"; a missing
    end (None) is unbounded.
    """

    low: float | None
    high: float | None = None
    closed: str = "both"

    def __contains__(self, value) -> bool:
        low_in = self.closed in ("both", "left")
        high_in = self.closed in ("both", "right")
        if self.low is not None and (value < self.low or (value == self.low and not low_in)):
            return False
        return not (self.high is not None
                    and (value > self.high or (value == self.high and not high_in)))

    def describe(self) -> str:
        if self.high is None:
            return (f"at least {self.low:g}" if self.closed in ("both", "left")
                    else f"above {self.low:g}")
        if self.closed == "neither":
            return f"between {self.low:g} and {self.high:g}"
        left = "[" if self.closed in ("both", "left") else "("
        right = "]" if self.closed in ("both", "right") else ")"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


@dataclass(frozen=True)
class Option:
    """One training option: its keyword, default, help text, place in ``graft fit --help``
    and the values it takes (``choices``, or ``valid`` numbers, and "auto" if ``auto``)."""

    name: str
    default: Any
    help: str
    group: str
    type: Callable | None = None  # argparse type; bool: a --flag (default False) or --no-flag
    choices: tuple | None = None
    metavar: str | None = None
    valid: Interval | None = None  # None, where it is the default, is always valid
    auto: bool = False  # "auto" is a value too

    @property
    def flag(self) -> str:
        if self.type is bool and self.default is True:
            return "--no-" + self.name.replace("_", "-")
        return "--" + self.name.replace("_", "-")

    def check(self, value) -> None:
        """Refuse a value outside ``choices`` or ``valid``, naming the flag and the range."""
        if value is None or (self.auto and value == "auto"):
            return
        if self.choices is not None and value not in self.choices:
            raise UsageError(f"{self.flag} must be one of {', '.join(map(str, self.choices))} "
                             f"(got {value!r})")
        if self.valid is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{self.flag} must be a number{' or auto' if self.auto else ''} "
                             f"(got {value!r})")
        if value not in self.valid:
            raise UsageError(f"{self.flag} must be {self.valid.describe()} (got {value:g})")

    def add_to(self, group) -> None:
        """This option as an argparse argument of ``group``."""
        text = self.help.replace("%", "%%")
        if self.type is bool:
            action = "store_false" if self.default else "store_true"
            group.add_argument(self.flag, dest=self.name, action=action, help=text)
            return
        if self.default is not None:
            text += f" (default {self.default})"
        group.add_argument(self.flag, dest=self.name, default=self.default, type=self.type,
                           choices=self.choices, metavar=self.metavar, help=text)


GROUPS = {
    "data": "data",
    "model": "model",
    "phases": "phases",
    "optimizer": "optimizer and learning rates",
    "augmentation": "augmentation and cached views",
    "compute": "speed, precision and devices",
}

FIT_OPTIONS: tuple[Option, ...] = (
    Option("val", None, "validation data: a class folder or a CSV/TSV (instead of a split)",
           "data"),
    Option("test", None, "held-out test data, scored once at the end with nothing chosen on "
           "it: a class folder or a CSV/TSV (default: DATA/test/ beside DATA/train/)", "data"),
    Option("val_split", defaults.VAL_SPLIT,
           "validation fraction when the data has no val/ and no --val is given", "data", float,
           valid=Interval(0, 1, "neither")),
    Option("multi_label", False, "several labels per image (sigmoid outputs): implied by a "
           "table whose label column is named labels", "data", bool),
    Option("label_sep", " ", "separator of the label names in a multi-label table's cell",
           "data"),
    Option("seed", defaults.SEED, "seed of the split, the initialisation and every random "
           "stream", "data", int),
    Option("class_weight", "auto", "auto: weigh classes when the largest has more than "
           f"{defaults.IMBALANCE_RATIO:g}x the smallest's images; none: never", "data",
           choices=("auto", "none")),
    Option("label_folds", defaults.LABEL_FOLDS, "after the run, look for wrong labels with "
           "this many heads, each scoring the images it did not train on (label_issues.csv); "
           "0: skip", "data", int, valid=Interval(0)),
    Option("base", defaults.DEFAULT_BACKBONE,
           "backbone name (graft backbones) or a .keras model file", "model"),
    Option("weights", "imagenet", "imagenet, or a local weights file", "model"),
    Option("image_size", None, "square input side (default: chosen from the backbone's "
           f"pretraining size, {defaults.NATIVE_SIZE_SCALE:g}x, and the images' size)", "model",
           int, valid=Interval(8)),
    Option("dropout", defaults.DROPOUT, "dropout rate before the new Dense layer, or auto: "
           f"{defaults.DROPOUT_WHOLE_BASE:g} in runs that fine-tune the whole base, "
           f"{defaults.DROPOUT_CACHED:g} otherwise", "model",
           valid=Interval(0, 1, "left"), auto=True),
    Option("head_epochs", "auto", "phase 1 epochs (the head), each one pass over the training "
           f"images; auto: {defaults.HEAD_EPOCHS} epochs of at least "
           f"{defaults.MIN_HEAD_STEPS // defaults.HEAD_EPOCHS} steps, several passes each on a "
           "small training set", "phases", valid=Interval(1), auto=True),
    Option("fine_tune_epochs", None,
           f"phase 2 epochs (fine-tuning; default {defaults.FINE_TUNE_EPOCHS}, "
           f"{defaults.FINE_TUNE_EPOCHS_MULTI_LABEL} with several labels per image); 0 skips "
           "phase 2", "phases", int, valid=Interval(0)),
    Option("unfreeze", defaults.UNFREEZE,
           "auto, all, or the number of top blocks to fine-tune (trained on cached "
           "activations); auto: all where that is cheap (at most "
           f"{defaults.FULL_FINE_TUNE_MAX_IMAGES} training images at "
           f"{defaults.FULL_FINE_TUNE_SIZE} px, or as many pixels), else "
           f"{defaults.UNFREEZE_TOP}", "phases"),
    Option("mode", defaults.MODE,
           "auto: fine-tune and keep it only if it beats the head on validation (stops early "
           "when it does not); head: never fine-tune; fine-tune: every fine-tuning epoch",
           "phases", choices=defaults.MODES),
    Option("time_budget", None, "seconds for the whole run: fine-tuning stops before an epoch "
           "that would end past it", "phases", float, metavar="SECONDS",
           valid=Interval(0, None, "neither")),
    Option("unfreeze_schedule", defaults.UNFREEZE_SCHEDULE,
           "none: all unfrozen blocks from the start; gradual: one more block per fine-tuning "
           "epoch, top first; or start epochs like 0,1,3", "phases"),
    Option("heads", defaults.HEADS, "phase 1: train this many heads from different seeds on "
           "the cached features and average them into one (a logit ensemble at no inference "
           "cost)", "phases", int, valid=Interval(1)),
    Option("calibrate", defaults.CALIBRATE, "auto: fold a temperature fitted on the "
           "validation images into the final layer when it lowers their held-out calibration "
           "error and log-loss (accuracy unchanged); none: keep the probabilities as trained", "model",
           choices=("auto", "none")),
    Option("threshold", "auto", "multi-label runs: the probability above which a label is "
           "given; auto: one per label, the best F1 on the validation images", "model",
           valid=Interval(0, 1, "neither"), auto=True),
    Option("lr", defaults.HEAD_LR, "phase 1 learning rate, or auto: the range test chooses "
           "(graft lr-find)", "optimizer", valid=Interval(0, 1, "neither"), auto=True),
    Option("fine_tune_lr", None,
           f"phase 2 learning rate (default {defaults.FINE_TUNE_LR:g}; "
           f"{defaults.FINE_TUNE_LR_MULTI_LABEL:g} with several labels per image), or auto "
           "(with --unfreeze N)", "optimizer", valid=Interval(0, 1, "neither"), auto=True),
    Option("schedule", defaults.LR_SCHEDULE,
           "learning rate over each phase: cosine (5% warm-up, then cosine decay), one-cycle "
           "(25% up from lr/25, then down) or constant", "optimizer",
           choices=defaults.SCHEDULES),
    Option("weight_decay", defaults.WEIGHT_DECAY,
           "AdamW's decoupled weight decay on kernels; 0 for Adam", "optimizer", float,
           valid=Interval(0, 1, "left")),
    Option("label_smoothing", defaults.LABEL_SMOOTHING,
           f"a number, or auto: {defaults.LABEL_SMOOTHING_WHOLE_BASE:g} in runs that "
           "fine-tune the whole base, 0 otherwise", "optimizer",
           valid=Interval(0, 1, "left"), auto=True),
    Option("lr_decay", defaults.LR_DECAY, "discriminative rates: each lower unfrozen block "
           "trains at this times the rate of the block above (1: one rate)", "optimizer",
           float, valid=Interval(0, 1, "right")),
    Option("batch_size", defaults.BATCH_SIZE, "images per step (per replica under a "
           "strategy)", "optimizer", int, valid=Interval(1)),
    Option("augment", None, "augmentations, e.g. 'flip,rotation=0.1,zoom=0.1,contrast=0.1' "
           "(the default, also named 'basic'), 'style' (basic plus brightness, saturation, "
           "hue, grayscale), or none; also crop and augmix (docs/guide.md)", "augmentation"),
    Option("views", None, "views per training image run once through the frozen "
           "part of the base: the image and VIEWS-1 augmented ones (default "
           f"{defaults.VIEWS}; {defaults.VIEWS_MULTI_LABEL} with several labels per image)",
           "augmentation", int, valid=Interval(1)),
    Option("augment_head", False, "phase 1 the guide's way: through the frozen base every "
           "epoch, fresh augmentation", "augmentation", bool),
    Option("precision", defaults.PRECISION, "Keras dtype policy of the base (the head stays "
           "float32); float32 measured faster than mixed_bfloat16 on a 2-core CPU",
           "compute", choices=defaults.PRECISIONS),
    Option("engine_precision", "auto", "arithmetic of the frozen part's engine: auto (int8 "
           "where the CPU has 8-bit dot products, e.g. AVX-512 VNNI, or OpenVINO runs it on "
           "AVX2; else float32), f32, bf16 "
           "(OpenVINO, CPUs with bfloat16 units), int8 (calibrated on training images, kept "
           "only if it follows float32 closely; docs/guide.md#engines)", "compute",
           choices=("auto", "f32", "bf16", "int8")),
    Option("strategy", "auto", "where to train: auto (several GPUs: mirrored, else default), "
           "default, mirrored (all local GPUs), multi-worker (machines listed in TF_CONFIG); "
           "--batch-size is per replica, learning rates scale with replicas", "compute",
           choices=defaults.STRATEGIES),
    Option("cache", True, "neither read nor write frozen outputs in the cache (graft cache "
           "info)", "compute", bool),
)


def default(name: str) -> Any:
    """The declared default of option ``name`` (``FitOptions``' fields take theirs from here)."""
    return next(o.default for o in FIT_OPTIONS if o.name == name)


def add_arguments(parser) -> None:
    """Every option in its argument group (as timm's train.py groups its own)."""
    for key, title in GROUPS.items():
        group = parser.add_argument_group(title)
        for option in FIT_OPTIONS:
            if option.group == key:
                option.add_to(group)
        if key == "augmentation":
            group.add_argument("--no-augment", action="store_true",
                               help="no augmentation (one view per image): --augment none")


def from_arguments(args) -> dict:
    """``fit``'s option keywords from parsed arguments."""
    values = {o.name: getattr(args, o.name) for o in FIT_OPTIONS}
    if getattr(args, "no_augment", False):
        values["augment"] = "none"
    return values


def docstring() -> str:
    """The options as a Keras-style ``Args:`` block, for ``fit``'s docstring."""
    import textwrap

    lines = []
    for o in FIT_OPTIONS:
        text = f"{o.name}: {o.help}. Defaults to {o.default!r}."
        lines.append(textwrap.fill(text, 88, initial_indent="        ",
                                   subsequent_indent="            "))
    return "\n".join(lines)


def signature_with_options(func):
    """``func``'s signature with its ``**options`` spelled out as keyword-only parameters."""
    import inspect

    sig = inspect.signature(func)
    params = [p for p in sig.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default)
               for o in FIT_OPTIONS]
    return sig.replace(parameters=params)
