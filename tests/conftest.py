"""Shared fixtures (a private weights cache, small generated image folders, runs) and the tiers.

Two tiers: ``make test-fast`` runs the tests not marked ``integration`` (no graft fit, no TFLite
conversion, no subprocess that imports TensorFlow) on two processes; ``make test`` runs them
first, then the rest on two processes (pytest-xdist), then the ``serial`` ones alone.
A test is ``integration`` when it is marked so (or ``slow``) or uses a fixture that fits
(``INTEGRATION_FIXTURES``). A test that is not, yet fits, converts or starts TensorFlow in a
subprocess, fails with a message saying to mark it: the fast tier stays fast by construction.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DATA = Path(__file__).resolve().parent / "data"
# Fixtures that run graft fit: every test using them (directly or not) is an integration test.
INTEGRATION_FIXTURES = {"trained_run"}
# graft commands that import TensorFlow (graftkit.cli.COMMANDS' tensorflow=True).
TF_COMMANDS = {"fit", "lr-find", "predict", "evaluate", "inspect", "export", "demo", "serve"}


# Fixtures whose tests time a server against the clock (a 1 s header deadline, who is answered
# first): they run alone, after the integration tests that share the cores (make test).
SERIAL_FIXTURES = {"live"}


# Modules whose tests take minutes each and share no module fixture: the integration tier
# starts them first, so the two processes do not end with one of them alone on a long test.
FIRST_MODULES = ("test_end_to_end.py",)


def pytest_collection_modifyitems(config, items):
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if item.get_closest_marker("slow") is not None or INTEGRATION_FIXTURES & fixtures:
            item.add_marker(pytest.mark.integration)
        if SERIAL_FIXTURES & fixtures:
            item.add_marker(pytest.mark.serial)
    items.sort(key=lambda item: item.path.name not in FIRST_MODULES)  # stable: the rest as is


class TierError(AssertionError):
    """A test outside the integration tier did integration work."""


def _refuse(what: str):
    def refuse(*_args, **_kwargs):
        raise TierError(f"{what} in a test not marked integration: mark it "
                        "@pytest.mark.integration (or use a fixture of INTEGRATION_FIXTURES), "
                        "or test the unit without it (tests/conftest.py)")
    return refuse


def _starts_tensorflow(args) -> bool:
    """A Python subprocess running a TensorFlow graft command, or a script importing it."""
    argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
    if not argv or "python" not in Path(argv[0]).name:
        return False
    if "graftkit.cli" in argv:
        rest = argv[argv.index("graftkit.cli") + 1:]
        return (bool(rest) and rest[0] in TF_COMMANDS
                and not {"-h", "--help", "--version"} & set(rest))
    if "-c" in argv:  # a script importing TensorFlow, Keras or graftkit's training
        script = argv[argv.index("-c") + 1]
        return bool(re.search(r"^\s*(import|from) (tensorflow|keras|graftkit\.train)\b", script,
                              re.M))
    return any(a.endswith(".py") for a in argv[1:2])  # a script: assume it trains


@pytest.fixture(autouse=True)
def _tier_guard(request, monkeypatch):
    """Outside the integration tier: no graft fit, no TFLite conversion, no TensorFlow process."""
    if request.node.get_closest_marker("integration") is not None:
        yield
        return
    import subprocess as sp

    from graftkit.train import stages

    # Scanning the data and opening the checkpoint are quick (the errors a user can cause there
    # are fast tests); building the model starts the fit.
    monkeypatch.setattr(stages, "build_model", _refuse("graft fit (or lr-find)"))
    original = sp.Popen

    class GuardedPopen(original):
        def __init__(self, args, *rest, **kwargs):
            if _starts_tensorflow(args):
                _refuse(f"a subprocess that starts TensorFlow ({' '.join(map(str, args))[:80]})")()
            super().__init__(args, *rest, **kwargs)

    monkeypatch.setattr(sp, "Popen", GuardedPopen)
    import tensorflow as tf

    for name in ("from_keras_model", "from_saved_model", "from_concrete_functions"):
        monkeypatch.setattr(tf.lite.TFLiteConverter, name, _refuse("a TFLite conversion"))
    yield


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Converted weights go to a fresh cache, so the conversion itself is exercised."""
    path = tmp_path_factory.mktemp("graftkit-cache")
    old = os.environ.get("GRAFTKIT_CACHE_DIR")
    os.environ["GRAFTKIT_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("GRAFTKIT_CACHE_DIR", None)
    else:
        os.environ["GRAFTKIT_CACHE_DIR"] = old


COLORS = [(220, 40, 40), (40, 200, 60), (40, 60, 220)]


def make_folder(root: Path, classes: int = 3, per_class: int = 12, size: int = 40,
                seed: int = 0) -> Path:
    """Classes told apart by colour: learnable in a few steps, so tests stay fast."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            noise = rng.integers(0, 60, (size, size, 3))
            arr = np.clip(noise + np.array(COLORS[c % len(COLORS)]) * 0.75, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img_{i:03d}.png")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    return make_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """One small real run (both phases) shared by the predict/evaluate/inspect tests."""
    from graftkit.train.workflow import fit

    root = tmp_path_factory.mktemp("shared-run")
    data = make_folder(root / "data", per_class=10)
    fit(data, root / "run", **TRAINED_RUN, verbose=0, log=lambda _msg: None)
    return root


# The shared run's options. unfreeze="all": the path that fine-tunes through the whole base (the
# CLI tests cover the default, top blocks on cached activations).
TRAINED_RUN = {"image_size": 32, "head_epochs": 15, "fine_tune_epochs": 1, "batch_size": 8,
               "lr": 1e-2, "fine_tune_lr": 1e-4, "unfreeze": "all"}


def wait_for_phase2_epoch(run: Path, proc: subprocess.Popen, timeout: float = 300) -> dict:
    """The checkpoint state once ``proc`` (a ``graft fit`` of ``run``) saved a phase-2 epoch.

    Fails the test when the process ends first or no such checkpoint appears in time.
    """
    state_file = run / ".checkpoint" / "state.json"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fit ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
        try:
            state = json.loads(state_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("phase") == "fine_tune" and state.get("epoch", 0) >= 1:
            return state
        time.sleep(0.05)
    pytest.fail("no phase-2 checkpoint appeared in time")
