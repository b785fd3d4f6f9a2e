"""The training stages of ``graft fit``, in order, each from the records it reads to its own.

scan data -> open the checkpoint -> build the model (every "auto" resolved) -> plan the phases
-> cut the base -> compute frozen outputs -> phase 1 (head) -> phase 2 (fine-tune) -> choose
the model. ``graftkit.train.workflow.fit`` calls them in that order, then ``train.finish``
scores and writes the run; ``lr_find`` stops after the range test it wants. The records are in
``graftkit.train.records``. The order of statements (seeding, model building, random draws)
is the behaviour: deterministic runs depend on it.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from graftkit import defaults
from graftkit.errors import RunError, UsageError
from graftkit.task import task_of
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
    import keras

    from graftkit.data.folder import ImageFolder
    from graftkit.frozen.extract import Extracted
    from graftkit.train.lr_range import RangeTest
    from graftkit.train.workflow import FitOptions


# --- data and checkpoint ------------------------------------------------------------------

def scan_data(run: RunContext, options: FitOptions, data_dir) -> PreparedData:
    """Decode every file once; log what was found and what ``graft check`` says of it."""
    from graftkit.data.checks import WARNING, find_problems
    from graftkit.data.folder import scan

    folder = scan(data_dir, options.val_split, options.seed, val=options.val,
                  bars=run.bars, test=options.test, multi_label=options.multi_label,
                  label_sep=options.label_sep)
    held_out = f", {len(folder.test)} held-out test images" if folder.test_source else ""
    kind = (f"{len(folder.classes)} labels (several per image)" if folder.multi_label
            else f"{len(folder.classes)} classes")
    run.log(f"data: {kind}, {len(folder.train)} training and "
            f"{len(folder.val)} validation images ({folder.split_source}){held_out}; "
            f"{len(folder.skipped)} files skipped")
    if run.previous is not None:
        run.log(changes_since(run.previous, folder))
    checked = find_problems(folder)
    for g in checked.groups():
        if g["severity"] == WARNING:
            run.log(f"  check: {g['kind']}: {g['message']}"
                    + (f" (e.g. {Path(g['examples'][0]).name})" if g["examples"] else ""))
    return PreparedData(folder, checked)


def targets(folder: ImageFolder, split: str):
    """What the phases learn of a split: class indices, or multi-hot rows for label sets."""
    return task_of(folder.multi_label).targets(getattr(folder, split).labels,
                                               len(folder.classes))


def changes_since(previous: Path, folder: ImageFolder) -> str:
    """What a refit's data has that ``previous``'s had not: images new, relabelled, gone
    (by content, so a file moved to another class folder is relabelled, not new)."""
    from graftkit.outputs.run import read_split

    try:
        split = read_split(previous)
    except (RunError, OSError, ValueError):
        return f"since {previous}: its split.json cannot be read, so nothing to compare"
    before: dict[str, str] = {}
    for name in ("train", "val"):
        digests = split.get(f"{name}_sha256") or []
        for (_path, label), digest in zip(split.get(name, []), digests):
            before[digest] = label
        if not digests:  # a run older than val_sha256: its paths stand in
            before.update({f"path:{path}": label for path, label in split.get(name, [])})
    now: dict[str, str] = {}
    for s in (folder.train, folder.val):
        for path, digest, y in zip(s.paths, folder.digests(s), s.labels):
            old_style = f"path:{path}"
            now[old_style if digest not in before and old_style in before else digest] = \
                folder.label_text(y)
    new = sum(k not in before for k in now)
    relabelled = sum(k in before and before[k] != label for k, label in now.items())
    gone = sum(k not in now for k in before)
    return (f"since {previous}: {new} new image{'' if new == 1 else 's'}, {relabelled} "
            f"relabelled, {gone} gone; the frozen base runs only for images it has not seen "
            "(a relabelled image keeps its cached outputs)")


def open_checkpoint(run: RunContext, options: FitOptions, data: PreparedData, overwrite: bool,
                    resume: bool) -> Resume:
    """The run's checkpoint: refused if another command wrote it, read when resuming."""
    from graftkit.frozen.engine import describe_devices
    from graftkit.train.checkpoint import RunCheckpoint

    folder, dist = data.folder, run.dist
    fingerprint = {**options.fingerprint, "data": str(folder.root.resolve()),
                   "classes": folder.classes, "num_train": len(folder.train),
                   "num_val": len(folder.val)}
    checkpoint = RunCheckpoint(run.run_dir, fingerprint, writable=dist.chief and run.writes)
    if checkpoint.exists and overwrite:
        checkpoint.remove()
    if resume and not checkpoint.exists:
        raise RunError(f"nothing to resume in {run.run_dir}: no checkpoint there; drop --resume")
    state = checkpoint.load() if checkpoint.exists and not overwrite else None
    run.log(describe_devices(options.engine_precision))
    if dist.name != "default":
        run.log(f"strategy: {dist.describe()}; batch {dist.batch_size(options.batch_size)} in "
                f"all ({options.batch_size} per replica), learning rates x{dist.replicas}")
    if state:
        run.log(f"resuming: {len(state['phases'])} phase(s) done, "
                f"{state['epoch']} epoch(s) of the current one")
    return Resume(checkpoint, state)


# --- the model and its "auto" choices -----------------------------------------------------

def auto_image_size(folder: ImageFolder, native: int) -> tuple[int, str]:
    """Photos: a little above the backbone's pretraining size; tiny images: not upscaled much."""
    target = defaults.photo_image_size(native)
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


def auto_unfreeze(num_train: int, size: int) -> tuple[int | str, str]:
    """``--unfreeze auto``: the whole base where that is cheap, else the top blocks (cached)."""
    work = num_train * (size / defaults.FULL_FINE_TUNE_SIZE) ** 2
    if work <= defaults.FULL_FINE_TUNE_MAX_IMAGES:
        return "all", (f"{num_train} training images at {size} px: fine-tuning the whole base "
                       "is cheap")
    return defaults.UNFREEZE_TOP, (f"{num_train} training images at {size} px: the top "
                                   f"{defaults.UNFREEZE_TOP} blocks, trained on cached "
                                   "activations (--unfreeze all for the whole base)")


def class_weights(labels: list[int], num_classes: int, mode: str) -> dict[int, float] | None:
    """Inverse-frequency weights (mean 1) when the imbalance passes the threshold."""
    counts = [labels.count(c) for c in range(num_classes)]
    present = [n for n in counts if n]
    if mode == "none" or max(present) <= defaults.IMBALANCE_RATIO * min(present):
        return None
    total = sum(counts)
    return {c: (total / (num_classes * n) if n else 0.0) for c, n in enumerate(counts)}


@dataclasses.dataclass(frozen=True)
class Resolved:
    """``--unfreeze``, ``--label-smoothing`` and ``--dropout`` "auto" as values, and why."""

    options: FitOptions
    unfreeze_reason: str = "given"


def resolve_auto(options: FitOptions, num_train: int, size: int,
                 multi_label: bool = False) -> Resolved:
    """The "auto" options as values for ``num_train`` images at ``size`` px (no model needed),
    and the task's phase 2 rate and epochs and cached views where none were given."""
    reason = "given"
    task: dict[str, Any] = {  # option: (one class per image, several labels per image)
        "fine_tune_lr": (defaults.FINE_TUNE_LR, defaults.FINE_TUNE_LR_MULTI_LABEL),
        "fine_tune_epochs": (defaults.FINE_TUNE_EPOCHS, defaults.FINE_TUNE_EPOCHS_MULTI_LABEL),
        "views": (defaults.VIEWS, defaults.VIEWS_MULTI_LABEL)}
    options = dataclasses.replace(options, **{name: values[multi_label]
                                              for name, values in task.items()
                                              if getattr(options, name) is None})
    if options.unfreeze == "auto":
        resolved, reason = auto_unfreeze(num_train, size)
        options = dataclasses.replace(options, unfreeze=resolved)
        if options.fine_tune_lr == "auto" and resolved == "all":
            raise UsageError(f"--fine-tune-lr auto needs --unfreeze N: {reason}")
    whole = options.unfreeze == "all" and options.fine_tunes
    if options.label_smoothing == "auto":
        options = dataclasses.replace(
            options, label_smoothing=defaults.LABEL_SMOOTHING_WHOLE_BASE if whole else 0.0)
    if options.dropout == "auto":
        options = dataclasses.replace(
            options, dropout=defaults.DROPOUT_WHOLE_BASE if whole else defaults.DROPOUT_CACHED)
    return Resolved(options, reason)


def _check_free_space(run_dir: Path, model: keras.Model) -> None:
    """Model file plus checkpoints (weights, optimizer moments, best copy), with a margin."""
    need = model.count_params() * defaults.BYTES_PER_PARAM_ON_DISK + defaults.DISK_MARGIN
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise RunError(f"{run_dir} has {free / 1e6:.0f} MB free; this run needs about "
                       f"{need / 1e6:.0f} MB: free some space or choose another --out")


def build_model(run: RunContext, options: FitOptions, data: PreparedData, resume: Resume,
                deterministic: bool, unsafe: bool) -> ModelPlan:
    """Seed every stream, build the base at its image size, resolve every "auto" for that
    size, and graft the head (with its resolved dropout) on the base."""
    import keras
    import tensorflow as tf

    from graftkit.backbones import REGISTRY, load_base
    from graftkit.graft import build_classifier

    folder = data.folder
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(options.seed + resume.epochs)  # a resume replays no stream
    image_size, size_reason = options.image_size, "given"
    if image_size is None and options.base in REGISTRY:
        image_size, size_reason = auto_image_size(folder, REGISTRY[options.base].input_size)
    with run.dist.scope():  # variables made here are mirrored over the replicas
        base_model, info = load_base(options.base, image_size, options.weights, unsafe)
        resolved = resolve_auto(options, len(folder.train), info.image_size,
                                folder.multi_label)
        options = resolved.options
        model = build_classifier(base_model, len(folder.classes), cast(float, options.dropout),
                                 task_of(folder.multi_label).activation)
    if run.dist.chief:
        _check_free_space(run.run_dir, model)
    run.log(f"base: {info.name} at {info.image_size}x{info.image_size}"
            + (f" ({size_reason})" if size_reason != "given" else "")
            + f" (preprocessing {info.preprocessing})")
    if resolved.unfreeze_reason != "given" and options.fine_tunes:
        run.log(f"unfreeze auto: {options.unfreeze} ({resolved.unfreeze_reason})")
    weights = None if folder.multi_label else class_weights(
        folder.train.labels, len(folder.classes), options.class_weight)
    if weights:
        run.log("  class weights (imbalanced training set): "
                + ", ".join(f"{folder.classes[c]} {w:.2f}" for c, w in weights.items()))
    return ModelPlan(options, base_model, model, info, size_reason, resolved.unfreeze_reason,
                     weights)


# --- the phases' plan and the cut ---------------------------------------------------------

def plan_phases(run: RunContext, built: ModelPlan, data: PreparedData, resume: Resume,
                tensorboard: bool) -> Training:
    """The ``PhasePlan`` of both phases; what a resumed checkpoint already finished."""
    from graftkit.train.distribute import eval_batch_size
    from graftkit.train.phases import Best, PhasePlan, PhaseResult, head_schedule

    options, dist = built.options, run.dist
    batch_size = dist.batch_size(options.batch_size)
    # "auto" adds steps where they are nearly free: on cached features, not through the base
    epochs, head_steps = head_schedule(
        defaults.HEAD_EPOCHS if options.augment_head else options.head_epochs,
        len(data.folder.train), batch_size, dist.replicas > 1)

    def scaled(lr):  # a rate the range test finds is already for the global batch
        return lr if lr == "auto" else dist.learning_rate(lr)

    plan = PhasePlan(
        epochs, cast(int, options.fine_tune_epochs), scaled(options.lr),
        scaled(options.fine_tune_lr), options.unfreeze, verbose=run.verbose,
        class_weight=built.class_weight, checkpoint=resume.checkpoint,
        tensorboard_dir=run.run_dir / "tensorboard" if tensorboard and dist.chief else None,
        whole_batches=dist.replicas > 1,
        val_batch_size=eval_batch_size(len(data.folder.val), batch_size, dist.replicas),
        training=options.training(), heads=options.heads,
        deadline=None if options.time_budget is None else run.started + options.time_budget,
        head_steps=head_steps,
        task=task_of(data.folder.multi_label))
    if options.mode == "fine-tune":
        plan.patience = None  # every epoch runs; the best weights are still kept
    training = Training(batch_size, plan, Best())
    if resume.state:
        training.phases = [PhaseResult(**p) for p in resume.state["phases"]]
        plan.history = list(resume.state["history"])
        if resume.state.get("best"):
            training.best = Best(resume.state["best"]["val_accuracy"],
                                 resume.state["best"]["val_loss"],
                                 resume.checkpoint.best_weights())
    if dist.chief and run.writes:
        from graftkit.outputs.run import HISTORY_FILE, HistoryLog

        plan.history_log = HistoryLog(run.run_dir / HISTORY_FILE, plan.task.history_columns)
        plan.history_log.reset(plan.history)
    return training


def cut_base(run: RunContext, built: ModelPlan, training: Training) -> CutPlan:
    """Cut the base below the blocks phase 2 fine-tunes: what is under the cut is frozen, so
    its output is computed once per image and view (and cached across runs)."""
    from graftkit.frozen.cut import cut_blocks, part_key, split_base

    options, info = built.options, built.info
    ft_epochs = cast(int, options.fine_tune_epochs) if options.fine_tunes else 0
    fine_tune_top = cut_blocks(options.unfreeze, ft_epochs, options.mode) > 0
    split = (split_base(built.base_model, info.block_pattern, int(options.unfreeze))
             if fine_tune_top else None)
    if fine_tune_top and split is None:
        run.log(f"  note: {info.name} cannot be cut below its top {options.unfreeze} blocks (a "
                "skip connection crosses the cut); phase 2 runs through the whole base")
    cached_phase2 = split is not None
    if options.fine_tune_lr == "auto" and not cached_phase2:
        raise UsageError(f"--fine-tune-lr auto runs its range test on cached activations, and "
                         f"{info.name} cannot be cut below its top {options.unfreeze} blocks: "
                         "give --fine-tune-lr a number")
    split = split if split is not None else split_base(built.base_model, info.block_pattern, 0)
    assert split is not None  # a cut below no block: the whole base frozen, always possible
    views = cast(int, options.views) if options.augment else 1
    need_cache = ((not training.phases and not options.augment_head)
                  or (cached_phase2 and len(training.phases) < 2))
    if (options.augment and views == 1 and not options.augment_head
            and (cached_phase2 or not ft_epochs)):
        run.log("  note: --views 1 caches each training image as it is and both phases train "
                "on that, so --augment is never applied (--views 2 or more to use it)")
    frozen_model = split.frozen_model()
    engine_key = part_key(frozen_model, built.size,
                          f"{split.cut}:{options.precision}")  # before any training
    # The label issues need the pretrained features of every plain image: when no phase
    # caches them (phase 1 through the base, or done before a resume), the chief computes
    # those alone, before any training changes the base.
    label_rows = not need_cache and options.label_folds > 0 and run.dist.chief
    return CutPlan(ft_epochs, split, cached_phase2, views, need_cache, label_rows, frozen_model,
                   engine_key)


def compute_frozen(run: RunContext, built: ModelPlan, data: PreparedData,
                   cut: CutPlan) -> FrozenOutputs | None:
    """The frozen part's outputs for every training view and validation image (cached)."""
    from graftkit.frozen.engine import FrozenPart
    from graftkit.frozen.extract import extract
    from graftkit.frozen.precision import engine_settings, resolve

    if not cut.need_cache and not cut.label_rows:
        return None
    options, dist, folder, size, views = built.options, run.dist, data.folder, built.size, cut.views
    augment = options.augment
    if not cut.need_cache:  # the plain images only, for the label issues
        views, augment = 1, None
    whole_base = options.unfreeze == "all" and options.fine_tunes
    precision, why, calibration = engine_settings(folder, size, options.engine_precision,
                                                  whole_base)
    # Under a strategy the frozen part runs on Keras (GPUs; TFLite is a CPU engine).
    part = FrozenPart(cut.frozen_model, cut.engine_key,
                      converted=False if dist.name != "default" else None, fixed_batch=True,
                      precision=precision, calibration=calibration)
    part.notify = run.log
    part.precision_reason = why
    part.always_convert = options.engine_precision == "int8"
    # The engine by the size of the whole job, never by what is cached: the same command
    # computes (or reads) the same rows whatever ran before.
    part.plan(len(folder.train) * views + len(folder.val), reuse_engine=False)
    if precision != "f32" or resolve(options.engine_precision)[0] != "f32":
        run.log(f"engine precision: {part.precision} ({part.precision_reason})")
    store_key = part.store_key if options.cache else None
    start = time.perf_counter()
    shared = 0  # outputs this worker computed into the cache for all of them
    if dist.workers > 1 and store_key and cut.need_cache:  # each worker computes its share
        mine = slice(dist.worker, None, dist.workers)
        shared = extract(part, folder.train.paths[mine], folder.digests(folder.train)[mine],
                         size, views, augment, store_key).computed
        shared += extract(part, folder.val.paths[mine], folder.digests(folder.val)[mine],
                          size, 1, None, store_key).computed
        dist.barrier()  # then everyone reads all rows (a cache not shared: computes the rest)
    train_ex = extract(part, folder.train.paths, folder.digests(folder.train), size,
                       views, augment, store_key, bars=run.bars)
    val_ex = extract(part, folder.val.paths, folder.digests(folder.val), size, 1, None,
                     store_key, bars=run.bars)
    seconds = time.perf_counter() - start
    computed = shared + train_ex.computed + val_ex.computed
    total = len(folder.train) * views + len(folder.val)
    run.log(f"frozen base: {total - computed} of {total} outputs from the cache, {computed} "
            f"computed{' here' if shared else ''} ({part.label}, {seconds:.1f} s)"
            + (f"; {views} views per training image" if views > 1 else "")
            + ("; the plain images, for the label issues" if not cut.need_cache else ""))
    if train_ex.on_disk or val_ex.on_disk:
        run.log(f"  more than {defaults.FEATURE_MEMORY_BUDGET >> 20} MB of frozen outputs: "
                "kept in a scratch file and read a batch at a time")
    return FrozenOutputs(part, train_ex, val_ex, seconds, computed, total)


def _rows(frozen: FrozenOutputs | None) -> tuple[Extracted, Extracted]:
    """The cached rows, which the phases on cached outputs need (compute_frozen made them)."""
    if frozen is None or frozen.train is None or frozen.val is None:
        raise RuntimeError("no frozen outputs: compute_frozen must run before this phase")
    return frozen.train, frozen.val


# --- range tests (lr auto, graft lr-find) -------------------------------------------------

def _lr_test_done(run: RunContext, test: RangeTest, phase: str) -> dict:
    """Log and plot a range test; its figures for metrics.json."""
    from graftkit.train.lr_range import why

    name = f"lr_find_{phase}.png"
    write = run.dist.chief
    if write:
        test.plot(run.run_dir / name, f"learning-rate range test, {phase.replace('_', '-')} phase")
    if run.writes:  # graft lr-find prints its suggestion once, as its answer
        run.log(f"lr auto ({phase.replace('_', '-')}): range test over {len(test.lrs)} steps "
                f"suggests {test.suggestion:.3g} ({why(test.as_dict())})"
                + (f"; plot: {run.run_dir / name}" if write else ""))
    return {**test.as_dict(), "plot": name if write else None}


def _pooled(cut: CutPlan, frozen: FrozenOutputs | None):
    """Pooled features of the training views and of the validation images."""
    train_ex, val_ex = _rows(frozen)
    k = 0 if cut.split.top is None else 1  # the pooled features among the frozen outputs
    return train_ex.output(k), val_ex.views[0][k]


def head_range_test(run: RunContext, built: ModelPlan, data: PreparedData,
                    training: Training, cut: CutPlan, frozen: FrozenOutputs | None) -> None:
    """Phase 1's learning-rate range test on the cached features; the rate it suggests."""
    from graftkit.train.phases import find_head_lr

    pooled, _ = _pooled(cut, frozen)
    test = find_head_lr(built.model, pooled, targets(data.folder, "train"), training.plan,
                        training.batch_size, built.options.seed)
    training.plan.head_lr = test.suggestion
    training.lr_tests["head"] = _lr_test_done(run, test, "head")


def fine_tune_range_test(run: RunContext, built: ModelPlan, data: PreparedData,
                         training: Training, cut: CutPlan,
                         frozen: FrozenOutputs | None) -> None:
    """Phase 2's range test on the cached activations, from phase 1's weights."""
    from graftkit.train.phases import find_top_lr

    train_ex, _ = _rows(frozen)
    test = find_top_lr(built.model, built.base_model, built.info.block_pattern, cut.split.top,
                       train_ex.output(0), targets(data.folder, "train"), training.plan,
                       training.batch_size, built.options.seed)
    training.plan.fine_tune_lr = test.suggestion
    training.lr_tests["fine_tune"] = _lr_test_done(run, test, "fine_tune")


# --- the phases ---------------------------------------------------------------------------

def train_head_phase(run: RunContext, built: ModelPlan, data: PreparedData,
                     training: Training, cut: CutPlan, frozen: FrozenOutputs | None,
                     resume: Resume) -> None:
    """Phase 1: the head on cached features (or through the frozen base with --augment-head).

    A resumed run whose phase 1 is done takes its best weights back instead."""
    from graftkit.data.pipeline import make_dataset
    from graftkit.train.phases import steps, train_head, train_head_on_features

    options, plan, folder = built.options, training.plan, data.folder
    if training.phases:
        built.model.set_weights(training.best.weights)
        return
    y_train, y_val = targets(folder, "train"), targets(folder, "val")
    if not options.augment_head:
        plan.history = []  # phase 1 on features is quick: it runs again from the start
        if plan.history_log is not None:
            plan.history_log.reset([])
        pooled, pooled_val = _pooled(cut, frozen)
        what = (f"{cut.views} cached views per image" if cut.views > 1
                else "features computed once by the frozen base")
        if plan.head_lr == "auto":
            head_range_test(run, built, data, training, cut, frozen)
        passes = plan.head_steps / steps(len(y_train), training.batch_size, plan.whole_batches)
        more = (f", {plan.head_epochs} epochs of {plan.head_steps} steps ({passes:.3g} passes "
                f"over {len(y_train)} training images: at least {defaults.MIN_HEAD_STEPS} "
                "steps in all)" if passes > 1 else "")
        run.log(f"phase 1: head on {what}{more}")
        training.phases.append(train_head_on_features(
            built.model, pooled, y_train, pooled_val, y_val, plan, training.best,
            training.batch_size, options.seed, f"on {what}"))
    else:
        run.log(f"phase 1: head on the frozen base, augmentation {options.augment} every epoch")
        train_ds = make_dataset(folder.train.paths, y_train, built.size, training.batch_size,
                                shuffle=True, augment=options.augment, seed=options.seed,
                                drop_remainder=plan.whole_batches)
        val_ds = make_dataset(folder.val.paths, y_val, built.size, cast(int, plan.val_batch_size))
        training.phases.append(train_head(built.model, built.base_model, train_ds, val_ds, plan,
                                          training.best))
    resume.checkpoint.save_phase([dataclasses.asdict(p) for p in training.phases],
                                 plan.history, training.best)


def fine_tune_phase(run: RunContext, built: ModelPlan, data: PreparedData, training: Training,
                    cut: CutPlan, frozen: FrozenOutputs | None, resume: Resume) -> None:
    """Phase 2: the top blocks on cached activations, or the whole base on decoded images."""
    options, plan = built.options, training.plan
    if cut.fine_tune_epochs == 0 or len(training.phases) >= 2:
        return
    if plan.deadline is not None and time.perf_counter() >= plan.deadline:
        run.log(f"phase 2: skipped, the time budget ({options.time_budget:g} s) is used up")
        return
    what = "all" if options.unfreeze == "all" else f"top {options.unfreeze} blocks"
    if cut.cached_phase2:
        _fine_tune_cached(run, built, data, training, cut, frozen, what)
    else:
        _fine_tune_whole(run, built, data, training, resume, what)
    resume.checkpoint.save_phase([dataclasses.asdict(p) for p in training.phases],
                                 plan.history, training.best)


def _fine_tune_cached(run: RunContext, built: ModelPlan, data: PreparedData,
                      training: Training, cut: CutPlan, frozen: FrozenOutputs | None,
                      what: str) -> None:
    from graftkit.train.phases import fine_tune_on_activations

    if training.plan.fine_tune_lr == "auto":
        fine_tune_range_test(run, built, data, training, cut, frozen)
    train_ex, val_ex = _rows(frozen)
    run.log(f"phase 2: fine-tuning {what} of the base at lr {training.plan.fine_tune_lr:g} on "
            "cached activations, BatchNormalization frozen")
    training.phases.append(fine_tune_on_activations(
        built.model, built.base_model, built.info.block_pattern, cut.split.top,
        train_ex.output(0), targets(data.folder, "train"), val_ex.views[0][0],
        targets(data.folder, "val"), training.plan, training.best, training.batch_size,
        built.options.seed))


def _fine_tune_whole(run: RunContext, built: ModelPlan, data: PreparedData,
                     training: Training, resume: Resume, what: str) -> None:
    from graftkit.data.pipeline import DecodedImages, make_dataset
    from graftkit.train.phases import fine_tune

    folder, plan = data.folder, training.plan
    run.log(f"phase 2: fine-tuning {what} of the base at lr {plan.fine_tune_lr:g}, "
            "BatchNormalization frozen")
    decoded = DecodedImages(folder.train.paths, built.size, bars=run.bars)
    try:
        train_ds = make_dataset(decoded, targets(folder, "train"), built.size,
                                training.batch_size,
                                shuffle=True, augment=built.options.augment or None,
                                seed=built.options.seed + resume.epochs,
                                drop_remainder=plan.whole_batches)
        val_ds = make_dataset(folder.val.paths, targets(folder, "val"), built.size,
                              cast(int, plan.val_batch_size))
        training.phases.append(fine_tune(built.model, built.base_model, built.info.block_pattern,
                                         train_ds, val_ds, plan, training.best))
    finally:
        decoded.close()


# --- the choice ---------------------------------------------------------------------------

def choose_mode(run: RunContext, options: FitOptions, training: Training, cut: CutPlan,
                built: ModelPlan) -> dict:
    """Which model the run ended with (the head alone or fine-tuned) and why, for the report."""
    phases, plan = training.phases, training.plan
    head = phases[0]
    out: dict[str, Any] = {"requested": options.mode, "time_budget": options.time_budget,
           "head_val_accuracy": head.best_val_accuracy}
    if cut.fine_tune_epochs == 0:
        why = ("--mode head" if options.mode == "head" else "--fine-tune-epochs 0")
        mode = {**out, "chosen": "head", "reason": why}
    elif len(phases) < 2:
        mode = {**out, "chosen": "head",
                "reason": f"the time budget ({options.time_budget:g} s) ran out in phase 1"}
    else:
        mode = _fine_tune_verdict(out, head, phases[1], cut.fine_tune_epochs, plan)
    mode.update(unfreeze=options.unfreeze, unfreeze_reason=built.unfreeze_reason,
                image_size=built.size, image_size_reason=built.size_reason)
    run.log(f"mode {options.mode}: {str(mode['chosen']).replace('_', '-')} ({mode['reason']})")
    return mode


def _fine_tune_verdict(out: dict, head, ft, ft_epochs: int, plan) -> dict:
    own = [r[f"val_{plan.task.monitor}"] for r in plan.history if r["phase"] == "fine_tune"]
    out["fine_tune_val_accuracy"] = max(own) if own else None
    out["fine_tune_seconds"] = round(ft.seconds, 2)
    stopped = ""
    if ft.epochs < ft_epochs:
        late = plan.deadline is not None and time.perf_counter() >= plan.deadline - 1
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
