"""The stages of ``graft fit``, in order, over one small state object (``FitState``).

scan data -> open the checkpoint -> build the model -> resolve the ``auto`` choices -> plan
the phases -> cut the base -> compute frozen outputs -> phase 1 (head) -> phase 2 (fine-tune)
-> choose the model -> write the run. ``graftkit.workflow.fit`` calls them in that order and
``lr_find`` stops after the range test it wants. Each stage reads what earlier ones put in the
state and adds its own fields; none reaches into another's locals. The order of statements
(seeding, model building, random draws) is the behaviour: deterministic runs depend on it.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from graftkit import defaults
from graftkit.errors import RunError, UsageError

if TYPE_CHECKING:
    from graftkit.classifier import Classifier


@dataclass
class FitState:
    """What one ``fit`` knows so far. Set at the start, then filled stage by stage."""

    opt: Any  # graftkit.train.workflow.FitOptions; its "auto" values are replaced as they resolve
    run_dir: Path
    dist: Any  # graftkit.train.distribute.Distribution
    log: Callable[[str], None]
    verbose: int | str
    writes: bool = True  # False for the range tests of lr-find: no checkpoint, no history
    started: float = field(default_factory=time.perf_counter)
    progress: Callable | None = None  # graftkit.progress.progress_factory(...)
    # scan_data
    folder: Any = None  # graftkit.data.folder.ImageFolder
    checked: Any = None  # graftkit.data.checks.CheckReport
    # open_checkpoint
    ckpt: Any = None  # graftkit.checkpoint.RunCheckpoint
    resumed: dict | None = None  # the checkpoint's state when resuming
    # build_model
    base_model: Any = None
    model: Any = None
    info: Any = None  # graftkit.backbones.BaseInfo
    size: int = 0
    size_reason: str = "given"
    # resolve_auto
    unfreeze_reason: str = "given"
    class_weight: dict[int, float] | None = None
    # plan_phases
    batch_size: int = 0
    plan: Any = None  # graftkit.train.phases.PhasePlan
    best: Any = None  # graftkit.train.phases.Best
    phases: list = field(default_factory=list)
    lr_tests: dict = field(default_factory=dict)
    # cut_base
    ft_epochs: int = 0
    split: Any = None  # graftkit.frozen.cut.BaseSplit
    cached_phase2: bool = False
    views: int = 1
    need_cache: bool = False
    frozen_model: Any = None  # pixels -> what the frozen part gives (see BaseSplit.frozen_model)
    engine_key: str = ""
    # compute_frozen
    frozen: Any = None  # graftkit.frozen.engine.FrozenPart
    train_ex: Any = None  # graftkit.frozen.extract.Extracted
    val_ex: Any = None
    extract_seconds: float = 0.0
    frozen_computed: int = 0  # frozen outputs computed (not read from the cache) by this run
    # choose_mode
    mode: dict | None = None

    @property
    def resumed_epochs(self) -> int:
        return self.resumed["epoch"] if self.resumed else 0


# --- data and checkpoint ------------------------------------------------------------------

def scan_data(s: FitState, data_dir) -> None:
    """Decode every file once; log what was found and what ``graft check`` says of it."""
    from graftkit.data.checks import WARNING, find_problems
    from graftkit.data.folder import scan

    opt = s.opt
    s.folder = scan(data_dir, opt.val_split, opt.seed, val=opt.val, progress=s.progress,
                    test=opt.test)
    held_out = f", {len(s.folder.test)} held-out test images" if s.folder.test_source else ""
    s.log(f"data: {len(s.folder.classes)} classes, {len(s.folder.train)} training and "
          f"{len(s.folder.val)} validation images ({s.folder.split_source}){held_out}; "
          f"{len(s.folder.skipped)} files skipped")
    s.checked = find_problems(s.folder)
    for g in s.checked.groups():
        if g["severity"] == WARNING:
            s.log(f"  check: {g['kind']}: {g['message']}"
                  + (f" (e.g. {Path(g['examples'][0]).name})" if g["examples"] else ""))


def open_checkpoint(s: FitState, overwrite: bool, resume: bool) -> None:
    """The run's checkpoint: refused if another command wrote it, read when resuming."""
    from graftkit.frozen.engine import describe_devices
    from graftkit.train.checkpoint import RunCheckpoint

    folder, dist = s.folder, s.dist
    fingerprint = {**s.opt.fingerprint, "data": str(folder.root.resolve()),
                   "classes": folder.classes, "num_train": len(folder.train),
                   "num_val": len(folder.val)}
    s.ckpt = RunCheckpoint(s.run_dir, fingerprint, writable=dist.chief and s.writes)
    if s.ckpt.exists and overwrite:
        s.ckpt.remove()
    if resume and not s.ckpt.exists:
        raise RunError(f"nothing to resume in {s.run_dir}: no checkpoint there; drop --resume")
    s.resumed = s.ckpt.load() if s.ckpt.exists and not overwrite else None
    s.log(describe_devices())
    if dist.name != "default":
        s.log(f"strategy: {dist.describe()}; batch {dist.batch_size(s.opt.batch_size)} in all "
              f"({s.opt.batch_size} per replica), learning rates x{dist.replicas}")
    if s.resumed:
        s.log(f"resuming: {len(s.resumed['phases'])} phase(s) done, "
              f"{s.resumed['epoch']} epoch(s) of the current one")


# --- the model ----------------------------------------------------------------------------

def auto_image_size(folder, native: int) -> tuple[int, str]:
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


def _check_free_space(run_dir: Path, model) -> None:
    """Model file plus checkpoints (weights, optimizer moments, best copy), with a margin."""
    need = model.count_params() * defaults.BYTES_PER_PARAM_ON_DISK + defaults.DISK_MARGIN
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise RunError(f"{run_dir} has {free / 1e6:.0f} MB free; this run needs about "
                       f"{need / 1e6:.0f} MB: free some space or choose another --out")


def build_model(s: FitState, deterministic: bool, unsafe: bool) -> None:
    """Seed every stream, then build the base at its image size and graft the head on it."""
    import keras
    import tensorflow as tf

    from graftkit.backbones import REGISTRY, load_base
    from graftkit.graft import build_classifier

    opt = s.opt
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.utils.set_random_seed(opt.seed + s.resumed_epochs)  # a resume replays no stream
    image_size, s.size_reason = opt.image_size, "given"
    if image_size is None and opt.base in REGISTRY:
        image_size, s.size_reason = auto_image_size(s.folder, REGISTRY[opt.base].input_size)
    with s.dist.scope():  # variables made here are mirrored over the replicas
        s.base_model, s.info = load_base(opt.base, image_size, opt.weights, unsafe)
        # "auto" is resolved with --unfreeze (resolve_auto), which needs the size built here;
        # the rate is only read when the model first runs.
        dropout = defaults.DROPOUT_WHOLE_BASE if opt.dropout == "auto" else opt.dropout
        s.model = build_classifier(s.base_model, len(s.folder.classes), dropout)
    if s.dist.chief:
        _check_free_space(s.run_dir, s.model)
    s.size = s.info.image_size
    s.log(f"base: {s.info.name} at {s.size}x{s.size}"
          + (f" ({s.size_reason})" if s.size_reason != "given" else "")
          + f" (preprocessing {s.info.preprocessing})")


# --- the "auto" choices -------------------------------------------------------------------

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


def resolve_auto(s: FitState) -> None:
    """``--unfreeze``, ``--label-smoothing`` and ``--dropout`` "auto" become values; class weights."""
    opt, folder = s.opt, s.folder
    if opt.unfreeze == "auto":
        resolved, s.unfreeze_reason = auto_unfreeze(len(folder.train), s.size)
        opt = dataclasses.replace(opt, unfreeze=resolved)
        if opt.fine_tunes:
            s.log(f"unfreeze auto: {resolved} ({s.unfreeze_reason})")
        if opt.fine_tune_lr == "auto" and resolved == "all":
            raise UsageError(f"--fine-tune-lr auto needs --unfreeze N: {s.unfreeze_reason}")
    whole = opt.unfreeze == "all" and opt.fine_tunes
    if opt.label_smoothing == "auto":
        opt = dataclasses.replace(
            opt, label_smoothing=defaults.LABEL_SMOOTHING_WHOLE_BASE if whole else 0.0)
    if opt.dropout == "auto":
        from graftkit.graft import HEAD_DROPOUT

        opt = dataclasses.replace(
            opt, dropout=defaults.DROPOUT_WHOLE_BASE if whole else defaults.DROPOUT_CACHED)
        s.model.get_layer(HEAD_DROPOUT).rate = opt.dropout
    s.opt = opt
    s.class_weight = class_weights(folder.train.labels, len(folder.classes), opt.class_weight)
    if s.class_weight:
        s.log("  class weights (imbalanced training set): "
              + ", ".join(f"{folder.classes[c]} {w:.2f}" for c, w in s.class_weight.items()))


# --- the phases' plan ---------------------------------------------------------------------

def plan_phases(s: FitState, tensorboard: bool) -> None:
    """The ``PhasePlan`` of both phases; what a resumed checkpoint already finished."""
    from graftkit.train.distribute import eval_batch_size
    from graftkit.train.phases import Best, PhasePlan, PhaseResult

    opt, dist = s.opt, s.dist
    s.batch_size = dist.batch_size(opt.batch_size)

    def scaled(lr):  # a rate the range test finds is already for the global batch
        return lr if lr == "auto" else dist.learning_rate(lr)

    s.plan = PhasePlan(
        opt.head_epochs, opt.fine_tune_epochs, scaled(opt.lr), scaled(opt.fine_tune_lr),
        opt.unfreeze, verbose=s.verbose, class_weight=s.class_weight, checkpoint=s.ckpt,
        tensorboard_dir=s.run_dir / "tensorboard" if tensorboard and dist.chief else None,
        whole_batches=dist.replicas > 1,
        val_batch_size=eval_batch_size(len(s.folder.val), s.batch_size, dist.replicas),
        training=opt.training(), heads=opt.heads,
        deadline=None if opt.time_budget is None else s.started + opt.time_budget)
    if opt.mode == "fine-tune":
        s.plan.patience = None  # every epoch runs; the best weights are still kept
    s.best = Best()
    if s.resumed:
        s.phases = [PhaseResult(**p) for p in s.resumed["phases"]]
        s.plan.history = list(s.resumed["history"])
        if s.resumed.get("best"):
            s.best = Best(s.resumed["best"]["val_accuracy"], s.resumed["best"]["val_loss"],
                          s.ckpt.best_weights())
    if dist.chief and s.writes:
        from graftkit.outputs.run import HISTORY_FILE, HistoryLog
        from graftkit.train.phases import HISTORY_COLUMNS

        s.plan.history_log = HistoryLog(s.run_dir / HISTORY_FILE, HISTORY_COLUMNS)
        s.plan.history_log.reset(s.plan.history)


def cut_base(s: FitState) -> None:
    """Cut the base below the blocks phase 2 fine-tunes: what is under the cut is frozen, so
    its output is computed once per image and view (and cached across runs)."""
    from graftkit.frozen.cut import cut_blocks, part_key, split_base

    opt, info = s.opt, s.info
    s.ft_epochs = opt.fine_tune_epochs if opt.fine_tunes else 0
    fine_tune_top = cut_blocks(opt.unfreeze, opt.fine_tune_epochs, opt.mode) > 0
    split = split_base(s.base_model, info.block_pattern, opt.unfreeze) if fine_tune_top else None
    if fine_tune_top and split is None:
        s.log(f"  note: {info.name} cannot be cut below its top {opt.unfreeze} blocks (a skip "
              "connection crosses the cut); phase 2 runs through the whole base")
    s.cached_phase2 = split is not None
    if opt.fine_tune_lr == "auto" and not s.cached_phase2:
        raise UsageError(f"--fine-tune-lr auto runs its range test on cached activations, and "
                         f"{info.name} cannot be cut below its top {opt.unfreeze} blocks: give "
                         "--fine-tune-lr a number")
    s.split = split if split is not None else split_base(s.base_model, info.block_pattern, 0)
    s.views = opt.views if opt.augment else 1
    s.need_cache = ((not s.phases and not opt.augment_head)
                    or (s.cached_phase2 and len(s.phases) < 2))
    if (opt.augment and s.views == 1 and not opt.augment_head
            and (s.cached_phase2 or not s.ft_epochs)):
        s.log("  note: --views 1 caches each training image as it is and both phases train on "
              "that, so --augment is never applied (--views 2 or more to use it)")
    s.frozen_model = s.split.frozen_model()
    s.engine_key = part_key(s.frozen_model, s.size,
                            f"{s.split.cut}:{opt.precision}")  # before any training


def compute_frozen(s: FitState) -> None:
    """The frozen part's outputs for every training view and validation image (cached)."""
    from graftkit.frozen.engine import FrozenPart
    from graftkit.frozen.extract import extract

    if not s.need_cache:
        return
    opt, dist, folder, size, views = s.opt, s.dist, s.folder, s.size, s.views
    # Under a strategy the frozen part runs on Keras (GPUs; TFLite is a CPU engine).
    s.frozen = FrozenPart(s.frozen_model, s.engine_key,
                          converted=False if dist.name != "default" else None, fixed_batch=True)
    s.frozen.notify = s.log
    # The engine by the size of the whole job, never by what is cached: the same command
    # computes (or reads) the same rows whatever ran before.
    s.frozen.plan(len(folder.train) * views + len(folder.val), reuse_engine=False)
    store_key = s.frozen.store_key if opt.cache else None
    start = time.perf_counter()
    shared = 0  # outputs this worker computed into the cache for all of them
    if dist.workers > 1 and store_key:  # each worker computes its share into the cache
        mine = slice(dist.worker, None, dist.workers)
        shared = extract(s.frozen, folder.train.paths[mine], folder.digests(folder.train)[mine],
                         size, views, opt.augment, store_key).computed
        shared += extract(s.frozen, folder.val.paths[mine], folder.digests(folder.val)[mine],
                          size, 1, None, store_key).computed
        dist.barrier()  # then everyone reads all rows (a cache not shared: computes the rest)
    s.train_ex = extract(s.frozen, folder.train.paths, folder.digests(folder.train), size,
                         views, opt.augment, store_key, progress=s.progress)
    s.val_ex = extract(s.frozen, folder.val.paths, folder.digests(folder.val), size, 1, None,
                       store_key, progress=s.progress)
    s.extract_seconds = time.perf_counter() - start
    computed = s.frozen_computed = shared + s.train_ex.computed + s.val_ex.computed
    total = len(folder.train) * views + len(folder.val)
    s.log(f"frozen base: {total - computed} of {total} outputs from the cache, {computed} "
          f"computed{' here' if shared else ''} ({s.frozen.label}, {s.extract_seconds:.1f} s)"
          + (f"; {views} views per training image" if views > 1 else ""))
    if s.train_ex.on_disk or s.val_ex.on_disk:
        s.log(f"  more than {defaults.FEATURE_MEMORY_BUDGET >> 20} MB of frozen outputs: kept "
              "in a scratch file and read a batch at a time")


# --- range tests (lr auto, graft lr-find) -------------------------------------------------

def _lr_test_done(s: FitState, test, phase: str) -> dict:
    """Log and plot a range test; its figures for metrics.json."""
    name = f"lr_find_{phase}.png"
    write = s.dist.chief
    if write:
        test.plot(s.run_dir / name, f"learning-rate range test, {phase.replace('_', '-')} phase")
    if s.writes:  # graft lr-find prints its suggestion once, as its answer
        s.log(f"lr auto ({phase.replace('_', '-')}): range test over {len(test.lrs)} steps "
              f"suggests {test.suggestion:.3g} (steepest fall of the loss; its minimum at "
              f"{test.minimum:.3g})" + (f"; plot: {s.run_dir / name}" if write else ""))
    return {**test.as_dict(), "plot": name if write else None}


def _pooled(s: FitState):
    """Pooled features of the training views and of the validation images."""
    k = 0 if s.split.top is None else 1  # the pooled features among the frozen outputs
    return s.train_ex.output(k), s.val_ex.views[0][k]


def head_range_test(s: FitState) -> None:
    """Phase 1's learning-rate range test on the cached features; the rate it suggests."""
    from graftkit.train.phases import find_head_lr

    pooled, _ = _pooled(s)
    test = find_head_lr(s.model, pooled, s.folder.train.labels, s.plan, s.batch_size,
                        s.opt.seed)
    s.plan.head_lr = test.suggestion
    s.lr_tests["head"] = _lr_test_done(s, test, "head")


def fine_tune_range_test(s: FitState) -> None:
    """Phase 2's range test on the cached activations, from phase 1's weights."""
    from graftkit.train.phases import find_top_lr

    test = find_top_lr(s.model, s.base_model, s.info.block_pattern, s.split.top,
                       s.train_ex.output(0), s.folder.train.labels, s.plan, s.batch_size,
                       s.opt.seed)
    s.plan.fine_tune_lr = test.suggestion
    s.lr_tests["fine_tune"] = _lr_test_done(s, test, "fine_tune")


# --- the phases ---------------------------------------------------------------------------

def train_head_phase(s: FitState) -> None:
    """Phase 1: the head on cached features (or through the frozen base with --augment-head).

    A resumed run whose phase 1 is done takes its best weights back instead."""
    from graftkit.data.pipeline import make_dataset
    from graftkit.train.phases import train_head, train_head_on_features

    opt, plan, folder = s.opt, s.plan, s.folder
    if s.phases:
        s.model.set_weights(s.best.weights)
        return
    y_train, y_val = folder.train.labels, folder.val.labels
    if not opt.augment_head:
        plan.history = []  # phase 1 on features is quick: it runs again from the start
        if plan.history_log is not None:
            plan.history_log.reset([])
        pooled, pooled_val = _pooled(s)
        what = (f"{s.views} cached views per image" if s.views > 1
                else "features computed once by the frozen base")
        if plan.head_lr == "auto":
            head_range_test(s)
        s.log(f"phase 1: head on {what}")
        s.phases.append(train_head_on_features(
            s.model, pooled, y_train, pooled_val, y_val, plan, s.best, s.batch_size,
            opt.seed, f"on {what}"))
    else:
        s.log(f"phase 1: head on the frozen base, augmentation {opt.augment} every epoch")
        train_ds = make_dataset(folder.train.paths, y_train, s.size, s.batch_size,
                                shuffle=True, augment=opt.augment, seed=opt.seed,
                                drop_remainder=plan.whole_batches)
        val_ds = make_dataset(folder.val.paths, y_val, s.size, plan.val_batch_size)
        s.phases.append(train_head(s.model, s.base_model, train_ds, val_ds, plan, s.best))
    s.ckpt.save_phase([dataclasses.asdict(p) for p in s.phases], plan.history, s.best)


def fine_tune_phase(s: FitState) -> None:
    """Phase 2: the top blocks on cached activations, or the whole base on decoded images."""
    opt, plan = s.opt, s.plan
    if s.ft_epochs == 0 or len(s.phases) >= 2:
        return
    if plan.deadline is not None and time.perf_counter() >= plan.deadline:
        s.log(f"phase 2: skipped, the time budget ({opt.time_budget:g} s) is used up")
        return
    what = "all" if opt.unfreeze == "all" else f"top {opt.unfreeze} blocks"
    if s.cached_phase2:
        _fine_tune_cached(s, what)
    else:
        _fine_tune_whole(s, what)
    s.ckpt.save_phase([dataclasses.asdict(p) for p in s.phases], plan.history, s.best)


def _fine_tune_cached(s: FitState, what: str) -> None:
    from graftkit.train.phases import fine_tune_on_activations

    if s.plan.fine_tune_lr == "auto":
        fine_tune_range_test(s)
    s.log(f"phase 2: fine-tuning {what} of the base at lr {s.plan.fine_tune_lr:g} on cached "
          "activations, BatchNormalization frozen")
    s.phases.append(fine_tune_on_activations(
        s.model, s.base_model, s.info.block_pattern, s.split.top, s.train_ex.output(0),
        s.folder.train.labels, s.val_ex.views[0][0], s.folder.val.labels, s.plan, s.best,
        s.batch_size, s.opt.seed))


def _fine_tune_whole(s: FitState, what: str) -> None:
    from graftkit.data.pipeline import DecodedImages, make_dataset
    from graftkit.train.phases import fine_tune

    folder, plan = s.folder, s.plan
    s.log(f"phase 2: fine-tuning {what} of the base at lr {plan.fine_tune_lr:g}, "
          "BatchNormalization frozen")
    decoded = DecodedImages(folder.train.paths, s.size, progress=s.progress)
    try:
        train_ds = make_dataset(decoded, folder.train.labels, s.size, s.batch_size,
                                shuffle=True, augment=s.opt.augment or None,
                                seed=s.opt.seed + s.resumed_epochs,
                                drop_remainder=plan.whole_batches)
        val_ds = make_dataset(folder.val.paths, folder.val.labels, s.size,
                              plan.val_batch_size)
        s.phases.append(fine_tune(s.model, s.base_model, s.info.block_pattern, train_ds, val_ds,
                                  plan, s.best))
    finally:
        decoded.close()


# --- the choice and the run folder --------------------------------------------------------

def choose_mode(s: FitState) -> None:
    """Which model the run ended with (the head alone or fine-tuned) and why, for the report."""
    opt, phases, plan = s.opt, s.phases, s.plan
    head = phases[0]
    out = {"requested": opt.mode, "time_budget": opt.time_budget,
           "head_val_accuracy": head.best_val_accuracy}
    if s.ft_epochs == 0:
        why = ("--mode head" if opt.mode == "head" else "--fine-tune-epochs 0")
        mode = {**out, "chosen": "head", "reason": why}
    elif len(phases) < 2:
        mode = {**out, "chosen": "head",
                "reason": f"the time budget ({opt.time_budget:g} s) ran out in phase 1"}
    else:
        mode = _fine_tune_verdict(out, head, phases[1], s.ft_epochs, plan)
    mode.update(unfreeze=opt.unfreeze, unfreeze_reason=s.unfreeze_reason, image_size=s.size,
                image_size_reason=s.size_reason)
    s.mode = mode
    s.log(f"mode {opt.mode}: {mode['chosen'].replace('_', '-')} ({mode['reason']})")


def _fine_tune_verdict(out: dict, head, ft, ft_epochs: int, plan) -> dict:
    own = [r["val_accuracy"] for r in plan.history if r["phase"] == "fine_tune"]
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


def finish(s: FitState) -> Classifier:
    """Free the cached rows; workers other than the chief stop here, the chief writes the run."""
    from graftkit.classifier import Classifier
    from graftkit.frozen.engine import release_memory
    from graftkit.graft import weights_digest, with_features

    dist = s.dist
    digest = weights_digest(s.model)
    if not dist.chief:
        s.train_ex = s.val_ex = None
        release_memory()
        s.log(f"worker {dist.worker} of {dist.workers}: done, final weights sha256 "
              f"{digest[:16]} (the chief writes {s.run_dir})")
        return Classifier(s.model, s.folder.classes,
                          {"worker": dist.worker, "weights_sha256": digest}, s.run_dir)
    if dist.strategy is not None:  # the chief alone evaluates and saves: a copy off the strategy
        import keras

        plain = keras.models.clone_model(s.model)
        plain.set_weights(s.model.get_weights())
        s.model = plain
    two = with_features(s.model)
    scorer, engine_key = _fast_scorer(s, two)
    train_features = _training_features(s, two, scorer)
    s.train_ex = s.val_ex = None  # the cached rows are done with: free them before the last pass
    release_memory()
    result = write_run(s, digest, two, scorer, engine_key, train_features)
    if dist.workers > 1:
        s.log(f"worker 0 of {dist.workers} (chief): final weights sha256 {digest[:16]}")
    s.ckpt.remove()
    return result


def _fast_scorer(s: FitState, model):
    """The split path of ``model`` (the final model, or ``with_features`` of it: frozen bottom
    on its engine) for the final scores, when still valid."""
    from graftkit.frozen.cut import SplitClassifier, cut_blocks

    bottom_unchanged = s.cached_phase2 or s.ft_epochs == 0
    if not bottom_unchanged:  # the whole base was fine-tuned: the engine no longer matches
        return None, None
    top_n = cut_blocks(s.opt.unfreeze, s.opt.fine_tune_epochs, s.opt.mode)
    frozen = s.frozen if s.need_cache else None
    try:
        return SplitClassifier(model, s.info.block_pattern, top_n, s.engine_key,
                               frozen), s.engine_key
    except ValueError:
        return None, s.engine_key


def _final_pass(s: FitState, two, paths: list[str], fast, label: str) -> list[np.ndarray]:
    """The final model's outputs for image files, with a progress bar: the end of a fit
    scores the training, validation and test images, and must not sit silent meanwhile."""
    from graftkit.outputs.evaluation import model_outputs

    bar = s.progress(label, len(paths)) if s.progress and len(paths) else None
    try:
        return model_outputs(two, paths, fast=fast,
                             progress=(lambda done, _total: bar.update(done)) if bar else None)
    finally:
        if bar:
            bar.close()


def _training_features(s: FitState, two, scorer) -> np.ndarray:
    """The final model's penultimate features of the plain training images (the open-set
    statistics): from the cached frozen outputs while they still hold, else one more pass."""

    ex = s.train_ex
    if scorer is not None and ex is not None:
        rows, out = ex.views[0][0], []  # view 0: the plain image
        for i in range(0, len(rows), 256):
            cut = np.asarray(rows[np.arange(i, min(i + 256, len(rows)))], dtype=np.float32)
            out.append(scorer.rest_outputs(cut)[0])
        return np.concatenate(out) if out else np.zeros((0, two.outputs[0].shape[-1]))
    start = time.perf_counter()
    features = _final_pass(s, two, s.folder.train.paths, scorer, "open set: training images")[0]
    s.log(f"open set: features of the {len(s.folder.train)} training images, one pass of the "
          f"final model ({time.perf_counter() - start:.1f} s)")
    return features


def calibrate_and_reject(s: FitState, two, features: np.ndarray, raw_probs: np.ndarray,
                         train_features: np.ndarray) -> tuple[np.ndarray, dict, Any, np.ndarray]:
    """Fold a temperature into the head (``--calibrate``) and fit the open-set score on the
    training features; ``(probabilities, calibration, open_set, validation scores)``."""
    from graftkit.graft import head_logits
    from graftkit.outputs import calibration, open_set

    labels = np.asarray(s.folder.val.labels)
    logits = head_logits(two, features)
    cal = calibration.calibrate(logits, labels, s.opt.calibrate)
    probs = raw_probs
    if cal["applied"]:
        calibration.fold_temperature(s.model, cal["temperature"])
        logits = head_logits(two, features)
        probs = calibration.softmax(logits).astype(np.float32)
    s.log(f"calibration: {cal['reason']}")
    scorer = open_set.fit_open_set(defaults.OPEN_SET_METHOD, train_features,
                                   s.folder.train.labels, len(s.folder.classes),
                                   k=defaults.OPEN_SET_K)
    scores = scorer.scores(features, probs, logits)
    scorer.threshold = open_set.choose_threshold(scores, defaults.OPEN_SET_KEEP)
    held_out = open_set.held_out_rejection(scores, labels, defaults.OPEN_SET_KEEP)
    info = {**scorer.describe(), "train_images": int(len(train_features)),
            "val_rejected": float((scores > scorer.threshold).mean()),
            "val_rejected_held_out": held_out}
    s.log(f"open set: {scorer.method} score, threshold {scorer.threshold:.4g} keeps "
          f"{1 - info['val_rejected']:.1%} of the validation images"
          + ("" if held_out is None else f" ({1 - held_out:.1%} of those it was not chosen on)"))
    return probs, cal, (scorer, info), scores


# What the validation images decide in a run, so their accuracy is optimistic (metrics.json).
VAL_CHOICES = ("the best epoch of each phase, head-only or fine-tuned (--mode), the temperature "
               "(--calibrate) and the open-set threshold")


def score_test(s: FitState, two, fast, open_set) -> tuple[dict, np.ndarray, np.ndarray] | None:
    """The held-out test images, scored once by the final model (temperature and threshold
    included), after every choice was made on the validation images; None without them."""
    from graftkit.graft import head_logits
    from graftkit.outputs.evaluation import scores

    folder = s.folder
    if not folder.test_source or not len(folder.test):
        return None
    features, probs = _final_pass(s, two, folder.test.paths, fast, "scoring the test images")
    ood = open_set.scores(features, probs, head_logits(two, features))
    result = scores(folder.test.labels, probs, folder.classes)
    record = {"accuracy": result["accuracy"], "balanced_accuracy": result["balanced_accuracy"],
              "num_images": len(folder.test), "data": folder.test_source,
              "per_class": result["per_class"], "confusion_matrix": result["confusion_matrix"],
              "rejected": float((ood > open_set.threshold).mean())}
    s.log(f"test: accuracy {record['accuracy']:.4f} on {len(folder.test)} held-out images "
          "(scored once, nothing chosen on them)")
    return record, probs, ood


def frozen_record(s: FitState) -> dict | None:
    """Which engine and precision computed the frozen outputs this run trained on.

    Rows read from the cache were computed by the same engine in the same precision: each
    engine's rows are cached apart.
    """
    if s.frozen is None:
        return None
    computed = s.frozen_computed
    total = len(s.folder.train) * s.views + len(s.folder.val)
    # a fully cached run read the rows of the engine it planned: each engine caches apart
    return {"engine": s.frozen.engine, "precision": s.frozen.precision,
            "computed": computed, "from_cache": total - computed,
            "seconds": round(s.extract_seconds, 2),
            "fallbacks": list(s.frozen.reasons)}


def metrics_of(s: FitState, result: dict, engine_key: str | None, digest: str) -> dict:
    """``metrics.json``: the scores, what was run and why, in one dictionary."""
    import keras
    import tensorflow as tf

    from graftkit import __version__

    folder, opt, dist, plan = s.folder, s.opt, s.dist, s.plan
    return {
        "val_accuracy": result["accuracy"],
        "balanced_accuracy": result["balanced_accuracy"],
        "backbone": s.info.name,
        "image_size": s.info.image_size,
        "data": str(folder.root),
        "preprocessing": s.info.preprocessing,
        "classes": folder.classes,
        "num_train": len(folder.train),
        "num_val": len(folder.val),
        "split": folder.split_source,
        "skipped_files": folder.skipped,
        "phases": [
            {"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 2),
             "best_val_accuracy": p.best_val_accuracy, "note": p.note, "improved": p.improved}
            for p in s.phases
        ],
        "total_seconds": round(time.perf_counter() - s.started, 2),
        "engine": s.frozen.label if s.frozen is not None else None,
        "engine_key": engine_key,  # the cached engine file predict and serve reuse
        "frozen_outputs": frozen_record(s),
        "precision": opt.precision,
        "distribution": {"strategy": dist.name, "replicas": dist.replicas,
                         "workers": dist.workers, "weights_sha256": digest},
        "learning_rates": {"head": plan.head_lr, "fine_tune": plan.fine_tune_lr,
                           "range_tests": s.lr_tests or None},
        "mode": s.mode,
        "options": dataclasses.asdict(opt),
        "class_weight": ({folder.classes[c]: w for c, w in s.class_weight.items()}
                         if s.class_weight else None),
        "per_class": result["per_class"],
        "confusion_matrix": result["confusion_matrix"],
        "check": {"status": s.checked.status,
                  "findings": [g for g in s.checked.groups() if g["severity"] != "note"]},
        "versions": {"graftkit": __version__, "keras": keras.__version__,
                     "tensorflow": tf.__version__, "python": platform.python_version()},
    }


def write_run(s: FitState, digest: str, two, fast, engine_key: str | None,
              train_features: np.ndarray) -> Classifier:
    """Score the final model on validation and write every file of the run folder."""
    from graftkit.classifier import Classifier
    from graftkit.files import write_json
    from graftkit.outputs import run
    from graftkit.outputs.evaluation import scores
    from graftkit.outputs.plots import best_row, plot_confusion, plot_history
    from graftkit.outputs.report import build_report
    from graftkit.train.phases import HISTORY_COLUMNS

    folder, run_dir, history = s.folder, s.run_dir, s.plan.history
    features, raw_probs = _final_pass(s, two, folder.val.paths, fast,
                                      "scoring the validation images")
    probs, cal, (open_set, open_info), ood = calibrate_and_reject(s, two, features, raw_probs,
                                                                  train_features)
    result = scores(folder.val.labels, probs, folder.classes)
    metrics = metrics_of(s, result, engine_key, digest)
    metrics["calibration"] = cal
    metrics["open_set"] = open_info
    metrics["val_used_for"] = VAL_CHOICES
    test = score_test(s, two, fast, open_set)
    if test is not None:  # first: the figure to trust
        metrics = {"test": test[0], **metrics}
        test_probs, test_ood = test[1], test[2]
    s.log(f"writing {run_dir}: model, predictions, plots, report")
    train_sha256 = folder.digests(folder.train)  # may read files the scan could not hash
    run.save_model(s.model, run_dir / run.MODEL_FILE)
    write_json(run_dir / run.LABELS_FILE, folder.classes)
    write_json(run_dir / run.SPLIT_FILE, {
        "train": [[p, folder.classes[y]] for p, y in zip(folder.train.paths, folder.train.labels)],
        "val": [[p, folder.classes[y]] for p, y in zip(folder.val.paths, folder.val.labels)],
        "test": [[p, folder.classes[y]] for p, y in zip(folder.test.paths, folder.test.labels)],
        # Content digests: graft evaluate warns when its images are training images.
        "train_sha256": train_sha256,
    })
    open_set.save(run_dir / run.OPEN_SET_FILE)
    run.write_predictions(run_dir / run.PREDICTIONS_FILE, folder.val.paths, folder.val.labels,
                          probs, folder.classes, ood, open_set.threshold)
    if test is not None:
        run.write_predictions(run_dir / run.TEST_PREDICTIONS_FILE, folder.test.paths,
                              folder.test.labels, test_probs, folder.classes, test_ood,
                              open_set.threshold)
    run.write_history(run_dir / run.HISTORY_FILE, history, HISTORY_COLUMNS)
    kept = ("head",) if s.mode and s.mode.get("chosen") == "head" else ("head", "fine_tune")
    plot_history(history, run_dir / run.CURVES_FILE, best_row(history, kept))
    plot_confusion(result["confusion_matrix"], folder.classes, run_dir / run.CONFUSION_FILE)
    build_report(run_dir, metrics)
    write_json(run_dir / run.METRICS_FILE, metrics)  # last: its presence marks a finished run
    return Classifier(s.model, folder.classes, metrics, run_dir,
                      train_digests=train_sha256)
