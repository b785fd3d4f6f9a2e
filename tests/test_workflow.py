"""The stages of ``fit``, each called on its own with the records it reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from graftkit.train import stages
from graftkit.train.distribute import Distribution
from graftkit.train.phases import Best, PhasePlan, PhaseResult
from graftkit.train.records import CutPlan, ModelPlan, RunContext, Training
from graftkit.train.workflow import make_options

from .conftest import make_folder


def _run(tmp_path: Path) -> tuple[RunContext, list[str]]:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines: list[str] = []  # what the stages logged
    return RunContext(run_dir, Distribution("default", None), lines.append, 0), lines


def _options(**given):
    return make_options(**{"image_size": 32, "batch_size": 8, "head_epochs": 2,
                           "fine_tune_epochs": 2, **given})


@pytest.mark.integration
def test_stages_up_to_the_frozen_outputs_return_their_records(tmp_path):
    data_dir = make_folder(tmp_path / "data", classes=2, per_class=6)
    run, lines = _run(tmp_path)
    options = _options(unfreeze="auto")
    data = stages.scan_data(run, options, data_dir)
    assert data.folder.classes == ["class_0", "class_1"]
    assert data.checked.status in ("clean", "warning")
    resume = stages.open_checkpoint(run, options, data, overwrite=False, resume=False)
    assert resume.state is None and resume.epochs == 0
    built = stages.build_model(run, options, data, resume, deterministic=True, unsafe=False)
    assert built.size == 32 and built.model.outputs[0].shape[-1] == 2
    assert built.options.unfreeze == "all"
    assert built.unfreeze_reason.startswith("10 training images")
    # The whole base is fine-tuned: its dropout and label smoothing, in the model itself.
    assert built.options.label_smoothing == 0.1 and built.options.dropout == 0.2
    assert built.model.get_layer("head_dropout").rate == 0.2
    assert options.unfreeze == "auto"  # the options given are left as they were
    training = stages.plan_phases(run, built, data, resume, tensorboard=False)
    assert training.plan.head_epochs == 2 and training.phases == []
    # auto: 10 training images in batches of 8 take 2 steps a pass, so each of the 20 epochs
    # makes 30 steps (15 passes); through the base (--augment-head) a step is not cheap: one pass
    for given, head_steps in (({"head_epochs": "auto"}, 30),
                              ({"head_epochs": "auto", "augment_head": True}, 2)):
        auto = dataclasses.replace(built, options=dataclasses.replace(built.options, **given))
        plan = stages.plan_phases(run, auto, data, resume, False).plan
        assert (plan.head_epochs, plan.head_steps) == (20, head_steps)
    assert (run.run_dir / "history.csv").is_file()
    cut = stages.cut_base(run, built, training)
    assert not cut.cached_phase2 and cut.need_cache and cut.views == 5 and cut.engine_key
    frozen = stages.compute_frozen(run, built, data, cut)
    assert len(frozen.train.views) == 5 and len(frozen.val.views[0][0]) == len(data.folder.val)
    assert frozen.total == 5 * len(data.folder.train) + len(data.folder.val)
    assert any(line.startswith("frozen base: ") and "computed" in line for line in lines)
    frozen.release()
    assert frozen.train is None and frozen.val is None


def _built(options, size: int = 32) -> ModelPlan:
    """A grafted model without a fit (and without the stage that seeds a run)."""
    from graftkit.backbones import load_base
    from graftkit.graft import build_classifier

    base, info = load_base("efficientnet_lite0", size, None)
    return ModelPlan(options, base, build_classifier(base, 2, options.dropout), info)


def test_a_number_of_blocks_cuts_the_base_and_caches_phase_2(tmp_path):
    """cut_base alone, from the records it reads."""
    run, _ = _run(tmp_path)
    options = stages.resolve_auto(_options(unfreeze=1, augment="none"), 10, 32).options
    built = _built(options)
    cut = stages.cut_base(run, built, Training(8, PhasePlan(2, 2, 1e-3, 1e-4, 1), Best()))
    assert cut.cached_phase2 and cut.split.top is not None and cut.views == 1
    assert cut.need_cache and cut.fine_tune_epochs == 2
    assert options.label_smoothing == 0.0
    # The head trains on cached features of the top blocks' outputs: the stronger dropout,
    # in the model itself (the cached-feature head copies its rate from there).
    assert options.dropout == 0.7 and built.model.get_layer("head_dropout").rate == 0.7
    from graftkit.train.phases import _head_like

    assert _head_like(built.model, 8).get_layer("head_dropout").rate == 0.7
    done = Training(8, PhasePlan(2, 2, 1e-3, 1e-4, 1), Best(),
                    [PhaseResult("head", 2, 1.0, 0.9), PhaseResult("fine_tune", 2, 1.0, 0.9)])
    assert not stages.cut_base(run, built, done).need_cache  # a resumed run past both phases


@pytest.mark.parametrize("given,whole,rate", [("auto", False, 0.7), (0.3, False, 0.3),
                                              (0, True, 0.0), ("auto", True, 0.2)])
def test_dropout_auto_and_given(given, whole, rate):
    options = _options(dropout=given, unfreeze="all" if whole else 1, augment="none")
    assert stages.resolve_auto(options, 10, 32).options.dropout == rate


@pytest.mark.parametrize("images,size,unfreeze,smoothing", [
    (10, 32, "all", 0.1),  # cheap: the whole base, with label smoothing
    (1600, 224, 2, 0.0),  # the top blocks on cached activations
])
def test_unfreeze_and_label_smoothing_auto(images, size, unfreeze, smoothing):
    resolved = stages.resolve_auto(_options(unfreeze="auto"), images, size)
    assert resolved.options.unfreeze == unfreeze
    assert resolved.options.label_smoothing == smoothing
    assert resolved.unfreeze_reason.startswith(f"{images} training images at {size} px")
    assert stages.resolve_auto(_options(unfreeze=3), images, size).unfreeze_reason == "given"
    from graftkit.errors import UsageError

    if unfreeze == "all":
        with pytest.raises(UsageError, match="--fine-tune-lr auto needs --unfreeze N"):
            stages.resolve_auto(_options(unfreeze="auto", fine_tune_lr="auto"), images, size)


def _with_phases(head: float, ft: float | None, improved: bool = True, mode: str = "auto",
                 ft_epochs: int = 2):
    from graftkit.backbones.registry import BaseInfo

    options = _options(mode=mode)
    plan = PhasePlan(2, 2, 1e-3, 1e-4, 1)
    training = Training(8, plan, Best(), [PhaseResult("head", 2, 1.0, head)])
    if ft is not None:
        training.phases.append(PhaseResult("fine_tune", 2, 3.0, ft, improved=improved))
        plan.history = [{"phase": "fine_tune", "val_accuracy": ft}]
    cut = CutPlan(ft_epochs, None, False, 1, False, False, None, "")
    built = ModelPlan(options, None, None, BaseInfo("base", 32, "", ""))
    return options, training, cut, built


@pytest.mark.parametrize("head,ft,improved,chosen", [
    (0.90, 0.95, True, "fine_tune"),
    (0.90, 0.85, False, "head"),
])
def test_choose_mode_keeps_fine_tuning_only_when_it_won(tmp_path, head, ft, improved, chosen):
    run, lines = _run(tmp_path)
    options, training, cut, built = _with_phases(head, ft, improved)
    mode = stages.choose_mode(run, options, training, cut, built)
    assert mode["chosen"] == chosen and mode["head_val_accuracy"] == head
    assert mode["image_size"] == 32 and mode["unfreeze"] == options.unfreeze
    assert lines[-1].startswith(f"mode auto: {chosen.replace('_', '-')}")


def test_a_used_up_time_budget_skips_phase_2_and_says_so(tmp_path):
    """A budget phase 1 already used up: phase 2 does not start, the run keeps the head."""
    run, lines = _run(tmp_path)
    options, training, cut, built = _with_phases(0.9, None)
    options = make_options(**{**vars(options), "time_budget": 0.001})
    built = ModelPlan(options, None, None, built.info)
    training.plan.deadline = 0.0  # long past
    stages.fine_tune_phase(run, built, None, training, cut, None, None)
    assert len(training.phases) == 1
    assert lines == ["phase 2: skipped, the time budget (0.001 s) is used up"]
    mode = stages.choose_mode(run, options, training, cut, built)
    assert mode["chosen"] == "head"
    assert mode["reason"] == "the time budget (0.001 s) ran out in phase 1"


@pytest.mark.parametrize("mode, patience", [("fine-tune", None), ("auto", 3)])
def test_mode_fine_tune_plans_every_epoch(tmp_path, mode, patience):
    """--mode fine-tune: phase 2 has no patience, so no epoch is cut short (the best weights are
    still kept); auto stops after the declared patience."""
    from types import SimpleNamespace

    from graftkit import defaults
    from graftkit.backbones.registry import BaseInfo
    from graftkit.train.records import PreparedData, Resume

    run, _ = _run(tmp_path)
    built = ModelPlan(_options(mode=mode, unfreeze=2, fine_tune_lr=1e-4), None, None, BaseInfo("base", 32, "", ""))
    data = PreparedData(SimpleNamespace(train=[0] * 24, val=[0] * 6, multi_label=False), None)
    training = stages.plan_phases(run, built, data, Resume(None), tensorboard=False)
    assert training.plan.patience == (None if patience is None else defaults.PATIENCE)
    assert defaults.PATIENCE == 3


def test_keep_best_without_patience_never_stops_a_phase():
    from graftkit.train.phases import KeepBest

    worse = {"val_accuracy": 0.1, "val_loss": 9.0}
    for patience, stops in ((None, False), (2, True)):
        keep = KeepBest(Best(val_accuracy=0.9, val_loss=0.1), patience=patience)
        keep.set_model(type("Model", (), {"stop_training": False})())
        for epoch in range(10):
            keep.on_epoch_end(epoch, worse)
        assert keep.model.stop_training is stops and keep.wait == 10


def test_choose_mode_without_phase_2_says_why(tmp_path):
    run, _ = _run(tmp_path)
    mode = stages.choose_mode(run, *_with_phases(0.9, None, ft_epochs=0))
    assert mode["chosen"] == "head" and mode["reason"] == "--fine-tune-epochs 0"


@pytest.mark.integration
def test_lr_find_runs_the_stages_to_its_test_and_writes_no_run(tmp_path):
    from graftkit.train.workflow import lr_find

    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    tests = lr_find(data, tmp_path / "lr", "head", image_size=32, batch_size=4,
                    verbose=0, log=lambda _m: None)
    assert tests["head"]["suggestion"] > 0 and (tmp_path / "lr" / "lr_find_head.png").is_file()
    assert not (tmp_path / "lr" / "history.csv").exists()
    assert not (tmp_path / "lr" / ".checkpoint").exists()


def test_the_task_decides_phase_2_and_views_unless_given():
    """Several labels per image: a higher rate, fewer epochs, fewer cached views (measured on
    ucm_multilabel); one label per image keeps its own defaults; a value given always wins."""
    from graftkit import defaults

    single = stages.resolve_auto(make_options(), 1000, 288).options
    multi = stages.resolve_auto(make_options(), 1000, 288, multi_label=True).options
    assert (single.fine_tune_lr, single.fine_tune_epochs, single.views) == (
        defaults.FINE_TUNE_LR, defaults.FINE_TUNE_EPOCHS, defaults.VIEWS)
    assert (multi.fine_tune_lr, multi.fine_tune_epochs, multi.views) == (
        defaults.FINE_TUNE_LR_MULTI_LABEL, defaults.FINE_TUNE_EPOCHS_MULTI_LABEL,
        defaults.VIEWS_MULTI_LABEL)
    assert (multi.fine_tune_lr, multi.fine_tune_epochs, multi.views) != (
        single.fine_tune_lr, single.fine_tune_epochs, single.views)
    given = stages.resolve_auto(make_options(fine_tune_lr=1e-5, fine_tune_epochs=2, views=4),
                                1000, 288, multi_label=True).options
    assert (given.fine_tune_lr, given.fine_tune_epochs, given.views) == (1e-5, 2, 4)
    assert make_options().fine_tunes and not make_options(fine_tune_epochs=0).fine_tunes


def test_options_take_fits_defaults_and_refuse_unknown_names():
    from graftkit import defaults

    opts = make_options(head_epochs=3)
    assert opts.head_epochs == 3 and opts.fine_tune_epochs is None  # the task's, once known
    assert stages.resolve_auto(opts, 100, 224).options.fine_tune_epochs == \
        defaults.FINE_TUNE_EPOCHS
    with pytest.raises(TypeError, match="head_epoch"):
        make_options(head_epoch=3)


@pytest.mark.integration
def test_fit_returns_the_classifier_that_load_gives_back(tmp_path):
    """One shape for the public API: what ``fit`` returns predicts like what ``load`` reads."""
    import numpy as np

    import graftkit

    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    clf = graftkit.fit(data, tmp_path / "run", image_size=32, batch_size=8, head_epochs=2,
                       mode="head", verbose=0, log=lambda _m: None)
    again = graftkit.load(tmp_path / "run")
    assert isinstance(clf, graftkit.Classifier) and isinstance(again, graftkit.Classifier)
    assert clf.run_dir == again.run_dir == tmp_path / "run" and clf.classes == again.classes
    assert clf.metrics["val_accuracy"] == again.metrics["val_accuracy"]
    images = sorted(str(p) for p in (data / "class_1").iterdir())[:3]
    np.testing.assert_allclose(clf.predict_proba(images), again.predict_proba(images), atol=1e-6)
    assert [p.label for p in clf.predict(images)] == [p.label for p in again.predict(images)]
    assert clf.evaluate(data)["overlap"]["checked"]  # both know their training images


def test_the_public_names_resolve_and_none_shadows_a_module():
    import importlib
    import types

    import graftkit

    for name, module in graftkit._PUBLIC.items():  # each the object its module defines
        found = getattr(graftkit, name)
        assert not isinstance(found, types.ModuleType), name
        assert found is getattr(importlib.import_module(module), name), name
    assert set(graftkit.__all__) == {*graftkit._PUBLIC, "__version__"}
    assert callable(graftkit.check) and callable(graftkit.export) and callable(graftkit.lr_find)


def test_predict_takes_what_users_pass(trained_run, tmp_path):
    """A path, a Path, a folder, a PIL image, an array, a batch, a mix; bad files skipped with
    the CLI's reason and listed in the result, never a traceback from PIL."""
    import numpy as np
    from PIL import Image

    import graftkit
    from graftkit.errors import DataError, UsageError

    clf = graftkit.load(trained_run / "run")
    files = sorted((trained_run / "data" / "class_2").glob("*.png"))[:3]
    want = clf.predict([str(f) for f in files], top_k=2)
    one = clf.predict(str(files[0]), top_k=2)  # a string is a file, not its characters
    assert [(p.path, p.label) for p in one] == [(str(files[0]), want[0].label)]
    assert clf.predict(files[0])[0].label == want[0].label  # a Path
    folder = clf.predict(trained_run / "data" / "class_2")
    assert len(folder) == 10 and folder.skipped == []
    picture = clf.predict(Image.open(files[0]), top_k=2)[0]  # the picture in the file
    assert picture.label == want[0].label
    np.testing.assert_allclose([p for _, p in picture.top_k], [p for _, p in want[0].top_k],
                               atol=1e-5)
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
    assert clf.predict(pixels[1])[0].label == want[1].label  # one array
    batch = clf.predict(pixels)
    assert [p.label for p in batch] == [p.label for p in want]
    assert [p.path for p in batch] == ["<image>[0]", "<image>[1]", "<image>[2]"]
    np.testing.assert_allclose(clf.predict_proba(pixels), clf.predict_proba(files), atol=1e-5)
    np.testing.assert_allclose(clf.predict_proba(pixels.astype(np.float32)),
                               clf.predict_proba(files), atol=1e-5)  # 0-255 floats
    mixed = clf.predict([str(files[0]), Image.open(files[1]), pixels[2]])
    assert [p.label for p in mixed] == [p.label for p in want]
    assert len(clf.predict(pixels[0][:, :, 0])) == 1  # grayscale
    assert clf.predict([]) == []

    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    result = clf.predict([str(files[0]), str(empty), str(text)])
    assert [p.path for p in result] == [str(files[0])]
    assert [s["path"] for s in result.skipped] == [str(empty), str(text)]
    assert result.skipped[0]["reason"] == "empty file (0 bytes)"
    # paths and folders in one list are checked together, in parallel: order as given
    together = clf.predict([str(text), trained_run / "data" / "class_2", str(files[0])])
    assert [p.path for p in together] == [p.path for p in folder] + [str(files[0])]
    assert [s["path"] for s in together.skipped] == [str(text)]
    with pytest.raises(DataError, match="cannot be read.*predict\\(\\) skips them"):
        clf.predict_proba([str(files[0]), str(empty)])  # rows must match the images
    with pytest.raises(DataError, match="no such file or folder"):
        clf.predict(str(tmp_path / "nope.jpg"))
    with pytest.raises(UsageError, match="cannot read an image from a int"):
        clf.predict(42)
    with pytest.raises(UsageError, match="shape"):
        clf.predict(np.zeros((4, 4, 5), np.uint8))


@pytest.mark.parametrize("head_steps, per_epoch", [(0, 2), (7, 7)])
def test_phase_1_takes_the_plan_s_steps_an_epoch(monkeypatch, head_steps, per_epoch):
    """--head-epochs auto on a small set: each epoch several passes over the cached rows (the
    stream cycles the views on), one validation pass an epoch."""
    import numpy as np

    from graftkit.graft import build_head
    from graftkit.train import phases

    compiled = []
    real = phases._compile
    monkeypatch.setattr(phases, "_compile", lambda model, *a, **k: (compiled.append(model),
                                                                   real(model, *a, **k)))
    rng = np.random.default_rng(0)
    model = build_head(8, 2, 0.2)
    views = [rng.normal(size=(10, 8)).astype("float32") for _ in range(2)]
    y = np.arange(10) % 2
    plan = PhasePlan(3, 0, 1e-2, 1e-4, 0, verbose=0, head_steps=head_steps)
    result = phases.train_head_on_features(model, views, y, views[0][:4], y[:4], plan, Best(),
                                           8, 0)
    assert result.epochs == 3 and len(plan.history) == 3
    assert int(compiled[0].optimizer.iterations.numpy()) == 3 * per_epoch
