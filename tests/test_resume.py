"""Interrupted runs resume from their last epoch; reruns give the same figures."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys

import pytest

from graftkit.cli import main

from .conftest import TRAINED_RUN, make_folder, wait_for_phase2_epoch

# Phase 2 on cached activations (top 3 blocks), the default path.
FIT = ["--image-size", "48", "--head-epochs", "3", "--fine-tune-epochs", "4", "--batch-size", "8",
       "--unfreeze", "3", "--fine-tune-lr", "1e-4", "--lr", "1e-2"]


def _graft(args, cache) -> subprocess.Popen:
    env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(cache)}
    # SIGINT back to its default in the child: a shell's background job starts with it ignored,
    # and Python then never raises KeyboardInterrupt (seen when .ci/run ran as a background job).
    return subprocess.Popen([sys.executable, "-m", "graftkit.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.mark.slow
def test_sigkill_mid_phase2_then_resume(tmp_path, private_cache):
    data = make_folder(tmp_path / "data", per_class=16, size=48)
    run = tmp_path / "run"
    proc = _graft(["fit", data, "--out", run, *FIT], private_cache)
    state = wait_for_phase2_epoch(run, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run / "model.keras").exists() and not (run / "metrics.json").exists()
    done_before = state["epoch"]

    proc = _graft(["fit", data, "--out", run, *FIT], private_cache)  # the same command resumes
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    assert "resuming: 1 phase(s) done" in out
    rows = list(csv.DictReader((run / "history.csv").read_text().splitlines()))
    keys = [(r["phase"], int(r["epoch"])) for r in rows]
    assert len(keys) == len(set(keys)), f"an epoch appears twice: {keys}"
    assert [k for k in keys if k[0] == "head"] == [("head", i) for i in (1, 2, 3)]
    fine = [k[1] for k in keys if k[0] == "fine_tune"]
    assert fine == list(range(1, len(fine) + 1)) and len(fine) >= done_before
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["phases"][1]["epochs"] == len(fine)
    assert not (run / ".checkpoint").exists()


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_a_different_command_is_refused(tmp_path, private_cache, capsys):
    data = make_folder(tmp_path / "data", per_class=16, size=48)
    run = tmp_path / "run"
    proc = _graft(["fit", data, "--out", run, *FIT], private_cache)
    wait_for_phase2_epoch(run, proc)
    proc.send_signal(signal.SIGINT)
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130  # the shell convention for SIGINT
    assert "interrupted" in err and "resume" in err and "Traceback" not in err
    assert (run / ".checkpoint" / "state.json").is_file()

    code = main(["fit", str(data), "--out", str(run), *FIT[:-2], "--lr", "0.002"])
    err = capsys.readouterr().err
    assert code == 5 and "different command" in err and "lr" in err


def test_resume_without_a_checkpoint_is_an_error(tmp_path, capsys):
    data = make_folder(tmp_path / "data", classes=2, per_class=4)
    code = main(["fit", str(data), "--out", str(tmp_path / "run"), "--resume", "--image-size", "32"])
    assert code == 5 and "nothing to resume" in capsys.readouterr().err


@pytest.mark.slow
def test_same_seed_same_metrics(trained_run, tmp_path):
    """Deterministic ops on: the shared run's command, run again, agrees with it on every
    figure but the timings (the whole base fine-tuned again, phase 1 on its cached rows)."""
    import graftkit
    from graftkit.train.workflow import fit

    again = fit(trained_run / "data", tmp_path / "again", **TRAINED_RUN, verbose=0,
                log=lambda _m: None)
    figures = []
    for r in (graftkit.load(trained_run / "run"), again):
        rows = list(csv.DictReader((r.run_dir / "history.csv").read_text().splitlines()))
        figures.append(([{k: v for k, v in row.items() if k != "seconds"} for row in rows],
                        r.metrics["val_accuracy"], r.metrics["per_class"],
                        r.metrics["confusion_matrix"], r.metrics["mode"]["chosen"]))
    assert len(figures[0][0]) > 2 and figures[0] == figures[1]
