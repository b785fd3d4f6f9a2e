"""After the phases: the fast path for the final scores, the open-set statistics, the run's
record, and the run folder (``graftkit.outputs.final`` scores and writes it).

What stays in the training layer is what only training knows: whether the frozen part's
engine still matches the final model, the cached rows the training features come from, what
ran and why (``RunRecord``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import platform
import time
from typing import TYPE_CHECKING

import numpy as np

from graftkit import defaults
from graftkit.labels.issues import FILE as LABEL_ISSUES_FILE
from graftkit.labels.issues import LabelIssues
from graftkit.outputs.final import (
    VAL_CHOICES,
    VAL_CHOICES_LABEL_SETS,
    FinalScores,
    final_pass,
    score_final,
    write_run,
)
from graftkit.outputs.record import RunRecord
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

    from graftkit.classifier import Classifier
    from graftkit.data.folder import ImageFolder
    from graftkit.frozen.cut import SplitClassifier


def finish(run: RunContext, built: ModelPlan, data: PreparedData, training: Training,
           cut: CutPlan, frozen: FrozenOutputs | None, resume: Resume,
           mode: dict) -> Classifier:
    """Free the cached rows; workers other than the chief stop here, the chief writes the run."""
    from graftkit.classifier import Classifier
    from graftkit.frozen.engine import release_memory
    from graftkit.graft import weights_digest, with_features
    from graftkit.outputs.closest import build as build_closest

    dist, model, folder = run.dist, built.model, data.folder
    digest = weights_digest(model)
    if not dist.chief:
        if frozen is not None:
            frozen.release()
        release_memory()
        run.log(f"worker {dist.worker} of {dist.workers}: done, final weights sha256 "
                f"{digest[:16]} (the chief writes {run.run_dir})")
        worker = RunRecord(distribution={"worker": dist.worker, "weights_sha256": digest})
        return Classifier(model, folder.classes, worker, run.run_dir)
    if dist.strategy is not None:  # the chief alone evaluates and saves: a copy off the strategy
        import keras

        plain = keras.models.clone_model(model)
        plain.set_weights(model.get_weights())
        model = plain
    featured = with_features(model)  # [penultimate features, probabilities] in one pass
    fast, engine_key = _fast_path(built, cut, frozen, featured, mode.get("chosen"))
    train_features = _training_features(run, data, frozen, featured, fast)
    closest = build_closest(train_features, folder.train.paths,
                            [folder.label_text(y) for y in folder.train.labels], run.log)
    pretrained = _pretrained_features(built, cut, frozen)
    if frozen is not None:
        frozen.release()  # the cached rows are done with: free them before the last pass
    release_memory()
    final = score_final(model, featured, folder, fast, train_features, built.options.calibrate,
                        run.bars, run.log, built.options.threshold)
    issues = _label_issues(run, built, data, training, pretrained)
    record = run_record(run, built, data, training, frozen, mode, final, engine_key, digest,
                        issues)
    record.previous_run = _against_previous(run, folder, final)
    engine = frozen.part.int8_engine() if frozen is not None else None
    int8 = (frozen.part.int8_engine_name, engine) if frozen and engine is not None else None
    train_sha256 = write_run(run.run_dir, model, folder, final, record, training.plan.history,
                             run.log, issues, closest, int8)
    if dist.workers > 1:
        run.log(f"worker 0 of {dist.workers} (chief): final weights sha256 {digest[:16]}")
    resume.checkpoint.remove()
    clf = Classifier(model, folder.classes, record, run.run_dir, train_digests=train_sha256)
    _explain_report(run, clf)
    return clf


def _explain_report(run: RunContext, clf: Classifier) -> None:
    """The report's heatmaps and closest training images (``explain/``), then the report again
    with them. The run is complete before this: a failure here costs the heatmaps only."""
    from graftkit.outputs.heatmaps import write_explanations
    from graftkit.outputs.report import build_report, explained_paths
    from graftkit.outputs.run import read_predictions

    start = time.perf_counter()
    try:
        paths = explained_paths(clf.metrics, read_predictions(run.run_dir))
        if not paths:
            return
        write_explanations(run.run_dir, clf.explain(paths))
        build_report(run.run_dir, clf.metrics)
    except Exception as exc:  # noqa: BLE001 - said, and the run stands without heatmaps
        run.log(f"report: no heatmaps ({type(exc).__name__}: {exc})")
        return
    run.log(f"report: heatmaps and closest training images of {len(paths)} validation images "
            f"({time.perf_counter() - start:.1f} s)")


def _fast_path(built: ModelPlan, cut: CutPlan, frozen: FrozenOutputs | None,
               model: keras.Model, chosen: str | None) -> tuple[SplitClassifier | None, str | None]:
    """The split path of ``model`` (the final model, or ``with_features`` of it: frozen bottom
    on its engine) for the final scores, when still valid; and the engine's key. A head kept
    by ``--mode auto`` (``chosen``) reads the engine's pooled output it trained on."""
    from graftkit.frozen.cut import SplitClassifier, serving_cut

    bottom_unchanged = cut.cached_phase2 or cut.fine_tune_epochs == 0
    if not bottom_unchanged:  # the whole base was fine-tuned: the engine no longer matches
        return None, None
    options = built.options
    top_n, pooled_top = serving_cut(options.unfreeze, cut.fine_tune_epochs, options.mode,
                                    chosen)
    part = frozen.part if frozen is not None else None
    try:
        return SplitClassifier(model, built.info.block_pattern, top_n, cut.engine_key,
                               part, pooled_top=pooled_top), cut.engine_key
    except ValueError:
        return None, cut.engine_key


def _training_features(run: RunContext, data: PreparedData, frozen: FrozenOutputs | None,
                       featured: keras.Model, fast: SplitClassifier | None) -> np.ndarray:
    """The final model's penultimate features of the plain training images (the open-set
    statistics): from the cached frozen outputs while they still hold, else one more pass."""
    ex = frozen.train if frozen is not None else None
    if fast is not None and ex is not None:
        rows, out = ex.views[0][fast.index], []  # view 0: the plain image
        for i in range(0, len(rows), 256):
            cut = np.asarray(rows[np.arange(i, min(i + 256, len(rows)))], dtype=np.float32)
            out.append(fast.rest_outputs(cut)[0])
        return np.concatenate(out) if out else np.zeros((0, featured.outputs[0].shape[-1]))
    start = time.perf_counter()
    folder = data.folder
    features = final_pass(featured, folder.train.paths, fast, run.bars,
                          "open set: training images")[0]
    run.log(f"open set: features of the {len(folder.train)} training images, one pass of the "
            f"final model ({time.perf_counter() - start:.1f} s)")
    return features


def _pretrained_features(built: ModelPlan, cut: CutPlan,
                         frozen: FrozenOutputs | None) -> np.ndarray | None:
    """The pretrained base's pooled features of every plain training and validation image,
    copied out of the cached rows before they are released (None: no label issues wanted)."""
    from graftkit.graft import is_multi_label

    if not built.options.label_folds or frozen is None or frozen.train is None \
            or frozen.val is None or is_multi_label(built.model):  # the rule: one class each
        return None
    k = 0 if cut.split.top is None else 1  # the pooled features among the frozen outputs
    out = []
    for rows in (frozen.train.views[0][k], frozen.val.views[0][k]):
        out += [np.asarray(rows[np.arange(i, min(i + 1024, len(rows)))], dtype=np.float32)
                for i in range(0, len(rows), 1024)]
    return np.concatenate(out)


def _label_issues(run: RunContext, built: ModelPlan, data: PreparedData, training: Training,
                  features: np.ndarray | None) -> LabelIssues | None:
    """K heads with phase 1's settings, each scoring the labelled images it did not train on;
    the confident-learning rule names the labels that look wrong."""
    from graftkit.train.cross_fit import HeadSettings, label_issues

    options, folder, plan = built.options, data.folder, training.plan
    if features is None:
        return None
    lr = plan.head_lr if not isinstance(plan.head_lr, str) else defaults.HEAD_LR  # resumed
    settings = HeadSettings(options.head_epochs, float(lr), float(options.dropout),
                            training.batch_size, plan.training, plan.class_weight)
    issues = label_issues(features, [*folder.train.labels, *folder.val.labels],
                          [*folder.train.paths, *folder.val.paths],
                          ["train"] * len(folder.train) + ["val"] * len(folder.val),
                          folder.classes, settings, options.label_folds, options.seed)
    run.log(f"label issues: {issues.line()}")
    return issues


def frozen_record(frozen: FrozenOutputs | None) -> dict | None:
    """Which engine and precision computed the frozen outputs this run trained on.

    Rows read from the cache were computed by the same engine in the same precision: each
    engine's rows are cached apart.
    """
    if frozen is None:
        return None
    part = frozen.part
    out = {"engine": part.engine, "precision": part.precision,
           "precision_reason": part.precision_reason,
           "computed": frozen.computed, "from_cache": frozen.total - frozen.computed,
           "seconds": round(frozen.seconds, 2),
           "fallbacks": list(part.reasons)}
    if part.calibration is not None and part.calibration.accepted:
        accepted = dict(part.calibration.accepted)
        engine = part.int8_engine()
        if engine is not None:  # predictions check the run folder's copy by it
            accepted["engine_sha256"] = hashlib.sha256(engine).hexdigest()
        out["int8"] = accepted
    return out


def _against_previous(run: RunContext, folder: ImageFolder,
                      final: FinalScores) -> dict | None:
    """A refit: its model and the previous run's on the validation images both saw."""
    if run.previous is None or folder.multi_label:
        return None
    from graftkit.outputs.compare import against_previous, line

    result = against_previous(run.previous, folder.digests(folder.val),
                              [folder.label_text(y) for y in folder.val.labels],
                              [folder.classes[k] for k in final.probs.argmax(axis=1)])
    run.log(f"against the last run: {line(result)}")
    return result


def run_record(run: RunContext, built: ModelPlan, data: PreparedData, training: Training,
               frozen: FrozenOutputs | None, mode: dict, final: FinalScores,
               engine_key: str | None, digest: str,
               issues: LabelIssues | None = None) -> RunRecord:
    """``metrics.json``: the scores, what was run and why."""
    import keras
    import tensorflow as tf

    from graftkit import __version__

    folder, options, dist, plan, info = (data.folder, built.options, run.dist, training.plan,
                                         built.info)
    result, checked = final.result, data.checked
    multi = folder.multi_label
    return RunRecord(
        test=final.test.record if final.test is not None else None,
        val_accuracy=None if multi else result["accuracy"],
        balanced_accuracy=None if multi else result["balanced_accuracy"],
        task=task_of(multi).name,
        multi_label=result if multi else None,
        backbone=info.name,
        image_size=info.image_size,
        data=str(folder.root),
        preprocessing=info.preprocessing,
        classes=folder.classes,
        num_train=len(folder.train),
        num_val=len(folder.val),
        split=folder.split_source,
        skipped_files=folder.skipped,
        phases=[{"name": p.name, "epochs": p.epochs, "seconds": round(p.seconds, 2),
                 "best_val_accuracy": p.best_val_accuracy, "note": p.note,
                 "improved": p.improved} for p in training.phases],
        total_seconds=round(time.perf_counter() - run.started, 2),
        engine=frozen.part.label if frozen is not None else None,
        engine_key=engine_key,
        frozen_outputs=frozen_record(frozen),
        precision=options.precision,
        distribution={"strategy": dist.name, "replicas": dist.replicas,
                      "workers": dist.workers, "weights_sha256": digest},
        learning_rates={"head": plan.head_lr, "fine_tune": plan.fine_tune_lr,
                        "range_tests": training.lr_tests or None},
        mode=mode,
        options=dataclasses.asdict(options),
        class_weight=({folder.classes[c]: w for c, w in built.class_weight.items()}
                      if built.class_weight else None),
        per_class={} if multi else result["per_class"],
        confusion_matrix=[] if multi else result["confusion_matrix"],
        check={"status": checked.status,
               "findings": [g for g in checked.groups() if g["severity"] != "note"]},
        versions={"graftkit": __version__, "keras": keras.__version__,
                  "tensorflow": tf.__version__, "python": platform.python_version()},
        calibration=final.calibration,
        open_set=final.open_set_info,
        val_used_for=VAL_CHOICES_LABEL_SETS if multi else VAL_CHOICES,
        label_issues=issues.record(LABEL_ISSUES_FILE) if issues is not None else None,
    )
