"""``fit``: the whole pipeline in one call (data -> base -> graft -> phases -> scores -> run)."""

from __future__ import annotations

import dataclasses
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graftkit import defaults
from graftkit.errors import RunError, UsageError
from graftkit.options import number_or_auto, parse_unfreeze


@dataclass
class FitResult:
    """What ``fit`` produced: the trained model, its metrics and where the run was written."""

    model: object
    metrics: dict
    run_dir: Path
    classes: list[str]


@dataclass(frozen=True)
class FitOptions:
    """Everything that decides a run's result; a resumed run must match it exactly."""

    base: str
    weights: str | None
    image_size: int | None
    batch_size: int
    head_epochs: int
    fine_tune_epochs: int
    unfreeze: int | str
    lr: float | str  # or "auto": the learning-rate range test chooses (graftkit.lr_finder)
    fine_tune_lr: float | str
    augment: dict
    augment_head: bool
    val_split: float
    seed: int
    dropout: float
    class_weight: str
    val: str | None = None
    views: int = defaults.VIEWS
    precision: str = defaults.PRECISION
    cache: bool = True  # read and write frozen outputs in the cache directory
    strategy: str = "auto"  # graftkit.distribute.STRATEGIES
    mode: str = defaults.MODE  # defaults.MODES
    time_budget: float | None = None  # seconds for the whole run; fine-tuning stops to fit it
    schedule: str = defaults.LR_SCHEDULE  # graftkit.optimizer.SCHEDULES
    weight_decay: float = defaults.WEIGHT_DECAY
    label_smoothing: float | str = defaults.LABEL_SMOOTHING  # or "auto", decided with --unfreeze
    lr_decay: float = defaults.LR_DECAY
    unfreeze_schedule: str = defaults.UNFREEZE_SCHEDULE
    heads: int = defaults.HEADS

    @property
    def fine_tunes(self) -> bool:
        return self.mode != "head" and self.fine_tune_epochs > 0

    def training(self):
        from graftkit.optimizer import Training
        from graftkit.options import parse_unfreeze_schedule

        return Training(self.schedule, self.weight_decay, self.label_smoothing, self.lr_decay,
                        parse_unfreeze_schedule(self.unfreeze_schedule))

    @property
    def fingerprint(self) -> dict:
        """What decides the result (the cache only decides the speed)."""
        out = dataclasses.asdict(self)
        out.pop("cache")
        return out

    def check(self) -> None:
        if self.image_size is not None and self.image_size < 8:
            raise UsageError(f"--image-size must be at least 8 (got {self.image_size})")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be at least 1 (got {self.batch_size})")
        if self.head_epochs < 1:
            raise UsageError(f"--head-epochs must be at least 1 (got {self.head_epochs})")
        if self.fine_tune_epochs < 0:
            raise UsageError(f"--fine-tune-epochs must be 0 or more (got {self.fine_tune_epochs})")
        for name, value in (("--lr", self.lr), ("--fine-tune-lr", self.fine_tune_lr)):
            if value == "auto":
                continue
            if not 0 < value < 1:
                raise UsageError(f"{name} must be between 0 and 1 (got {value})")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"--dropout must be in [0, 1) (got {self.dropout})")
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be {' or '.join(PRECISIONS)} "
                             f"(got {self.precision!r})")
        if self.lr == "auto" and self.augment_head:
            raise UsageError("--lr auto runs its range test on cached features: drop "
                             "--augment-head, or give --lr a number")
        if self.fine_tune_lr == "auto" and (self.unfreeze == "all" or not self.fine_tunes):
            raise UsageError("--fine-tune-lr auto runs its range test on cached activations, "
                             "so it needs --unfreeze N (a number of blocks) and fine-tuning "
                             "epochs; or give --fine-tune-lr a number")
        if self.views < 1:
            raise UsageError(f"--views must be at least 1 (got {self.views})")
        from graftkit.distribute import STRATEGIES

        if self.strategy not in STRATEGIES:
            raise UsageError(f"--strategy must be one of {', '.join(STRATEGIES)} "
                             f"(got {self.strategy!r})")
        if self.heads < 1:
            raise UsageError(f"--heads must be at least 1 (got {self.heads})")
        if self.heads > 1 and self.augment_head:
            raise UsageError("--heads averages heads trained on cached features: drop "
                             "--augment-head, or use --heads 1")
        if self.mode not in defaults.MODES:
            raise UsageError(f"--mode must be one of {', '.join(defaults.MODES)} "
                             f"(got {self.mode!r})")
        if self.time_budget is not None and self.time_budget <= 0:
            raise UsageError(f"--time-budget must be a number of seconds above 0 "
                             f"(got {self.time_budget})")
        from graftkit.options import parse_unfreeze_schedule

        if self.schedule not in defaults.SCHEDULES:
            raise UsageError(f"--schedule must be one of {', '.join(defaults.SCHEDULES)} "
                             f"(got {self.schedule!r})")
        if not 0 <= self.weight_decay < 1:
            raise UsageError(f"--weight-decay must be in [0, 1) (got {self.weight_decay})")
        if self.label_smoothing != "auto" and not 0 <= self.label_smoothing < 1:
            raise UsageError(f"--label-smoothing must be in [0, 1) (got {self.label_smoothing})")
        if not 0 < self.lr_decay <= 1:
            raise UsageError(f"--lr-decay must be in (0, 1] (got {self.lr_decay})")
        try:
            parse_unfreeze_schedule(self.unfreeze_schedule)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        if self.class_weight not in ("auto", "none"):
            raise UsageError(f"--class-weight must be auto or none (got {self.class_weight!r})")


PRECISIONS = ("float32", "mixed_bfloat16")


def make_options(*, base, weights, image_size, batch_size, head_epochs, fine_tune_epochs,
                 unfreeze, lr, fine_tune_lr, augment, augment_head, val_split, seed, dropout,
                 class_weight, val, views, precision, cache, strategy, mode, time_budget,
                 schedule, weight_decay, label_smoothing, lr_decay, unfreeze_schedule,
                 heads) -> FitOptions:
    """``fit``'s options parsed and checked, without TensorFlow (a typo costs no start-up)."""
    from graftkit.data import parse_augment

    options = FitOptions(
        str(base), None if weights is None else str(weights), image_size, batch_size,
        head_epochs, fine_tune_epochs, parse_unfreeze(unfreeze), number_or_auto(lr, "--lr"),
        number_or_auto(fine_tune_lr, "--fine-tune-lr"),
        augment if isinstance(augment, dict) else parse_augment(augment), augment_head,
        val_split, seed, dropout, class_weight,
        None if val is None else (str(val) if str(val).startswith("tfds:")
                                  else str(Path(val).resolve())),
        views, precision, cache, strategy, mode,
        None if time_budget is None else float(time_budget), schedule, float(weight_decay),
        number_or_auto(label_smoothing, "--label-smoothing"), float(lr_decay),
        str(unfreeze_schedule), int(heads),
    )
    options.check()
    return options


def check_inputs(data_dir, out, options: FitOptions, overwrite: bool) -> None:
    """Paths a typo can break, checked before any TensorFlow work: data, base, weights, --out."""
    from graftkit.backbones.registry import check_base_name
    from graftkit.data import check_data_path
    from graftkit.run import check_run_dir

    if not 0.0 < options.val_split < 1.0:
        raise UsageError(f"--val-split must be between 0 and 1 (got {options.val_split})")
    check_data_path(data_dir)
    if options.val is not None:
        check_data_path(options.val, "validation data")
    check_base_name(options.base)
    if options.weights not in (None, "imagenet") and not Path(options.weights).is_file():
        from graftkit.errors import BackboneError

        raise BackboneError(f"weights file not found: {options.weights}; pass an existing file "
                            "or leave --weights out for the ImageNet weights")
    check_run_dir(out, overwrite)


def auto_unfreeze(num_train: int, size: int) -> tuple[int | str, str]:
    """``--unfreeze auto``: the whole base where that is cheap, else the top blocks (cached)."""
    work = num_train * (size / 224) ** 2
    if work <= defaults.FULL_FINE_TUNE_MAX_IMAGES:
        return "all", (f"{num_train} training images at {size} px: fine-tuning the whole base "
                       "is cheap")
    return defaults.UNFREEZE_TOP, (f"{num_train} training images at {size} px: the top "
                                   f"{defaults.UNFREEZE_TOP} blocks, trained on cached "
                                   "activations (--unfreeze all for the whole base)")


def fit(
    data_dir: str | os.PathLike,
    out: str | os.PathLike,
    base: str = defaults.DEFAULT_BACKBONE,
    weights: str | None = "imagenet",
    image_size: int | None = None,
    batch_size: int = defaults.BATCH_SIZE,
    head_epochs: int = defaults.HEAD_EPOCHS,
    fine_tune_epochs: int = defaults.FINE_TUNE_EPOCHS,
    unfreeze: int | str = defaults.UNFREEZE,
    lr: float | str = defaults.HEAD_LR,
    fine_tune_lr: float | str = defaults.FINE_TUNE_LR,
    augment: str | dict | None = None,
    augment_head: bool = False,
    val_split: float = defaults.VAL_SPLIT,
    seed: int = defaults.SEED,
    dropout: float = defaults.DROPOUT,
    class_weight: str = "auto",
    val: str | os.PathLike | None = None,
    views: int = defaults.VIEWS,
    precision: str = defaults.PRECISION,
    cache: bool = True,
    strategy: str = "auto",
    mode: str = defaults.MODE,
    time_budget: float | None = None,
    schedule: str = defaults.LR_SCHEDULE,
    weight_decay: float = defaults.WEIGHT_DECAY,
    label_smoothing: float | str = defaults.LABEL_SMOOTHING,
    lr_decay: float = defaults.LR_DECAY,
    unfreeze_schedule: str = defaults.UNFREEZE_SCHEDULE,
    heads: int = defaults.HEADS,
    unsafe: bool = False,
    tensorboard: bool = False,
    overwrite: bool = False,
    resume: bool = False,
    deterministic: bool = True,
    verbose: int | str = "auto",
    log: Callable[[str], None] = print,
    _stop_after: str | None = None,  # "head" or "fine_tune": lr_find's range tests only
) -> FitResult:
    """Fine-tune a pretrained base on an image folder and write a run folder.

    Args:
        data_dir: one subfolder per class, ``train/`` and ``val/`` folders of them, or a
            CSV/TSV of ``path,label`` rows (paths relative to the file).
        out: the run folder to write (refused if it holds a finished run, unless ``overwrite``;
            an unfinished run of the same command there is resumed).
        base: a backbone name (``graft backbones``) or a ``.keras`` model file.
        weights: ``"imagenet"``, ``None`` for random, or a local weights file.
        augment: None for the defaults, ``"none"``, a spec like ``"flip,zoom=0.2"``, or a dict.
        augment_head: run phase 1 the guide's way, through the frozen base every epoch with
            fresh augmentation (otherwise it trains on cached features of ``views`` views).
        views: views per training image computed once by the frozen part of the base (the
            image itself and ``views - 1`` augmented ones); epoch ``e`` trains on view
            ``e % views``.
        cache: keep frozen outputs in the cache directory, so a new run on the same images
            (other head settings, other seed) skips the frozen base.
        precision: ``"float32"`` or ``"mixed_bfloat16"`` (Keras policy; the head stays float32).
            float32 is the default: bfloat16 measured slower on this CPU (README).
        unfreeze: ``"all"`` or the number of top blocks to fine-tune (a number: trained on
            cached activations at the cut, when the backbone can be cut there).
        val: validation data given explicitly (a class folder or a CSV/TSV).
        class_weight: ``"auto"`` weighs classes when the largest has more than 1.5x the
            training images of the smallest; ``"none"`` never does.
        resume: require a checkpoint in ``out`` and continue it (it is used anyway if present).
        deterministic: TensorFlow's deterministic ops, so a seed gives the same figures.
        unsafe: allow a ``.keras`` base that contains code (Lambda layers).
        tensorboard: write TensorBoard logs of both phases to ``out/tensorboard/``.
        strategy: ``"auto"`` (several GPUs: mirrored, else default), ``"default"``,
            ``"mirrored"`` or ``"multi-worker"`` (``TF_CONFIG``); ``batch_size`` is per replica
            and both learning rates scale with the replicas (``graftkit.distribute``).
        mode: ``"auto"`` fine-tunes and keeps the result only if it beats the head on
            validation (stopping early when it does not); ``"head"`` never fine-tunes;
            ``"fine-tune"`` runs every fine-tuning epoch (best weights still kept).
        time_budget: seconds for the whole run: fine-tuning stops before an epoch that would
            end past it (and is skipped if phase 1 used it up).
        schedule: ``"cosine"`` (warm-up, then cosine), ``"one-cycle"`` or ``"constant"``,
            per phase; ``weight_decay`` (AdamW), ``label_smoothing`` (``"auto"``: 0.1 where the
            whole base is fine-tuned, else 0); ``lr_decay`` < 1 gives
            each lower unfrozen block that times the rate of the one above (discriminative
            rates); ``unfreeze_schedule``: ``"none"``, ``"gradual"`` (one more block per
            epoch) or start epochs like ``"0,1,3"``.
        heads: phase 1 trains this many heads from different seeds on the cached features
            and averages their weights (for linear heads, exactly averaging their logits).

    Example:
        >>> result = graftkit.fit("photos/", out="runs/photos")  # doctest: +SKIP
        >>> result.metrics["val_accuracy"]  # doctest: +SKIP
    """
    from graftkit.run import prepare_run_dir

    options = make_options(
        base=base, weights=weights, image_size=image_size, batch_size=batch_size,
        head_epochs=head_epochs, fine_tune_epochs=fine_tune_epochs, unfreeze=unfreeze, lr=lr,
        fine_tune_lr=fine_tune_lr, augment=augment, augment_head=augment_head,
        val_split=val_split, seed=seed, dropout=dropout, class_weight=class_weight, val=val,
        views=views, precision=precision, cache=cache, strategy=strategy, mode=mode,
        time_budget=time_budget, schedule=schedule, weight_decay=weight_decay,
        label_smoothing=label_smoothing, lr_decay=lr_decay, unfreeze_schedule=unfreeze_schedule,
        heads=heads)
    check_inputs(data_dir, out, options, overwrite)
    if tensorboard:
        try:
            import tensorboard as _tb  # noqa: F401
        except ImportError:
            raise UsageError("--tensorboard needs TensorBoard: pip install 'graftkit[tensorboard]'"
                             ) from None
    from graftkit.distribute import make_distribution

    dist = make_distribution(options.strategy)  # before any other TensorFlow work
    created = not Path(out).exists()
    # Only the chief writes the run folder; the others read a checkpoint from it to resume.
    run_dir = prepare_run_dir(out, overwrite) if dist.chief else Path(out)
    import keras

    policy = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(options.precision)
    try:
        return _fit(data_dir, run_dir, options, overwrite, resume, deterministic,
                    unsafe, tensorboard, verbose, log, dist, _stop_after)
    except Exception as exc:
        from graftkit.distribute import worker_failed

        if dist.workers > 1 and worker_failed(exc):
            from graftkit.errors import ClusterError

            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ClusterError(
                f"worker {dist.worker} of {dist.workers} lost the cluster ({first[:160]}); "
                f"every finished epoch is checkpointed in {run_dir}: start the same command on "
                "every worker to resume") from None
        raise
    except BaseException:
        if dist.chief and created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # leave no empty folder behind a run that wrote nothing
        raise
    finally:
        keras.mixed_precision.set_global_policy(policy)  # the caller's policy, as it was


def class_weights(labels: list[int], num_classes: int, mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights (mean 1) when the imbalance passes the threshold."""
    counts = [labels.count(c) for c in range(num_classes)]
    present = [n for n in counts if n]
    if mode == "none" or max(present) <= defaults.IMBALANCE_RATIO * min(present):
        return None
    total = sum(counts)
    return {c: (total / (num_classes * n) if n else 0.0) for c, n in enumerate(counts)}


def auto_image_size(folder, native: int) -> tuple[int, str]:
    """Photos: a little above the backbone's pretraining size; tiny images: not upscaled much."""
    import statistics

    target = max(32, round(native * defaults.NATIVE_SIZE_SCALE / 32) * 32)  # nearest multiple
    why = f"{defaults.NATIVE_SIZE_SCALE:g}x the backbone's {native} px pretraining size"
    sides = [min(p.width, p.height) for path in folder.train.paths
             if (p := folder.probes.get(path)) is not None and p.width]
    if not sides:
        return target, why
    median = statistics.median(sides)
    small = max(defaults.MIN_AUTO_IMAGE_SIZE, -(-int(defaults.MAX_UPSCALE * median) // 32) * 32)
    if small >= target:
        return target, why
    return small, (f"the training images' median side is {median:g} px: upscaled at most "
                   f"{defaults.MAX_UPSCALE}x; --image-size to choose")


def _check_free_space(run_dir: Path, model) -> None:
    """Model file plus checkpoints (weights, optimizer moments, best copy), with a margin."""
    need = model.count_params() * 4 * 6 + 50_000_000
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise RunError(f"{run_dir} has {free / 1e6:.0f} MB free; this run needs about "
                       f"{need / 1e6:.0f} MB: free some space or choose another --out")


def _fit(data_dir, run_dir: Path, opt: FitOptions, overwrite: bool, resume: bool,
         deterministic: bool, unsafe: bool, tensorboard: bool, verbose, log,
         dist, stop_after: str | None = None) -> FitResult:
    from graftkit.check import WARNING, report
    from graftkit.checkpoint import RunCheckpoint
    from graftkit.data import DecodedImages, make_dataset, scan
    from graftkit.progress import progress_factory

    started = time.perf_counter()
    progress = progress_factory(verbose != 0)
    folder = scan(data_dir, opt.val_split, opt.seed, val=opt.val, progress=progress)
    log(f"data: {len(folder.classes)} classes, {len(folder.train)} training and "
        f"{len(folder.val)} validation images ({folder.split_source}); "
        f"{len(folder.skipped)} files skipped")
    checked = report(folder)
    for g in checked.groups():
        if g["severity"] == WARNING:
            log(f"  check: {g['kind']}: {g['message']}"
                + (f" (e.g. {Path(g['examples'][0]).name})" if g["examples"] else ""))

    fingerprint = {**opt.fingerprint, "data": str(folder.root.resolve()),
                   "classes": folder.classes, "num_train": len(folder.train),
                   "num_val": len(folder.val)}
    ckpt = RunCheckpoint(run_dir, fingerprint, writable=dist.chief and not stop_after)
    if ckpt.exists and overwrite:
        ckpt.remove()
    if resume and not ckpt.exists:
        raise RunError(f"nothing to resume in {run_dir}: no checkpoint there; drop --resume")
    state = ckpt.load() if ckpt.exists and not overwrite else None
    from graftkit.devices import describe

    log(describe())
    if dist.name != "default":
        log(f"strategy: {dist.describe()}; batch {dist.batch_size(opt.batch_size)} in all "
            f"({opt.batch_size} per replica), learning rates x{dist.replicas}")
    if state:
        log(f"resuming: {len(state['phases'])} phase(s) done, "
            f"{state['epoch']} epoch(s) of the current one")

    import keras
    import tensorflow as tf

    from graftkit.backbones import load_base
    from graftkit.distribute import eval_batch_size
    from graftkit.features import FrozenPart, cut_blocks, extract, part_key, split_base
    from graftkit.graft import build_classifier
    from graftkit.schedule import (
        Best,
        PhaseResult,
        Schedule,
        find_head_lr,
        find_top_lr,
        fine_tune,
        fine_tune_on_activations,
        train_head,
        train_head_on_features,
    )

    if deterministic:
        tf.config.experimental.enable_op_determinism()
    resumed_epochs = state["epoch"] if state else 0
    keras.utils.set_random_seed(opt.seed + resumed_epochs)  # a resume replays no random stream
    from graftkit.backbones import REGISTRY

    image_size, size_reason = opt.image_size, "given"
    if image_size is None and opt.base in REGISTRY:
        image_size, size_reason = auto_image_size(folder, REGISTRY[opt.base].input_size)
    with dist.scope():  # variables made here are mirrored over the replicas
        base_model, info = load_base(opt.base, image_size, opt.weights, unsafe)
        model = build_classifier(base_model, len(folder.classes), opt.dropout)
    if dist.chief:
        _check_free_space(run_dir, model)
    size = info.image_size
    log(f"base: {info.name} at {size}x{size}"
        + (f" ({size_reason})" if size_reason != "given" else "")
        + f" (preprocessing {info.preprocessing})")
    unfreeze_reason = "given"
    if opt.unfreeze == "auto":
        resolved, unfreeze_reason = auto_unfreeze(len(folder.train), size)
        opt = dataclasses.replace(opt, unfreeze=resolved)
        if opt.fine_tunes:
            log(f"unfreeze auto: {resolved} ({unfreeze_reason})")
        if opt.fine_tune_lr == "auto" and resolved == "all":
            raise UsageError(f"--fine-tune-lr auto needs --unfreeze N: {unfreeze_reason}")
    if opt.label_smoothing == "auto":
        whole = opt.unfreeze == "all" and opt.fine_tunes
        opt = dataclasses.replace(
            opt, label_smoothing=defaults.LABEL_SMOOTHING_WHOLE_BASE if whole else 0.0)
    weights = class_weights(folder.train.labels, len(folder.classes), opt.class_weight)
    if weights:
        log("  class weights (imbalanced training set): "
            + ", ".join(f"{folder.classes[c]} {w:.2f}" for c, w in weights.items()))

    batch_size = dist.batch_size(opt.batch_size)
    def scaled(lr):  # a rate the range test finds is already for the global batch
        return lr if lr == "auto" else dist.learning_rate(lr)

    schedule = Schedule(opt.head_epochs, opt.fine_tune_epochs, scaled(opt.lr),
                        scaled(opt.fine_tune_lr), opt.unfreeze, verbose=verbose,
                        class_weight=weights, checkpoint=ckpt,
                        tensorboard_dir=run_dir / "tensorboard" if tensorboard and dist.chief
                        else None, whole_batches=dist.replicas > 1,
                        val_batch_size=eval_batch_size(len(folder.val), batch_size, dist.replicas),
                        training=opt.training(), heads=opt.heads,
                        deadline=None if opt.time_budget is None else started + opt.time_budget)
    if opt.mode == "fine-tune":
        schedule.patience = None  # every epoch runs; the best weights are still kept
    best = Best()
    lr_tests: dict[str, dict] = {}
    phases: list[PhaseResult] = []
    if state:
        phases = [PhaseResult(**p) for p in state["phases"]]
        schedule.history = list(state["history"])
        if state.get("best"):
            best = Best(state["best"]["val_accuracy"], state["best"]["val_loss"],
                        ckpt.best_weights())
    if dist.chief and not stop_after:
        from graftkit.run import HISTORY_FILE, HistoryLog
        from graftkit.schedule import HISTORY_COLUMNS

        schedule.history_log = HistoryLog(run_dir / HISTORY_FILE, HISTORY_COLUMNS)
        schedule.history_log.reset(schedule.history)

    # Cut the base below the blocks phase 2 fine-tunes: everything under the cut is frozen, so
    # its output is computed once per image and view (and cached across runs).
    ft_epochs = opt.fine_tune_epochs if opt.fine_tunes else 0
    fine_tune_top = cut_blocks(opt.unfreeze, ft_epochs) > 0
    split = split_base(base_model, info.block_pattern, opt.unfreeze) if fine_tune_top else None
    if fine_tune_top and split is None:
        log(f"  note: {info.name} cannot be cut below its top {opt.unfreeze} blocks (a skip "
            "connection crosses the cut); phase 2 runs through the whole base")
    cached_phase2 = split is not None
    if opt.fine_tune_lr == "auto" and not cached_phase2:
        raise UsageError(f"--fine-tune-lr auto runs its range test on cached activations, and "
                         f"{info.name} cannot be cut below its top {opt.unfreeze} blocks: give "
                         "--fine-tune-lr a number")
    if split is None:
        split = split_base(base_model, info.block_pattern, 0)
    views = opt.views if opt.augment else 1
    need_cache = (not phases and not opt.augment_head) or (cached_phase2 and len(phases) < 2)
    frozen_model = split.frozen_model()
    engine_key = part_key(frozen_model, size, f"{split.cut}:{opt.precision}")  # before training
    if need_cache:
        # Under a strategy the frozen part runs on Keras (GPUs; TFLite is a CPU engine).
        frozen = FrozenPart(frozen_model, engine_key,
                            use_tflite=False if dist.name != "default" else None)
        frozen.notify = log
        store_key = frozen.key if opt.cache else None
        extract_start = time.perf_counter()
        shared = 0  # outputs this worker computed into the cache for all of them
        if dist.workers > 1 and store_key:  # each worker computes its share into the cache
            mine = slice(dist.worker, None, dist.workers)
            shared = extract(frozen, folder.train.paths[mine], folder.digests(folder.train)[mine],
                             size, views, opt.augment, store_key).computed
            shared += extract(frozen, folder.val.paths[mine], folder.digests(folder.val)[mine],
                              size, 1, None, store_key).computed
            dist.barrier()  # then everyone reads all rows (a cache not shared: computes the rest)
        train_ex = extract(frozen, folder.train.paths, folder.digests(folder.train), size, views,
                           opt.augment, store_key, progress=progress)
        val_ex = extract(frozen, folder.val.paths, folder.digests(folder.val), size, 1, None,
                         store_key, progress=progress)
        extract_seconds = time.perf_counter() - extract_start
        computed = shared + train_ex.computed + val_ex.computed
        total = len(folder.train) * views + len(folder.val)
        log(f"frozen base: {total - computed} of {total} outputs from the cache, {computed} "
            f"computed{' here' if shared else ''} ({frozen.engine}, {extract_seconds:.1f} s)"
            + (f"; {views} views per training image" if views > 1 else ""))
        if train_ex.on_disk or val_ex.on_disk:
            log(f"  more than {defaults.FEATURE_MEMORY_BUDGET >> 20} MB of frozen outputs: kept "
                "in a scratch file and read a batch at a time")
    y_train, y_val = folder.train.labels, folder.val.labels

    with dist.scope():  # both phases build and compile their models under the strategy
        if not phases:
            if not opt.augment_head:
                schedule.history = []  # phase 1 on features is quick: it runs again from the start
                if schedule.history_log is not None:
                    schedule.history_log.reset([])
                k = 0 if split.top is None else 1  # the pooled features among the frozen outputs
                pooled, pooled_val = train_ex.output(k), val_ex.views[0][k]
                what = (f"{views} cached views per image" if views > 1
                        else "features computed once by the frozen base")
                if schedule.head_lr == "auto":
                    test = find_head_lr(model, pooled, y_train, schedule, batch_size, opt.seed)
                    schedule.head_lr = test.suggestion
                    lr_tests["head"] = _lr_test_done(test, "head", run_dir, dist.chief, log)
                    if stop_after == "head":
                        return FitResult(None, {"lr_find": lr_tests}, run_dir, folder.classes)
                log(f"phase 1: head on {what}")
                phases.append(train_head_on_features(
                    model, pooled, y_train, pooled_val, y_val, schedule, best, batch_size,
                    opt.seed, extract_seconds, f"on {what}"))
            else:
                log(f"phase 1: head on the frozen base, augmentation {opt.augment} every epoch")
                train_ds = make_dataset(folder.train.paths, y_train, size, batch_size,
                                        shuffle=True, augment=opt.augment, seed=opt.seed,
                                        drop_remainder=schedule.whole_batches)
                val_ds = make_dataset(folder.val.paths, y_val, size, schedule.val_batch_size)
                phases.append(train_head(model, base_model, train_ds, val_ds, schedule, best))
            ckpt.save_phase([dataclasses.asdict(p) for p in phases], schedule.history, best)
        else:
            model.set_weights(best.weights)
        out_of_time = schedule.deadline is not None and time.perf_counter() >= schedule.deadline
        if ft_epochs > 0 and len(phases) < 2 and out_of_time:
            log(f"phase 2: skipped, the time budget ({opt.time_budget:g} s) is used up")
        elif ft_epochs > 0 and len(phases) < 2:
            what = "all" if opt.unfreeze == "all" else f"top {opt.unfreeze} blocks"
            if cached_phase2:
                if schedule.fine_tune_lr == "auto":
                    test = find_top_lr(model, base_model, info.block_pattern, split.top,
                                       train_ex.output(0), y_train, schedule, batch_size,
                                       opt.seed)
                    schedule.fine_tune_lr = test.suggestion
                    lr_tests["fine_tune"] = _lr_test_done(test, "fine_tune", run_dir, dist.chief,
                                                          log)
                    if stop_after == "fine_tune":
                        return FitResult(None, {"lr_find": lr_tests}, run_dir, folder.classes)
                log(f"phase 2: fine-tuning {what} of the base at lr {schedule.fine_tune_lr:g} on cached "
                    "activations, BatchNormalization frozen")
                phases.append(fine_tune_on_activations(
                    model, base_model, info.block_pattern, split.top, train_ex.output(0), y_train,
                    val_ex.views[0][0], y_val, schedule, best, batch_size, opt.seed))
            else:
                log(f"phase 2: fine-tuning {what} of the base at lr {schedule.fine_tune_lr:g}, "
                    "BatchNormalization frozen")
                decoded = DecodedImages(folder.train.paths, size, progress=progress)
                try:
                    train_ds = make_dataset(decoded, y_train, size, batch_size, shuffle=True,
                                            augment=opt.augment or None,
                                            seed=opt.seed + resumed_epochs,
                                            drop_remainder=schedule.whole_batches)
                    val_ds = make_dataset(folder.val.paths, y_val, size, schedule.val_batch_size)
                    phases.append(fine_tune(model, base_model, info.block_pattern, train_ds, val_ds,
                                            schedule, best))
                finally:
                    decoded.close()
            ckpt.save_phase([dataclasses.asdict(p) for p in phases], schedule.history, best)

    bottom_unchanged = cached_phase2 or ft_epochs == 0
    mode = _mode_chosen(opt, phases, ft_epochs, schedule)
    mode.update(unfreeze=opt.unfreeze, unfreeze_reason=unfreeze_reason, image_size=size,
                image_size_reason=size_reason)
    log(f"mode {opt.mode}: {mode['chosen'].replace('_', '-')} ({mode['reason']})")
    train_ex = val_ex = None  # the cached rows are done with: free them before the last pass
    from graftkit.features import release_memory

    release_memory()
    digest = weights_sha256(model)
    if not dist.chief:
        log(f"worker {dist.worker} of {dist.workers}: done, final weights sha256 {digest[:16]} "
            f"(the chief writes {run_dir})")
        return FitResult(model, {"worker": dist.worker, "weights_sha256": digest}, run_dir,
                         folder.classes)
    if dist.strategy is not None:  # the chief alone evaluates and saves: a copy off the strategy
        import keras

        plain = keras.models.clone_model(model)
        plain.set_weights(model.get_weights())
        model = plain
    result = _write_run(run_dir, model, folder, info, phases, schedule, opt, weights, checked,
                        started, engine_key if bottom_unchanged else None,
                        frozen if need_cache and bottom_unchanged else None,
                        {"strategy": dist.name, "replicas": dist.replicas,
                         "workers": dist.workers, "weights_sha256": digest},
                        {"head": schedule.head_lr, "fine_tune": schedule.fine_tune_lr,
                         "range_tests": lr_tests or None}, mode)
    if dist.workers > 1:
        log(f"worker 0 of {dist.workers} (chief): final weights sha256 {digest[:16]}")
    ckpt.remove()
    return result


def _mode_chosen(opt: FitOptions, phases: list, ft_epochs: int, schedule) -> dict:
    """Which model the run ended with (the head alone or fine-tuned) and why, for the report."""
    head = phases[0]
    out = {"requested": opt.mode, "time_budget": opt.time_budget,
           "head_val_accuracy": head.best_val_accuracy}
    if ft_epochs == 0:
        why = ("--mode head" if opt.mode == "head" else "--fine-tune-epochs 0")
        return {**out, "chosen": "head", "reason": why}
    if len(phases) < 2:
        return {**out, "chosen": "head",
                "reason": f"the time budget ({opt.time_budget:g} s) ran out in phase 1"}
    ft = phases[1]
    own = [r["val_accuracy"] for r in schedule.history if r["phase"] == "fine_tune"]
    out["fine_tune_val_accuracy"] = max(own) if own else None
    out["fine_tune_seconds"] = round(ft.seconds, 2)
    stopped = ""
    if ft.epochs < ft_epochs:
        late = schedule.deadline is not None and time.perf_counter() >= schedule.deadline - 1
        stopped = ", stopped by the time budget" if late else ", stopped early"
    if ft.improved:
        gain = ft.best_val_accuracy - head.best_val_accuracy
        why = (f"validation {head.best_val_accuracy:.4f} -> {ft.best_val_accuracy:.4f} "
               f"({gain:+.4f}) for {ft.seconds:.1f} s of fine-tuning")
        if gain == 0:
            why += ", same accuracy at a lower validation loss"
        why += stopped
        return {**out, "chosen": "fine_tune", "reason": why}
    why = (f"fine-tuning did not beat the head on validation in {ft.epochs} epoch"
           f"{'' if ft.epochs == 1 else 's'} (best {out['fine_tune_val_accuracy'] or 0:.4f} vs "
           f"{head.best_val_accuracy:.4f}{stopped}): the head's weights are kept")
    return {**out, "chosen": "head", "reason": why}


def _lr_test_done(test, phase: str, run_dir: Path, write: bool, log) -> dict:
    """Log and plot a range test; its figures for metrics.json."""
    name = f"lr_find_{phase}.png"
    if write:
        test.plot(run_dir / name, f"learning-rate range test, {phase.replace('_', '-')} phase")
    log(f"lr auto ({phase.replace('_', '-')}): range test over {len(test.lrs)} steps suggests "
        f"{test.suggestion:.3g} (steepest fall of the loss; its minimum at {test.minimum:.3g})"
        + (f"; plot: {run_dir / name}" if write else ""))
    return {**test.as_dict(), "plot": name if write else None}


def lr_find(data_dir: str | os.PathLike, out: str | os.PathLike, phase: str = "head",
            **options) -> dict:
    """The learning-rate range tests of ``graft fit``'s phases, without training the model.

    ``phase="head"`` tests phase 1 on the cached features; ``"fine_tune"`` also runs phase 1
    (quick, on features) and then tests phase 2 on the cached activations from its weights.
    Plots go to ``out``; returns ``{phase: {"suggestion", "minimum", "steps", ...}}``.
    """
    if phase not in ("head", "fine_tune"):
        raise UsageError(f"--phase must be head or fine-tune (got {phase!r})")
    options["lr"] = "auto" if phase == "head" else options.get("lr", defaults.HEAD_LR)
    if phase == "fine_tune":
        options["fine_tune_lr"] = "auto"
    result = fit(data_dir, out, _stop_after=phase, **options)
    return result.metrics["lr_find"]


def weights_sha256(model) -> str:
    """A digest of every weight: equal on every worker of a run that stayed in sync."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def _write_run(run_dir, model, folder, info, phases, schedule, opt: FitOptions, weights,
               checked, started, engine_key: str | None, frozen=None,
               distribution: dict | None = None, learning_rates: dict | None = None,
               mode: dict | None = None):
    import keras
    import tensorflow as tf

    from graftkit import __version__
    from graftkit.evaluate import predict_proba, scores
    from graftkit.features import SplitClassifier, cut_blocks
    from graftkit.run import (
        CONFUSION_FILE,
        CURVES_FILE,
        HISTORY_FILE,
        LABELS_FILE,
        METRICS_FILE,
        MODEL_FILE,
        PREDICTIONS_FILE,
        SPLIT_FILE,
        best_row,
        plot_confusion,
        plot_history,
        save_model,
        write_history,
        write_json,
        write_predictions,
    )
    from graftkit.schedule import HISTORY_COLUMNS

    fast = None
    if engine_key:  # the frozen bottom is still the pretrained one the engine was made of
        top_n = cut_blocks(opt.unfreeze, opt.fine_tune_epochs if opt.fine_tunes else 0)
        try:
            fast = SplitClassifier(model, info.block_pattern, top_n, engine_key, frozen)
        except ValueError:
            fast = None
    probs = predict_proba(model, folder.val.paths, fast=fast)
    result = scores(folder.val.labels, probs, folder.classes)
    metrics = {
        "val_accuracy": result["accuracy"],
        "balanced_accuracy": result["balanced_accuracy"],
        "backbone": info.name,
        "image_size": info.image_size,
        "data": str(folder.root),
        "preprocessing": info.preprocessing,
        "classes": folder.classes,
        "num_train": len(folder.train),
        "num_val": len(folder.val),
        "split": folder.split_source,
        "skipped_files": folder.skipped,
        "phases": [
            {"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 2),
             "best_val_accuracy": p.best_val_accuracy, "note": p.note, "improved": p.improved}
            for p in phases
        ],
        "total_seconds": round(time.perf_counter() - started, 2),
        "engine": engine_key,
        "precision": opt.precision,
        "distribution": distribution or {"strategy": "default", "replicas": 1, "workers": 1},
        "learning_rates": learning_rates,
        "mode": mode,
        "options": dataclasses.asdict(opt),
        "class_weight": {folder.classes[c]: w for c, w in weights.items()} if weights else None,
        "per_class": result["per_class"],
        "confusion_matrix": result["confusion_matrix"],
        "check": {"status": checked.status,
                  "findings": [g for g in checked.groups() if g["severity"] != "note"]},
        "versions": {"graftkit": __version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__, "python": platform.python_version()},
    }
    save_model(model, run_dir / MODEL_FILE)
    write_json(run_dir / LABELS_FILE, folder.classes)
    write_json(run_dir / SPLIT_FILE, {
        "train": [[p, folder.classes[y]] for p, y in zip(folder.train.paths, folder.train.labels)],
        "val": [[p, folder.classes[y]] for p, y in zip(folder.val.paths, folder.val.labels)],
        # Content digests: graft evaluate warns when its images are training images.
        "train_sha256": folder.digests(folder.train),
    })
    write_predictions(run_dir / PREDICTIONS_FILE, folder.val.paths, folder.val.labels, probs,
                      folder.classes)
    write_history(run_dir / HISTORY_FILE, schedule.history, HISTORY_COLUMNS)
    kept = ("head",) if mode and mode.get("chosen") == "head" else ("head", "fine_tune")
    plot_history(schedule.history, run_dir / CURVES_FILE, best_row(schedule.history, kept))
    plot_confusion(result["confusion_matrix"], folder.classes, run_dir / CONFUSION_FILE)
    from graftkit.report import build_report

    build_report(run_dir, metrics)
    write_json(run_dir / METRICS_FILE, metrics)  # last: its presence marks a finished run
    return FitResult(model, metrics, run_dir, folder.classes)
