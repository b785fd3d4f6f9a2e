"""tf.distribute: two real workers on loopback, a killed worker, two logical CPUs mirrored."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from graftkit.errors import DataError, UsageError
from graftkit.train.distribute import (
    Distribution,
    eval_batch_size,
    loopback_configs,
    make_distribution,
)

from .conftest import make_folder, wait_for_phase2_epoch

FIT = ["--image-size", "48", "--head-epochs", "3", "--fine-tune-epochs", "4", "--batch-size", "4",
       "--unfreeze", "2", "--fine-tune-lr", "1e-4", "--lr", "1e-2", "--strategy", "multi-worker"]
DIGEST = re.compile(r"final weights sha256 ([0-9a-f]{16})")


def _workers(data: Path, out: Path, cache: Path, n: int = 2) -> list[subprocess.Popen]:
    procs = []
    for config in loopback_configs(n):
        env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(cache), "CUDA_VISIBLE_DEVICES": "",
               "TF_CONFIG": config}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "graftkit.cli", "fit", str(data), "--out", str(out), *FIT],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 420) -> list[tuple[int, str, str]]:
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a worker did not finish in time")
        results.append((p.returncode, out, err))
    return results


def _digest(stdout: str) -> str:
    found = DIGEST.findall(stdout)
    assert found, stdout[-2000:]
    return found[-1]


@pytest.mark.slow
def test_a_killed_worker_fails_the_job_cleanly_and_two_workers_resume_it_in_sync(
        tmp_path, private_cache):
    """Two workers on loopback; one is killed mid phase 2, the chief stops in one line; both
    started again resume from the chief's checkpoint, end with identical weights, and only the
    chief writes the run."""
    data = make_folder(tmp_path / "data", per_class=16, size=48)
    out = tmp_path / "run"
    chief, worker = _workers(data, out, private_cache)
    state = wait_for_phase2_epoch(out, chief)
    state_file = out / ".checkpoint" / "state.json"
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    try:
        _, err = chief.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        chief.kill()
        pytest.fail("the chief hung after its peer died")
    assert chief.returncode == 7, err[-3000:]
    assert "Traceback" not in err
    assert "lost the cluster" in err and "start the same command on every worker" in err
    assert not (out / "metrics.json").exists()
    saved = json.loads(state_file.read_text())
    assert saved["phase"] == "fine_tune" and saved["epoch"] >= state["epoch"]

    (rc0, out0, err0), (rc1, out1, err1) = _finish(_workers(data, out, private_cache))
    assert rc0 == 0 and rc1 == 0, (err0 + err1)[-3000:]
    assert "Traceback" not in err0 + err1
    assert "resuming:" in out0 and "resuming:" in out1  # both picked up the chief's checkpoint
    assert _digest(out0) == _digest(out1)  # both replicas took the same steps
    rows = [r for r in (out / "history.csv").read_text().splitlines()[1:]
            if r.startswith("fine_tune")]
    epochs = [int(r.split(",")[1]) for r in rows]
    assert epochs == list(range(1, len(epochs) + 1))  # no epoch lost or repeated
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distribution"] == {"strategy": "multi-worker", "replicas": 2, "workers": 2,
                                       "weights_sha256": metrics["distribution"][
                                           "weights_sha256"]}
    assert metrics["distribution"]["weights_sha256"].startswith(_digest(out1))
    assert metrics["phases"][1]["epochs"] >= 1 and metrics["val_accuracy"] > 0.6
    # Only the chief wrote: worker 1 says so, and the folder holds one run's files, no more.
    assert "worker 1 of 2: done" in out1 and f"the chief writes {out}" in out1
    assert "summary" in out0 and "summary" not in out1
    names = {p.name for p in out.iterdir()}
    assert names == {"model.keras", "labels.json", "metrics.json", "history.csv", "curves.png",
                     "open_set.npz", "closest.npz", "closest.jpg", "explain",
                     "confusion_matrix.png", "predictions.csv", "split.json", "report.html",
                     "label_issues.csv"}
    # Batch 4 per replica: 8 per step, learning rates doubled, as the rule says.
    assert "batch 8 in all (4 per replica), learning rates x2" in out0


MIRRORED = """
import json, sys
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from graftkit.train.workflow import fit
out = {}
for strategy in ("default", "mirrored"):
    r = fit(sys.argv[1], sys.argv[2] + "/" + strategy, strategy=strategy, image_size=48,
            head_epochs=6, fine_tune_epochs=2, batch_size=8, lr=1e-2, fine_tune_lr=1e-4,
            verbose=0, log=lambda _m: None)
    out[strategy] = {"acc": r.metrics["val_accuracy"], **r.metrics["distribution"]}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_mirrored_on_two_logical_cpus_matches_one_device(tmp_path, private_cache):
    data = make_folder(tmp_path / "data", per_class=20, size=48, seed=3)
    env = {**os.environ, "GRAFTKIT_CACHE_DIR": str(private_cache), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(data), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["default"]["replicas"] == 1 and got["mirrored"]["replicas"] == 2
    # Two replicas of batch 8 at twice the rate: the same accuracy within 0.05 (README).
    assert abs(got["mirrored"]["acc"] - got["default"]["acc"]) <= 0.05, got
    assert got["mirrored"]["acc"] > 0.8, got


def test_strategy_choice_and_scaling_rules(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    dist = make_distribution("auto")  # no GPU here
    assert dist.name == "default" and dist.replicas == 1 and dist.chief
    two = Distribution("mirrored", None, replicas=2)
    assert two.batch_size(16) == 32 and two.learning_rate(1e-3) == pytest.approx(2e-3)
    with pytest.raises(UsageError, match="needs TF_CONFIG"):
        make_distribution("multi-worker")
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(UsageError, match="TF_CONFIG is not valid"):
        make_distribution("multi-worker")
    with pytest.raises(UsageError, match="--strategy must be one of"):
        make_distribution("ring")


def test_validation_batches_leave_no_replica_empty():
    for n in range(2, 60):
        for batch in (1, 2, 3, 8, 16):
            for replicas in (2, 3, 4):
                if n < replicas:
                    with pytest.raises(DataError, match="cannot be spread"):
                        eval_batch_size(n, batch, replicas)
                    continue
                b = eval_batch_size(n, batch, replicas)
                assert replicas <= b <= max(batch, n) and (n % b == 0 or n % b >= replicas)
    assert eval_batch_size(9, 8, 2) == 7 and eval_batch_size(16, 8, 2) == 8
    assert eval_batch_size(5, 32, 1) == 32  # one replica: unchanged


def test_loopback_ports_come_from_outside_the_ephemeral_range_and_skip_busy_ones():
    import socket

    from graftkit.train import distribute

    floor = distribute._ephemeral_floor()
    ports = distribute.free_ports(3)
    assert len(set(ports)) == 3 and all(1024 <= p < floor for p in ports)

    class Draws:  # the ports a random draw would give, in order
        def __init__(self, ports):
            self.ports = iter(ports)

        def randrange(self, low, high):
            port = next(self.ports)
            assert low <= port < high
            return port

    with socket.socket() as busy:  # a port another program holds is passed over
        busy.bind(("127.0.0.1", ports[0]))
        busy.listen()
        assert distribute.free_ports(1, rng=Draws([ports[0], ports[1]])) == [ports[1]]
    config = json.loads(distribute.loopback_configs(2)[1])
    assert config["task"] == {"type": "worker", "index": 1} and len(config["cluster"]["worker"]) == 2


def test_keras_internals_checked_before_patching(monkeypatch):
    """The multi-worker fixes replace private Keras functions: another Keras version, or one
    whose private names moved, is refused in one message that names the file to update."""
    import keras

    from graftkit import keras_compat

    keras_compat.check()  # the installed Keras is one the fixes were measured on
    with pytest.raises(keras_compat.KerasVersionError, match=r"Keras 3\.16\.0 is installed"):
        keras_compat.check("3.16.0")
    with pytest.raises(UsageError, match="keras_compat.py"):  # a UsageError: one line, exit 2
        keras_compat.check("4.0.0")
    from keras.src.backend.tensorflow import trainer

    monkeypatch.delattr(trainer, "_collective_all_reduce_multi_worker")
    with pytest.raises(keras_compat.KerasVersionError,
                       match="no keras.src.backend.tensorflow.trainer."
                             "_collective_all_reduce_multi_worker"):
        keras_compat.check()
    monkeypatch.setattr(keras, "__version__", "3.17.1")
    monkeypatch.setattr(keras_compat, "_PATCHED", False)
    with pytest.raises(keras_compat.KerasVersionError):
        keras_compat.patch_multi_worker_trainer()  # refused before anything is replaced
    assert trainer.reduce_per_replica.__module__ == "keras.src.backend.tensorflow.trainer"
