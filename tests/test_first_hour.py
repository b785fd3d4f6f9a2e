"""A new user's first hour: every way they break things ends in one line, nothing is lost.

Each test here failed before its fix: tracebacks for bad --output paths, Ctrl-C during start-up
and full disks; private (0600) run files; run folders tied to the working directory; mismatched
or damaged run files accepted or misreported; flattering evaluations; noisy data checks.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from graftkit import cli
from graftkit.cli import main
from graftkit.errors import DiskFullError
from graftkit.outputs.summary import print_summary

from .conftest import make_folder

TINY_FIT = ["--image-size", "32", "--head-epochs", "2", "--fine-tune-epochs", "2",
            "--batch-size", "8", "--unfreeze", "1"]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> bool:
    return len(err.strip().splitlines()) == 1 and "Traceback" not in err


# --- files the user names ---------------------------------------------------------------------

def test_predict_output_in_a_new_folder_is_made(trained_run, tmp_path, capsys):
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    target = tmp_path / "no" / "such" / "dir" / "p.csv"
    code, _, err = run_cli(capsys, "predict", trained_run / "run", image, "--format", "csv",
                           "--output", target)
    assert code == 0, err
    assert target.read_text().startswith("path,label,probability,top_k")


def test_predict_output_that_is_a_folder_is_refused_before_any_work(trained_run, tmp_path,
                                                                    capsys, monkeypatch):
    from graftkit.classifier import Classifier

    def no_work(*_a, **_k):
        raise AssertionError("predictions computed before the output path was checked")

    monkeypatch.setattr(Classifier, "predict", no_work)
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    code, _, err = run_cli(capsys, "predict", trained_run / "run", image, "--output", tmp_path)
    assert code == 2 and "is a folder" in err and one_line(err)


def test_top_k_is_capped_at_the_number_of_classes(trained_run, capsys):
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    code, out, _ = run_cli(capsys, "predict", trained_run / "run", image, "--top-k", "50")
    assert code == 0 and "top 3" in out and "top 50" not in out


# --- Ctrl-C and full disks ------------------------------------------------------------------------

def test_ctrl_c_while_tensorflow_imports_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "import_tensorflow", interrupted)
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    code, _, err = run_cli(capsys, "fit", data, "--out", tmp_path / "run")
    assert code == 130 and "interrupted" in err and one_line(err)
    assert not (tmp_path / "run").exists()  # nothing was written yet


def test_ctrl_c_while_parsing_is_one_line_and_exit_130(capsys, monkeypatch):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    code, _, err = run_cli(capsys, "backbones")
    assert code == 130 and one_line(err)


def _no_space(path, write):
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


@pytest.mark.slow
def test_full_disk_in_the_checkpoint_is_one_line_and_the_same_command_resumes(
        tmp_path, capsys, monkeypatch):
    from graftkit import files
    from graftkit.train import checkpoint

    data = make_folder(tmp_path / "data", per_class=8, size=40)
    out = tmp_path / "run"
    original = files.atomic_write

    def fills_up_in_phase_2(path, write):
        if "fine_tune" in Path(path).name:
            return original(path, lambda tmp: _no_space(tmp, write))
        return original(path, write)

    monkeypatch.setattr(checkpoint, "atomic_write", fills_up_in_phase_2)
    code, _, err = run_cli(capsys, "fit", data, "--out", out, *TINY_FIT)
    assert code == 5 and one_line(err), err
    assert "no space left" in err and str(out / ".checkpoint") in err and "same command" in err
    assert (out / ".checkpoint" / "state.json").is_file()  # phase 1's checkpoint intact

    monkeypatch.setattr(checkpoint, "atomic_write", original)
    code, out_text, err = run_cli(capsys, "fit", data, "--out", out, *TINY_FIT)
    assert code == 0, err
    assert "resuming: 1 phase(s) done" in out_text and (out / "metrics.json").is_file()


@pytest.mark.integration
def test_a_full_cache_warns_once_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    from graftkit.frozen import store

    monkeypatch.setattr(store, "atomic_write", lambda path, write: (_ for _ in ()).throw(
        DiskFullError(Path(path).parent)))
    monkeypatch.setattr(store, "_FULL", set())
    monkeypatch.setenv("GRAFTKIT_CACHE_DIR", str(tmp_path / "cache"))
    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    code, _, err = run_cli(capsys, "fit", data, "--out", tmp_path / "run", *TINY_FIT)
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "no space left in the cache" in line]
    assert len(warnings) == 1 and "without caching" in warnings[0]
    assert not list((tmp_path / "cache").glob("features/*/*/*.npy"))


def test_is_disk_full_knows_wrapped_messages():
    from graftkit.files import is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "x"))
    assert is_disk_full(OSError("Unable to create file (... No space left on device)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --- run folders others can read, from anywhere ---------------------------------------------------

@pytest.mark.slow
def test_run_files_honour_the_umask_and_the_run_works_from_another_folder(
        tmp_path, capsys, monkeypatch):
    """A run made with a relative data path, under umask 027, then used from elsewhere."""
    home = tmp_path / "project"
    make_folder(home / "photos", classes=2, per_class=8)
    monkeypatch.chdir(home)
    old = os.umask(0o027)
    try:
        code, _, err = run_cli(capsys, "fit", "photos", "--out", "runs/a", *TINY_FIT)
        image = next((home / "photos" / "class_0").glob("*.png"))
        assert run_cli(capsys, "predict", "runs/a", image, "--output", "out/p.csv")[0] == 0
    finally:
        os.umask(old)
    assert code == 0, err
    run_dir = home / "runs" / "a"
    for path in [*run_dir.rglob("*"), home / "out" / "p.csv"]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode == (0o750 if path.is_dir() else 0o640), f"{path}: {oct(mode)}"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    split = json.loads((run_dir / "split.json").read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p, _ in split["train"] + split["val"])
    code, out, err = run_cli(capsys, "report", run_dir)
    assert code == 0, err
    page = (run_dir / "report.html").read_text()
    assert "no longer readable" not in page and "data:image/jpeg;base64" in page
    code, out, err = run_cli(capsys, "evaluate", run_dir, home / "photos")
    assert code == 0, err

    copied = tmp_path / "copied-run"  # a run folder copied elsewhere still predicts
    shutil.copytree(run_dir, copied)
    assert run_cli(capsys, "predict", copied, image)[0] == 0


# --- run files that do not fit together -----------------------------------------------------------

@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(trained_run / "run", target)
    return target


@pytest.mark.parametrize("names", [["a", "b"], ["a", "b", "c", "d"]])
def test_labels_that_do_not_match_the_model_are_refused(run_copy, trained_run, capsys, names):
    (run_copy / "labels.json").write_text(json.dumps(names))
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    code, _, err = run_cli(capsys, "predict", run_copy, image)
    assert code == 5 and one_line(err)
    assert f"names {len(names)} classes" in err and "has 3 outputs" in err


@pytest.mark.parametrize("content,fragment", [(b"", "is empty (0 bytes)"),
                                              (b"not a zip at all", "is damaged")])
def test_an_empty_or_damaged_model_file_says_so(run_copy, trained_run, capsys, content, fragment):
    (run_copy / "model.keras").write_bytes(content)
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    code, _, err = run_cli(capsys, "predict", run_copy, image)
    assert code == 5 and fragment in err and "not found" not in err and one_line(err)


def test_evaluate_on_an_image_file_says_a_folder_or_table_is_expected(trained_run, capsys):
    image = next((trained_run / "data" / "class_0").glob("*.png"))
    code, _, err = run_cli(capsys, "evaluate", trained_run / "run", image)
    assert code == 3 and "not a data folder" in err and "CSV" in err.upper() and one_line(err)
    assert "codec" not in err


def test_evaluate_warns_when_its_images_are_training_images(trained_run, capsys):
    code, out, err = run_cli(capsys, "evaluate", trained_run / "run", trained_run / "data",
                             "--format", "json")
    assert code == 0
    overlap = json.loads(out)["overlap"]
    split = json.loads((trained_run / "run" / "split.json").read_text())
    assert overlap["checked"] and overlap["count"] == len(split["train"])
    assert "warning:" in err and f"{len(split['train'])} of" in err and "flatters" in err


def test_evaluate_on_a_run_without_digests_says_overlap_was_not_checked(run_copy, trained_run,
                                                                        capsys):
    split = json.loads((run_copy / "split.json").read_text())
    del split["train_sha256"]
    (run_copy / "split.json").write_text(json.dumps(split))
    code, _, err = run_cli(capsys, "evaluate", run_copy, trained_run / "data")
    assert code == 0 and "could not be checked" in err


def test_summary_names_the_data_folder_of_its_check():
    metrics = {"phases": [], "val_accuracy": 1.0, "num_val": 1, "total_seconds": 1.0,
               "balanced_accuracy": 1.0, "per_class": {}, "skipped_files": [],
               "data": "/data/my photos",
               "check": {"findings": [{"message": "4 images under 32 px on a side"}]}}
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_summary(metrics, "runs/x")
    text = buf.getvalue()
    assert "graft check '/data/my photos'" in text and "DATA_DIR" not in text
    assert "1 finding: 4 images under 32 px" in text


# --- fast answers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["check", "{tmp}/missing"],
    ["fit", "{tmp}/missing", "--out", "{tmp}/r"],
    ["fit", "{data}", "--out", "{tmp}/r", "--base", "efficientnet_lit0"],
    ["fit", "{data}", "--out", "{tmp}/r", "--lr", "fast"],
    ["predict", "{tmp}", "x.jpg"],
    ["evaluate", "{tmp}", "{data}"],
    ["inspect", "nothing-like-this"],
    ["backbones"],
    ["cache", "info"],
    ["check", "{data}"],
    ["export", "{fake}", "--format", "onnx", "--quantize", "float16"],
])
def test_typos_and_tf_free_commands_never_import_tensorflow(tmp_path, argv):
    """Answered before TensorFlow's start-up (seconds and ~0.8 GB): checked in a fresh process."""
    data = make_folder(tmp_path / "data", classes=2, per_class=3)
    fake = tmp_path / "fake-run"  # passes the run folder's preflight, never loaded
    fake.mkdir()
    (fake / "model.keras").write_bytes(b"")
    (fake / "labels.json").write_text('["a", "b"]')
    argv = [a.format(tmp=tmp_path, data=data, fake=fake) for a in argv]
    script = ("import sys\nfrom graftkit.cli import main\ncode = main(sys.argv[1:])\n"
              "print('TF' if 'tensorflow' in sys.modules else 'no TF', code)")
    env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.stdout.strip().splitlines()[-1].startswith("no TF"), proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_declared_parameter_counts_match_the_built_networks():
    from graftkit.backbones import REGISTRY, load_base
    from graftkit.backbones.registry import count_params

    for name, entry in REGISTRY.items():
        model, _ = load_base(name, weights=None)
        assert count_params(model.weights) == entry.params, name


# --- progress ----------------------------------------------------------------------------------------

class _Stream:
    def __init__(self, tty: bool):
        self.tty, self.text = tty, ""

    def isatty(self):
        return self.tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass


def test_progress_is_a_bar_on_a_terminal_and_spaced_lines_in_a_log(monkeypatch):
    from graftkit import progress

    clock = iter(float(t) for t in range(0, 1000))
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    tty = _Stream(True)
    bar = progress.Progress("frozen base", 10, stream=tty)
    for i in range(1, 11):
        bar.update(i)
    bar.close()
    assert tty.text.count("\r") == 11 and "10/10" in tty.text and "left" in tty.text
    log = _Stream(False)
    lines = progress.Progress("scanning images", 100, stream=log, every=5)
    for i in range(1, 101):
        lines.update(i)  # one clock second per update
    lines.close()
    rows = log.text.strip().splitlines()
    assert "\r" not in log.text and 15 <= len(rows) <= 21  # a line every 5 s, not 100
    assert rows[0].startswith("scanning images: ") and "/s" in rows[0] and "left" in rows[0]
    assert rows[-1].startswith("scanning images: 100/100 in")


@pytest.mark.integration
def test_history_csv_grows_epoch_by_epoch_in_place(tmp_path, monkeypatch):
    from graftkit.outputs.run import HistoryLog
    from graftkit.train.workflow import fit

    seen = []
    original = HistoryLog.append

    def watch(self, row):
        original(self, row)
        seen.append((self.path.stat().st_ino, len(self.path.read_text().splitlines())))

    monkeypatch.setattr(HistoryLog, "append", watch)
    data = make_folder(tmp_path / "data", classes=2, per_class=6)
    result = fit(data, tmp_path / "run", image_size=32, head_epochs=3, fine_tune_epochs=2,
                 batch_size=8, unfreeze=1, mode="fine-tune", verbose=0, log=lambda _m: None)
    assert [n for _, n in seen] == list(range(2, 2 + len(seen)))  # header + one row per epoch
    assert len({ino for ino, _ in seen}) == 1  # the same file: tail -f follows it
    rows = list(csv.DictReader((result.run_dir / "history.csv").read_text().splitlines()))
    assert len(rows) == len(seen) == 5


# --- data checks that a person can read -------------------------------------------------------------

def _digit_like(root: Path, per_class: int = 15) -> Path:
    """8x8 images whose classes differ by a few pixels: the hash cannot tell them apart."""
    for c in range(3):
        d = root / str(c)
        d.mkdir(parents=True)
        for i in range(per_class):
            a = np.full((8, 8), 255, np.uint8)
            a[2:6, 2 + c] = 0  # the class: a stroke one pixel further right
            a[7, :] = 200 + i  # each image unique (no exact duplicates)
            Image.fromarray(a, "L").save(d / f"{i:03d}.png")
    return root


def test_tiny_images_give_one_finding_not_hundreds_of_near_duplicates(tmp_path, capsys):
    from graftkit import defaults
    from graftkit.data import checks as check_module
    from graftkit.data.checks import check

    root = _digit_like(tmp_path / "digits")
    with pytest.MonkeyPatch.context() as mp:  # what the hash says when trusted on 8x8 images
        mp.setattr(defaults, "TINY_SIDE", 0)
        untrusted = {f.kind for f in check_module.check(root).findings}
    assert untrusted & {"near_duplicate", "near_duplicate_labels"}
    rep = check(root)
    kinds = {f.kind for f in rep.findings}
    assert kinds == {"tiny"}, kinds
    groups = rep.groups()
    assert len(groups) == 1 and groups[0]["count"] == 1 and "45 images under 32 px" in \
        groups[0]["message"] and "near-duplicate" in groups[0]["message"]


def test_near_duplicates_with_other_labels_are_likely_label_errors(tmp_path, capsys):
    from graftkit.data.checks import check

    root = tmp_path / "d"
    make_folder(root / "train", classes=2, per_class=5, size=64)
    make_folder(root / "val", classes=2, per_class=2, size=64, seed=9)
    src = np.asarray(Image.open(root / "train" / "class_0" / "img_000.png")).astype(int)
    for i, cls in enumerate(("class_0", "class_1", "class_1")):  # one same label, two not
        Image.fromarray(np.clip(src + i + 1, 0, 255).astype(np.uint8)).save(
            root / "val" / cls / f"near_{i}.png")
    rep = check(root)
    by_kind = {g["kind"]: g for g in rep.groups()}
    assert by_kind["near_duplicate_labels"]["count"] == 2
    assert "likely label errors" in by_kind["near_duplicate_labels"]["message"]
    assert by_kind["near_duplicate"]["count"] == 1
    code, out, _ = run_cli(capsys, "check", root)
    lines = [line for line in out.splitlines() if line.startswith("warning  near_duplicate")]
    assert len(lines) == 2, out  # one line per kind, not one per pair
    code, out, _ = run_cli(capsys, "check", root, "--format", "json")
    full = json.loads(out)
    assert len([f for f in full["findings"] if f["kind"] == "near_duplicate_labels"]) == 2


def test_near_copies_are_counted_by_validation_image_not_by_pair(tmp_path):
    from graftkit.data.checks import check

    root = tmp_path / "d"
    make_folder(root / "train", classes=2, per_class=3, size=64)
    make_folder(root / "val", classes=2, per_class=2, size=64, seed=9)
    src = np.asarray(Image.open(root / "train" / "class_0" / "img_000.png")).astype(int)
    for i in range(3):  # three training copies of one photo, and the photo in val
        Image.fromarray(np.clip(src + i + 1, 0, 255).astype(np.uint8)).save(
            root / "train" / "class_0" / f"copy_{i}.png")
    Image.fromarray(np.clip(src + 5, 0, 255).astype(np.uint8)).save(
        root / "val" / "class_0" / "photo.png")
    rep = check(root)
    near = [f for f in rep.findings if f.kind == "near_duplicate"]
    assert len(near) == 1  # one validation image, not 4 pairs
    assert near[0].paths[0].endswith("photo.png") and len(near[0].paths) == 5
    assert "and 3 more" in near[0].message
    assert {g["kind"]: g["count"] for g in rep.groups()}["near_duplicate"] == 1


def _drawing(path: Path, seed: int) -> None:
    """A line drawing: a few thin strokes, small, in the middle of a white page."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.new("L", (227, 227), 255)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = rng.integers(70, 157, 2)
        draw.line([(int(x), int(y)), (int(x + rng.integers(-30, 30)),
                                      int(y + rng.integers(-30, 30)))], fill=0, width=1)
    img.save(path)


def test_line_drawings_are_not_near_copies_of_each_other(tmp_path):
    """Sparse strokes on white paper hash alike (the paper's bits are all equal): the hash
    alone flagged such drawings in bulk; the thumbnails' correlation tells them apart, and a
    real copy of a drawing is still found."""
    from graftkit.data import checks

    root = tmp_path / "sketches"
    for split, n, offset in (("train", 30, 0), ("val", 10, 1000)):
        for c in ("cat", "dog"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                _drawing(root / split / c / f"{i:03d}.png", offset + 7 * i + (c == "dog"))
    copy = np.asarray(Image.open(root / "train" / "dog" / "004.png")).astype(int)
    Image.fromarray(np.clip(copy - 3, 0, 255).astype(np.uint8)).save(
        root / "val" / "dog" / "copy.png")
    with pytest.MonkeyPatch.context() as mp:  # the hash alone: a flood of false alarms
        mp.setattr(checks, "near_copy_rule", checks.hash_only)
        alone = [f for f in checks.check(root).findings if f.kind.startswith("near_duplicate")]
    assert len({f.paths[0] for f in alone}) >= 5
    found = [f for f in checks.check(root).findings if f.kind.startswith("near_duplicate")]
    assert [(Path(f.paths[0]).name, f.kind) for f in found] == [("copy.png", "near_duplicate")]


# --- the report -----------------------------------------------------------------------------------------

def test_top_losses_show_wrong_predictions_first_then_the_least_confident_right_ones(tmp_path):
    from graftkit.outputs.report import Why, _top_losses

    rows = [{"path": f"/x/{n}.png", "label": lab, "predicted": pred, "probability": "0.9",
             "true_probability": tp, "loss": str(-np.log(float(tp)))}
            for n, lab, pred, tp in [("r_sure", "a", "a", "0.99"), ("w_mild", "a", "b", "0.4"),
                                     ("r_unsure", "b", "b", "0.55"), ("w_bad", "b", "a", "0.05")]]
    page = _top_losses(rows, Why(tmp_path))  # a run without heatmaps: the page says so
    assert "No heatmaps" in page
    wrong, right = page.split("id=wrong")[1].split("id=least-confident")
    assert wrong.index("w_bad") < wrong.index("w_mild") and "r_" not in wrong
    assert right.index("r_unsure") < right.index("r_sure") and "w_" not in right
    assert "Wrong predictions (2 of 4" in page


def test_the_kept_epoch_is_the_best_validated_one():
    from graftkit.outputs.plots import best_row

    rows = [{"phase": "head", "val_accuracy": 0.8, "val_loss": 0.5},
            {"phase": "head", "val_accuracy": 0.9, "val_loss": 0.4},
            {"phase": "fine_tune", "val_accuracy": 0.9, "val_loss": 0.3},
            {"phase": "fine_tune", "val_accuracy": 0.85, "val_loss": 0.2}]
    assert best_row(rows) == 2  # same accuracy, lower loss
    assert best_row(rows, ("head",)) == 1  # the head was kept


# --- the machine it runs on ----------------------------------------------------------------------

def test_with_a_gpu_visible_the_frozen_pass_runs_through_keras(monkeypatch):
    import keras

    from graftkit import devices
    from graftkit.frozen import engine

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)])
    monkeypatch.delenv(engine.ENGINE_ENV, raising=False)
    monkeypatch.setattr(devices, "gpus", lambda: ["/device:GPU:0"])
    on_gpu = engine.FrozenPart(model, "k")
    assert on_gpu.plan(100_000) == "keras" and on_gpu.store_key == "k-keras-f32-gpu"
    assert "1 GPU (/device:GPU:0)" in engine.describe_devices() and "through Keras" in engine.describe_devices()
    monkeypatch.setattr(devices, "gpus", lambda: [])
    assert engine.FrozenPart(model, "k").plan(100_000) == "tflite"
    assert "CPU" in engine.describe_devices("f32") and "TFLite" in engine.describe_devices("f32")
    from graftkit.frozen import precision, runtimes

    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: True)
    assert "through OpenVINO in int8" in engine.describe_devices()  # what auto picks there
    monkeypatch.setattr(runtimes, "openvino_int8_available", lambda: False)
    assert "through TFLite where" in engine.describe_devices()


def test_abbreviated_options_are_typos_not_options(tmp_path, capsys):
    """argparse would take --head-epoch for --head-epochs and train a full run meanwhile."""
    from graftkit.cli import main

    for argv in (["fit", str(tmp_path), "--out", str(tmp_path / "r"), "--head-epoch", "5"],
                 ["predict", str(tmp_path), "x.jpg", "--top", "2"],
                 ["serve", str(tmp_path), "--max-file", "3"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2
        assert "unrecognized arguments: " + argv[-2] in capsys.readouterr().err
