"""The fast tier's guard (tests/conftest.py) refuses integration work in unmarked tests."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import TierError, _starts_tensorflow


def test_fitting_converting_and_tensorflow_processes_are_refused_here(tmp_path):
    import tensorflow as tf

    from graftkit.train import stages

    with pytest.raises(TierError, match="graft fit"):
        stages.build_model(None, True, False)
    with pytest.raises(TierError, match="TFLite conversion"):
        tf.lite.TFLiteConverter.from_keras_model(None)
    with pytest.raises(TierError, match="starts TensorFlow"):
        subprocess.run([sys.executable, "-m", "graftkit.cli", "predict", "run", "x.png"])
    done = subprocess.run([sys.executable, "-c", "print('no TensorFlow here')"],
                          capture_output=True, text=True)
    assert done.stdout.strip() == "no TensorFlow here"


@pytest.mark.integration
def test_integration_tests_are_not_guarded():
    from graftkit.train import stages

    assert stages.build_model.__name__ == "build_model"


@pytest.mark.parametrize("argv, starts", [
    ([sys.executable, "-m", "graftkit.cli", "fit", "d", "--out", "r"], True),
    ([sys.executable, "-m", "graftkit.cli", "fit", "--help"], False),
    ([sys.executable, "-m", "graftkit.cli", "check", "d"], False),
    ([sys.executable, "-c", "import sys\nimport tensorflow as tf"], True),
    ([sys.executable, "-c", "print('tensorflow' in sys.modules)"], False),
    ([sys.executable, "scripts/serve_crash_restore.py", "run"], True),
    (["chromium", "--headless", "page.html"], False),
])
def test_what_counts_as_a_tensorflow_process(argv, starts):
    assert _starts_tensorflow(argv) is starts
