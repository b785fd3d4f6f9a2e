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


# Each platform as environment markers see it, and the wheel tags its extras' packages use
# (exact, as above: mediapipe tags glibc 2.28 wheels, coremltools manylinux1).
MARKERS = {
    "Linux x86-64": ({"sys_platform": "linux", "platform_machine": "x86_64"},
                     ["manylinux_2_28_x86_64", "manylinux1_x86_64"]),
    "Linux aarch64": ({"sys_platform": "linux", "platform_machine": "aarch64"},
                      ["manylinux_2_28_aarch64", "manylinux2014_aarch64"]),
    "macOS Apple silicon": ({"sys_platform": "darwin", "platform_machine": "arm64"},
                            ["macosx_12_0_arm64"]),
    "Windows x86-64": ({"sys_platform": "win32", "platform_machine": "AMD64"}, ["win_amd64"]),
}
# Where an extra's package has no wheel, its marker must leave it out (docs/export.md and
# pyproject.toml say so).
LACKING = {("coreml", "Linux aarch64"), ("coreml", "Windows x86-64"), ("openvino", "Linux aarch64")}


@pytest.mark.parametrize("extra", ["mobile", "coreml", "openvino"])
@pytest.mark.parametrize("name", list(MARKERS))
def test_each_platform_extra_resolves_or_is_left_out_by_its_marker(extra, name, registry):
    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    environment, tags = MARKERS[name]
    for text in extras[extra]:
        requirement = Requirement(text)
        included = requirement.marker is None or requirement.marker.evaluate(
            {**default_environment(), **environment})
        assert included == ((extra, name) not in LACKING), f"{name}: {text}"
        if not included:
            continue
        found = []
        for tag in tags:
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "index", "versions", requirement.name,
                 "--python-version", "3.11", "--only-binary=:all:", "--platform", tag],
                capture_output=True, text=True, timeout=120)
            listed = re.search(r"Available versions: (.+)", proc.stdout)
            found += [v.strip() for v in listed.group(1).split(",")] if listed else []
        matching = [v for v in found if v in requirement.specifier]
        print(f"{extra} on {name}: {requirement.name} {', '.join(matching[:3])}")
        assert matching, f"{name}: no {requirement.name} wheel in {requirement.specifier}"
