"""``pip install graftkit`` must resolve on the machines users have, not only on ours.

Asks the package registry (without downloading) whether the pinned TensorFlow has a wheel for
each platform, with the exact wheel tags pip would match there. Skipped, with the reason, when
the registry cannot be reached.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11+")

ROOT = Path(__file__).resolve().parents[1]
# Exact tags: pip matches them literally, so a wheel tagged manylinux_2_27 is found only so.
PLATFORMS = {
    "Linux x86-64": "manylinux_2_27_x86_64",
    "Linux aarch64": "manylinux_2_27_aarch64",
    "macOS Apple silicon": "macosx_12_0_arm64",
    "Windows x86-64": "win_amd64",
}


def _tensorflow_requirement() -> str:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    found = [d for d in deps if re.match(r"tensorflow\b(?![-_])", d)]
    assert len(found) == 1, f"one plain tensorflow dependency expected, got {found}"
    return found[0]


def _versions(platform: str | None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", "index", "versions", "tensorflow", "--python-version",
           "3.11", "--only-binary=:all:"]
    if platform:
        cmd += ["--platform", platform]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def registry():
    probe = _versions(None)
    if probe.returncode != 0:
        pytest.skip(f"the package registry cannot be reached: {probe.stderr.strip()[-200:]}")


def test_the_dependency_is_the_plain_tensorflow_wheel_with_a_gpu_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("tensorflow-cpu") for d in project["dependencies"])
    gpu = project["optional-dependencies"]["gpu"]
    assert any(d.startswith("tensorflow[and-cuda]") and "linux" in d for d in gpu)


@pytest.mark.parametrize("name", list(PLATFORMS))
def test_tensorflow_has_a_wheel_for(name, registry):
    from packaging.requirements import Requirement

    spec = Requirement(_tensorflow_requirement()).specifier
    proc = _versions(PLATFORMS[name])
    assert proc.returncode == 0, f"{name}: {proc.stderr.strip()[-300:]}"
    listed = re.search(r"Available versions: (.+)", proc.stdout)
    versions = [v.strip() for v in listed.group(1).split(",")] if listed else []
    matching = [v for v in versions if v in spec]
    print(f"{name} ({PLATFORMS[name]}): tensorflow {', '.join(matching)} matches {spec}")
    assert matching, f"{name}: no tensorflow wheel in {spec} (registry has {versions[:5]})"
