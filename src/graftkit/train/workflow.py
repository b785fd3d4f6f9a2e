"""``fit`` and ``lr_find``: the stages of ``graftkit.train.stages`` run in order, in one call.

data -> base -> graft -> frozen outputs -> phases -> choice -> run folder. Each stage returns a
record (``graftkit.train.records``) that the later ones take.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from graftkit import defaults
from graftkit import options as options_module
from graftkit.errors import UsageError
from graftkit.options import (
    count_or_auto,
    number_or_auto,
    parse_unfreeze,
    parse_unfreeze_schedule,
)
from graftkit.progress import progress_factory
from graftkit.train import stages
from graftkit.train.finish import finish
from graftkit.train.records import (
    CutPlan,
    FrozenOutputs,
    ModelPlan,
    PreparedData,
    Resume,
    RunContext,
    Training,
)

if TYPE_CHECKING:
    from graftkit.classifier import Classifier


_D = options_module.default  # each default as declared in graftkit.options.FIT_OPTIONS


@dataclass(frozen=True, kw_only=True)
class FitOptions:
    """Everything that decides a run's result; a resumed run must match it exactly.

    Its fields are ``graftkit.options.FIT_OPTIONS`` in their order, with the types ``fit``
    gives them after parsing and their declared defaults (a test keeps the two in step).
    """

    val: str | None = _D("val")
    test: str | None = _D("test")
    val_split: float = _D("val_split")
    multi_label: bool = _D("multi_label")
    label_sep: str = _D("label_sep")
    seed: int = _D("seed")
    class_weight: str = _D("class_weight")
    label_folds: int = _D("label_folds")
    base: str = _D("base")
    weights: str | None = _D("weights")
    image_size: int | None = _D("image_size")
    dropout: float | str = _D("dropout")  # a rate, or "auto" until resolved
    head_epochs: int | str = _D("head_epochs")  # a number, or "auto" (train.phases.head_schedule)
    fine_tune_epochs: int | None = _D("fine_tune_epochs")  # None: the task's default
    unfreeze: int | str = _D("unfreeze")  # blocks, "all", or "auto" until resolved
    mode: str = _D("mode")
    time_budget: float | None = _D("time_budget")
    unfreeze_schedule: str = _D("unfreeze_schedule")
    heads: int = _D("heads")
    calibrate: str = _D("calibrate")
    threshold: float | str = _D("threshold")  # multi-label: one for all labels, or "auto"
    lr: float | str = _D("lr")  # a rate, or "auto": the range test's
    fine_tune_lr: float | str | None = _D("fine_tune_lr")  # None: the task's default
    schedule: str = _D("schedule")
    weight_decay: float = _D("weight_decay")
    label_smoothing: float | str = _D("label_smoothing")
    lr_decay: float = _D("lr_decay")
    batch_size: int = _D("batch_size")
    augment: dict[str, float | bool] | None = _D("augment")  # parsed: None is no augmentation
    views: int | None = _D("views")  # None: the task's default
    augment_head: bool = _D("augment_head")
    precision: str = _D("precision")
    engine_precision: str = _D("engine_precision")
    strategy: str = _D("strategy")
    cache: bool = _D("cache")

    @property
    def fine_tunes(self) -> bool:
        """Phase 2 runs (every task's default number of epochs is above 0)."""
        return self.mode != "head" and (self.fine_tune_epochs is None
                                        or self.fine_tune_epochs > 0)

    def training(self):
        from graftkit.train.optimizer import Training

        return Training(self.schedule, self.weight_decay, self.label_smoothing, self.lr_decay,
                        parse_unfreeze_schedule(self.unfreeze_schedule))

    @property
    def fingerprint(self) -> dict:
        """What decides the result (the cache only decides the speed)."""
        out = dataclasses.asdict(self)
        out.pop("cache")
        out.pop("label_folds")  # looked at after training: no part of what it resumes
        return out

    def check(self) -> None:
        """Each value against its declaration (``Option.valid``, ``choices``), then the rules
        between options, which no single declaration can state: here, once."""
        for option in options_module.FIT_OPTIONS:
            option.check(getattr(self, option.name))
        try:
            parse_unfreeze_schedule(self.unfreeze_schedule)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.lr == "auto" and self.augment_head:
            raise UsageError("--lr auto runs its range test on cached features: drop "
                             "--augment-head, or give --lr a number")
        if self.fine_tune_lr == "auto" and (self.unfreeze == "all" or not self.fine_tunes):
            raise UsageError("--fine-tune-lr auto runs its range test on cached activations, "
                             "so it needs --unfreeze N (a number of blocks) and fine-tuning "
                             "epochs; or give --fine-tune-lr a number")
        if self.label_folds == 1:
            raise UsageError("--label-folds 1 leaves no images to train on: give 2 or more "
                             f"(default {defaults.LABEL_FOLDS}), or 0 to skip the search")
        if self.heads > 1 and self.augment_head:
            raise UsageError("--heads averages heads trained on cached features: drop "
                             "--augment-head, or use --heads 1")


def make_options(**given) -> FitOptions:
    """``fit``'s options parsed and checked, without TensorFlow (a typo costs no start-up).

    Options not given take their declared defaults; an unknown name is a ``TypeError``.
    """
    from graftkit.data.augment import check_augment, parse_augment

    unknown = sorted(set(given) - set(_OPTION_NAMES))
    if unknown:
        raise TypeError(f"unexpected option(s): {', '.join(unknown)}; see "
                        "graftkit.options.FIT_OPTIONS")
    v = {o.name: given.get(o.name, o.default) for o in options_module.FIT_OPTIONS}
    val = v["val"]
    options = FitOptions(**{
        **v,
        "base": str(v["base"]),
        "weights": None if v["weights"] is None else str(v["weights"]),
        "unfreeze": parse_unfreeze(v["unfreeze"]),
        "lr": number_or_auto(v["lr"], "--lr"),
        "threshold": number_or_auto(v["threshold"], "--threshold"),
        "multi_label": bool(v["multi_label"]),
        "label_sep": str(v["label_sep"]),
        "fine_tune_lr": (None if v["fine_tune_lr"] is None
                         else number_or_auto(v["fine_tune_lr"], "--fine-tune-lr")),
        "augment": (check_augment(dict(v["augment"])) if isinstance(v["augment"], dict)
                    else parse_augment(v["augment"])),
        "val": None if val is None else (str(val) if str(val).startswith("tfds:")
                                         else str(Path(val).resolve())),
        "time_budget": None if v["time_budget"] is None else float(v["time_budget"]),
        "weight_decay": float(v["weight_decay"]),
        "label_smoothing": number_or_auto(v["label_smoothing"], "--label-smoothing"),
        "dropout": number_or_auto(v["dropout"], "--dropout"),
        "head_epochs": count_or_auto(v["head_epochs"], "--head-epochs"),
        "lr_decay": float(v["lr_decay"]),
        "unfreeze_schedule": str(v["unfreeze_schedule"]),
        "heads": int(v["heads"]),
        "label_folds": int(v["label_folds"]),
    })
    options.check()
    return options


_OPTION_NAMES = tuple(o.name for o in options_module.FIT_OPTIONS)


def check_inputs(data_dir, out, options: FitOptions, overwrite: bool,
                 tensorboard: bool = False) -> None:
    """What a typo or a missing extra breaks, checked before any TensorFlow work: data, base,
    weights, --out, TensorBoard."""
    import importlib.util

    from graftkit.backbones.registry import check_base_name
    from graftkit.data.folder import check_data_path
    from graftkit.outputs.run import check_run_dir

    check_data_path(data_dir)
    if options.val is not None:
        check_data_path(options.val, "validation data")
    if options.test is not None:
        check_data_path(options.test, "test data")
    check_base_name(options.base)
    if options.weights not in (None, "imagenet") and not Path(options.weights).is_file():
        from graftkit.errors import BackboneError

        raise BackboneError(f"weights file not found: {options.weights}; pass an existing file "
                            "or leave --weights out for the ImageNet weights")
    check_run_dir(out, overwrite)
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--tensorboard needs TensorBoard: pip install 'graftkit[tensorboard]'")


def fit(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    tensorboard: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    deterministic: bool = True,
    unsafe: bool = False,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    previous: str | os.PathLike | None = None,
    **options,
) -> Classifier:
    """Fine-tune a pretrained base on an image folder and write a run folder.

    Args:
        data_dir: one subfolder per class, ``train/`` and ``val/`` folders of them, a CSV/TSV
            of ``path,label`` rows (paths relative to the file), or ``tfds:NAME[:SPLIT]``.
        out: the run folder to write (refused if it holds a finished run, unless ``overwrite``;
            an unfinished run of the same command there is resumed).
        tensorboard: TensorBoard logs of both phases in ``out/tensorboard/``. Defaults to False.
        overwrite: replace a finished run in ``out``. Defaults to False.
        resume: require a checkpoint in ``out`` and continue it (one is used anyway when
            present). Defaults to False.
        deterministic: TensorFlow's deterministic ops, so a seed gives the same figures.
            Defaults to True.
        unsafe: allow a ``.keras`` base that contains code (Lambda layers). Defaults to False.
        verbose: Keras' verbosity; 0 also hides progress bars. Defaults to "auto".
        log: where the run's log lines go. Defaults to ``print``.
        previous: a run on an earlier state of the data (``graft refit``): the log says how
            many images are new, relabelled or gone since. Defaults to None.
        **options: the training options below, each declared once in
            ``graftkit.options.FIT_OPTIONS`` (the same as ``graft fit``'s, docs/cli.md).

    Options:
{OPTIONS}

    Returns:
        The trained ``graftkit.Classifier`` (``predict``, ``predict_proba``, ``evaluate``), with
        ``model``, ``classes``, ``metrics`` (as in ``metrics.json``) and ``run_dir``: the same
        kind of object ``graftkit.load(run_dir)`` gives later.

    Example:
        >>> clf = graftkit.fit("photos/", out="runs/photos")  # doctest: +SKIP
        >>> clf.metrics["val_accuracy"]  # doctest: +SKIP
        >>> clf.predict(["new/photo.jpg"])[0].label  # doctest: +SKIP
    """
    fit_options = make_options(**options)
    check_inputs(data_dir, out, fit_options, overwrite, tensorboard)
    with _session(out, fit_options, overwrite) as (run_dir, dist):
        run = RunContext(run_dir, dist, log, verbose, bars=progress_factory(verbose != 0),
                         previous=Path(previous) if previous is not None else None)
        data, resumed, built, training, cut, frozen = _prepare(
            run, fit_options, data_dir, overwrite, resume, deterministic, unsafe, tensorboard)
        with dist.scope():  # both phases build and compile their models under the strategy
            stages.train_head_phase(run, built, data, training, cut, frozen, resumed)
            stages.fine_tune_phase(run, built, data, training, cut, frozen, resumed)
        mode = stages.choose_mode(run, built.options, training, cut, built)
        return finish(run, built, data, training, cut, frozen, resumed, mode)


fit.__doc__ = (fit.__doc__ or "").replace("{OPTIONS}", options_module.docstring())
fit.__signature__ = options_module.signature_with_options(fit)  # type: ignore[attr-defined]


@contextlib.contextmanager
def _session(out, options: FitOptions, overwrite: bool):
    """The strategy, the run folder and the dtype policy of one run; tidy on every exit.

    A lost peer of a multi-worker run becomes one ``ClusterError``; a run that wrote nothing
    leaves no empty folder; the caller's Keras dtype policy is restored.
    """
    import keras

    from graftkit.outputs.run import prepare_run_dir
    from graftkit.train.distribute import make_distribution, worker_failed

    dist = make_distribution(options.strategy)  # before any other TensorFlow work
    created = not Path(out).exists()
    # Only the chief writes the run folder; the others read a checkpoint from it to resume.
    run_dir = prepare_run_dir(out, overwrite) if dist.chief else Path(out)
    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(options.precision)
    try:
        yield run_dir, dist
    except Exception as exc:
        if dist.workers > 1 and worker_failed(exc):
            from graftkit.errors import ClusterError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(
                f"worker {dist.worker} of {dist.workers} lost the cluster ({first[:160]}); "
                f"every finished epoch is checkpointed in {run_dir}: start the same command on "
                "every worker to resume") from None
        _remove_if_empty(dist, created, run_dir)
        raise
    except BaseException:
        _remove_if_empty(dist, created, run_dir)
        raise
    finally:
        keras.mixed_precision.set_global_policy(policy)  # the caller's policy, as it was


def _remove_if_empty(dist, created: bool, run_dir: Path) -> None:
    if dist.chief and created and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()  # leave no empty folder behind a run that wrote nothing


def _prepare(run: RunContext, options: FitOptions, data_dir, overwrite: bool, resume: bool,
             deterministic: bool, unsafe: bool, tensorboard: bool
             ) -> tuple[PreparedData, Resume, ModelPlan, Training, CutPlan, FrozenOutputs | None]:
    """Every stage before training: what ``fit`` and ``lr_find`` share."""
    data = stages.scan_data(run, options, data_dir)
    resumed = stages.open_checkpoint(run, options, data, overwrite, resume)
    built = stages.build_model(run, options, data, resumed, deterministic, unsafe)
    training = stages.plan_phases(run, built, data, resumed, tensorboard)
    cut = stages.cut_base(run, built, training)
    frozen = stages.compute_frozen(run, built, data, cut)
    return data, resumed, built, training, cut, frozen


def lr_find(data_dir: str | os.PathLike, out: str | os.PathLike, phase: str = "head", *,
            overwrite: bool = True, deterministic: bool = True, unsafe: bool = False,
            verbose: int | str = "auto", log: Callable[[str], None] = print,
            **options) -> dict:
    """The learning-rate range test of one of ``graft fit``'s phases, without a full run.

    Runs ``fit``'s stages up to the test: ``phase="head"`` tests phase 1 on the cached
    features; ``"fine_tune"`` also trains phase 1 (quick, on features) and then tests phase 2
    on the cached activations from its weights. ``fit`` runs the same test itself for
    ``lr="auto"`` or ``fine_tune_lr="auto"``.

    Args:
        data_dir: as in ``fit``.
        out: the folder for the plot of loss against learning rate.
        phase: ``"head"`` or ``"fine_tune"``. Defaults to ``"head"``.
        overwrite: replace an earlier test in ``out``. Defaults to True.
        deterministic, unsafe, verbose, log: as in ``fit``.
        **options: ``fit``'s options (e.g. ``base``, ``unfreeze``, ``batch_size``).

    Returns:
        ``{phase: {"suggestion", "minimum", "steps", ...}}``: the suggested rate, the rate of
        the lowest loss and the number of steps the test took.

    Example:
        >>> graftkit.lr_find("photos/", "lr-test")["head"]["suggestion"]  # doctest: +SKIP
    """
    if phase not in ("head", "fine_tune"):
        raise UsageError(f"--phase must be head or fine-tune (got {phase!r})")
    options["lr"] = "auto" if phase == "head" else options.get("lr", defaults.HEAD_LR)
    if phase == "fine_tune":
        options["fine_tune_lr"] = "auto"
    fit_options = make_options(**options)
    check_inputs(data_dir, out, fit_options, overwrite)
    with _session(out, fit_options, overwrite) as (run_dir, dist):
        run = RunContext(run_dir, dist, log, verbose, writes=False,
                         bars=progress_factory(verbose != 0))
        data, resumed, built, training, cut, frozen = _prepare(
            run, fit_options, data_dir, overwrite, False, deterministic, unsafe, False)
        with dist.scope():
            if phase == "head":
                stages.head_range_test(run, built, data, training, cut, frozen)
            else:
                stages.train_head_phase(run, built, data, training, cut, frozen, resumed)
                stages.fine_tune_range_test(run, built, data, training, cut, frozen)
    return training.lr_tests
