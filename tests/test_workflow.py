"""The stages of ``fit``, each called on its own over a ``FitState``."""

from __future__ import annotations

from pathlib import Path

import pytest

from graftkit.train import stages
from graftkit.train.distribute import Distribution
from graftkit.train.phases import PhaseResult
from graftkit.train.workflow import make_options

from .conftest import make_folder


def _state(tmp_path: Path, **options) -> stages.FitState:
    opts = make_options(**{"image_size": 32, "batch_size": 8, "head_epochs": 2,
                           "fine_tune_epochs": 2, **options})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lines: list[str] = []
    s = stages.FitState(opts, run_dir, Distribution("default", None), lines.append, 0)
    s.lines = lines  # what the stages logged
    return s


@pytest.mark.integration
def test_stages_up_to_the_frozen_outputs_fill_the_state(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    s = _state(tmp_path, unfreeze="auto")
    stages.scan_data(s, data)
    assert s.folder.classes == ["class_0", "class_1"] and s.checked.status in ("clean", "warning")
    stages.open_checkpoint(s, overwrite=False, resume=False)
    assert s.resumed is None and s.ckpt is not None
    stages.build_model(s, deterministic=True, unsafe=False)
    assert s.size == 32 and s.model.outputs[0].shape[-1] == 2
    stages.resolve_auto(s)
    assert s.opt.unfreeze == "all" and s.unfreeze_reason.startswith("10 training images")
    assert s.opt.label_smoothing == 0.1  # the whole base is fine-tuned
    assert s.opt.dropout == 0.2 and s.model.get_layer("head_dropout").rate == 0.2
    stages.plan_phases(s, tensorboard=False)
    assert s.plan.head_epochs == 2 and s.phases == [] and (s.run_dir / "history.csv").is_file()
    stages.cut_base(s)
    assert not s.cached_phase2 and s.need_cache and s.views == 5 and s.engine_key
    stages.compute_frozen(s)
    assert len(s.train_ex.views) == 5 and len(s.val_ex.views[0][0]) == len(s.folder.val)
    assert any(line.startswith("frozen base: ") and "computed" in line for line in s.lines)


@pytest.mark.integration
def test_a_number_of_blocks_cuts_the_base_and_caches_phase_2(tmp_path):
    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    s = _state(tmp_path, unfreeze=1, augment="none")
    for stage in (lambda: stages.scan_data(s, data),
                  lambda: stages.open_checkpoint(s, False, False),
                  lambda: stages.build_model(s, True, False), lambda: stages.resolve_auto(s),
                  lambda: stages.plan_phases(s, False), lambda: stages.cut_base(s)):
        stage()
    assert s.cached_phase2 and s.split.top is not None and s.views == 1
    assert s.opt.label_smoothing == 0.0
    # The head trains on cached features of the top blocks' outputs: the stronger dropout,
    # in the model itself (the cached-feature head copies its rate from there).
    assert s.opt.dropout == 0.7 and s.model.get_layer("head_dropout").rate == 0.7
    from graftkit.train.phases import _head_like

    assert _head_like(s.model, 8).get_layer("head_dropout").rate == 0.7


@pytest.mark.parametrize("given,whole,rate", [("auto", False, 0.7), (0.3, False, 0.3),
                                              (0, True, 0.0), ("auto", True, 0.2)])
@pytest.mark.integration
def test_dropout_auto_and_given(tmp_path, given, whole, rate):
    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    s = _state(tmp_path, dropout=given, unfreeze="all" if whole else 1, augment="none")
    stages.scan_data(s, data)
    stages.build_model(s, deterministic=True, unsafe=False)
    stages.resolve_auto(s)
    assert s.opt.dropout == rate and s.model.get_layer("head_dropout").rate == rate


def _with_phases(tmp_path, head: float, ft: float | None, improved: bool = True,
                 mode: str = "auto") -> stages.FitState:
    s = _state(tmp_path, mode=mode)
    s.phases = [PhaseResult("head", 2, 1.0, head)]
    s.ft_epochs = 2
    s.plan = type("PhasePlan", (), {"history": [], "deadline": None})()
    if ft is not None:
        s.phases.append(PhaseResult("fine_tune", 2, 3.0, ft, improved=improved))
        s.plan.history = [{"phase": "fine_tune", "val_accuracy": ft}]
    return s


@pytest.mark.parametrize("head,ft,improved,chosen", [
    (0.90, 0.95, True, "fine_tune"),
    (0.90, 0.85, False, "head"),
])
def test_choose_mode_keeps_fine_tuning_only_when_it_won(tmp_path, head, ft, improved, chosen):
    s = _with_phases(tmp_path, head, ft, improved)
    stages.choose_mode(s)
    assert s.mode["chosen"] == chosen and s.mode["head_val_accuracy"] == head
    assert s.lines[-1].startswith(f"mode auto: {chosen.replace('_', '-')}")


def test_choose_mode_without_phase_2_says_why(tmp_path):
    s = _with_phases(tmp_path, 0.9, None)
    s.ft_epochs = 0
    stages.choose_mode(s)
    assert s.mode["chosen"] == "head" and s.mode["reason"] == "--fine-tune-epochs 0"


@pytest.mark.integration
def test_lr_find_runs_the_stages_to_its_test_and_writes_no_run(tmp_path):
    from graftkit.train.workflow import lr_find

    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    tests = lr_find(data, tmp_path / "lr", "head", image_size=32, batch_size=4,
                    verbose=0, log=lambda _m: None)
    assert tests["head"]["suggestion"] > 0 and (tmp_path / "lr" / "lr_find_head.png").is_file()
    assert not (tmp_path / "lr" / "history.csv").exists()
    assert not (tmp_path / "lr" / ".checkpoint").exists()


def test_options_take_fits_defaults_and_refuse_unknown_names():
    from graftkit import defaults

    opts = make_options(head_epochs=3)
    assert opts.head_epochs == 3 and opts.fine_tune_epochs == defaults.FINE_TUNE_EPOCHS
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
    import graftkit

    for name in graftkit.__all__:
        assert getattr(graftkit, name) is not None
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
    with pytest.raises(DataError, match="cannot be read.*predict\\(\\) skips them"):
        clf.predict_proba([str(files[0]), str(empty)])  # rows must match the images
    with pytest.raises(DataError, match="no such file or folder"):
        clf.predict(str(tmp_path / "nope.jpg"))
    with pytest.raises(UsageError, match="cannot read an image from a int"):
        clf.predict(42)
    with pytest.raises(UsageError, match="shape"):
        clf.predict(np.zeros((4, 4, 5), np.uint8))
