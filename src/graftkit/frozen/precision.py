"""The precision the frozen part computes in, and why: float32, bfloat16 or int8.

int8 runs the frozen part on OpenVINO's integer kernels (the model quantized by NNCF) on x86-64
where both are installed, else on TFLite's (XNNPACK), calibrated on a stratified sample of the
training images. ``graft fit``'s frozen pass (5 views, decoding included) ran 1.9x TFLite's
float32 in OpenVINO's int8 on a Xeon with AVX-512 VNNI and AMX, 1.2x on an AVX2-only EPYC,
where TFLite's own int8 was 0.95x; so ``auto`` picks int8 where the CPU has 8-bit dot-product
instructions (AVX-512 VNNI, AVX-VNNI, AMX, Arm's dot product), or OpenVINO's int8 on AVX2. An
int8 engine never matches float32 to 1e-3, so it is accepted by how closely its outputs follow
float32 on training images it was not calibrated on (``INT8_MIN_COSINE``), else the run falls
back to float32 and says why.
"""

from __future__ import annotations

import hashlib
import os
import platform
import subprocess
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path

import numpy as np

from graftkit.errors import UsageError

ENGINE_PRECISIONS = ("auto", "f32", "bf16", "int8")
# CPU flags of 8-bit dot-product instructions (Linux names; "asimddp" is Arm's).
DOT_PRODUCT_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp")
CALIBRATION_IMAGES = 128  # training images the int8 ranges are calibrated on
HELD_OUT_IMAGES = 32  # other training images the int8 engine is accepted on
# Mean cosine similarity of each output row, int8 vs float32, that an int8 engine must reach
# (measured 0.989 for EfficientNet-Lite0's pooled features at 288 px).
INT8_MIN_COSINE = 0.97
# An int8 run's engine in its run folder, per runtime: predictions must come from the engine
# the head trained on, and it cannot be rebuilt without the training images.
INT8_ENGINE_FILE = "frozen-int8.tflite"
INT8_ENGINE_FILES = {"tflite": INT8_ENGINE_FILE, "openvino": "frozen-int8-openvino.zip"}


@cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux names them; empty where they cannot be read."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        pass
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_DotProd"],
                                 capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            return frozenset()
        return frozenset({"asimddp"}) if out.strip() == "1" else frozenset()
    return frozenset()


def dot_product_flags() -> list[str]:
    """Which of the 8-bit dot-product flags this CPU has."""
    flags = cpu_flags()
    return [f for f in DOT_PRODUCT_FLAGS if f in flags]


def resolve(requested: str, whole_base: bool = False) -> tuple[str, str]:
    """``--engine-precision`` -> (``"f32"``, ``"bf16"`` or ``"int8"``, the reason).

    ``auto``: ``$GRAFTKIT_ENGINE_PRECISION`` when set, else int8 where the CPU has 8-bit
    dot-product instructions or where OpenVINO's int8 runs on AVX2, else float32; float32 for
    a run that fine-tunes the whole base (``whole_base``): there the frozen outputs serve phase
    1 only, and phase 2 would put a head fitted to int8 outputs on the float32 base."""
    from graftkit.frozen.runtimes import PRECISION_ENV

    chosen, why = _resolve(requested)
    by_cpu = requested == "auto" and not os.environ.get(PRECISION_ENV, "").strip()
    if whole_base and chosen == "int8" and by_cpu:
        return "f32", ("the whole base is fine-tuned: phase 2 and predictions run the float32 "
                       "base, so its head is trained on float32 outputs too")
    return chosen, why


def _resolve(requested: str) -> tuple[str, str]:
    from graftkit.frozen.runtimes import PRECISION_ENV, wanted_precision

    if requested not in ENGINE_PRECISIONS:
        raise UsageError(f"--engine-precision {requested!r}: use one of "
                         f"{', '.join(ENGINE_PRECISIONS)}")
    if requested != "auto":
        return requested, f"--engine-precision {requested}"
    if os.environ.get(PRECISION_ENV, "").strip():
        wanted = wanted_precision()
        return wanted, f"${PRECISION_ENV}={wanted}"
    found = dot_product_flags()
    if found:
        return "int8", f"the CPU has 8-bit dot-product instructions ({', '.join(found)})"
    from graftkit.frozen.runtimes import forced_engine, int8_runtime

    if "avx2" in cpu_flags() and int8_runtime(forced_engine()) == "openvino":
        return "int8", ("OpenVINO's int8 kernels on this AVX2 CPU (graft fit's frozen pass "
                        "measured 1.2x TFLite's float32 without 8-bit dot-product "
                        "instructions)")
    return "f32", ("no 8-bit dot-product instructions on this CPU and no OpenVINO with NNCF "
                   "(TFLite's int8 measured no faster than float32 without them)")


@dataclass
class Calibration:
    """Training images for an int8 engine: ``images`` set its ranges, ``held_out`` (others)
    accept or refuse it. ``digest`` names the sample, so another sample is another engine.

    The pixels are decoded when first asked for: a cached engine needs only the held-out
    images, the run's own engine file and a job that does not use int8 need none."""

    digest: str
    size: int
    files: list[str] = field(default_factory=list)
    held_out_files: list[str] = field(default_factory=list)
    accepted: dict = field(default_factory=dict)  # what the acceptance measured

    @cached_property
    def images(self) -> np.ndarray:
        """float32 pixels (N, H, W, 3)."""
        return _pixels(self.files, self.size)

    @cached_property
    def held_out(self) -> np.ndarray:
        return _pixels(self.held_out_files or self.files[:1], self.size)

    @classmethod
    def from_files(cls, items: list[tuple[str, str]], digests: dict[str, str], size: int,
                   seed: int = 0) -> Calibration:
        """A stratified sample of ``(path, label)`` training items, every class represented.

        The seed is fixed, not the run's: runs with other seeds on the same images then share
        the engine and its cached outputs."""
        calib, held = sample(items, seed)
        text = "\n".join(digests[p] for p, _ in calib) + f"\n{size}"
        return cls(hashlib.sha256(text.encode()).hexdigest()[:12], size,
                   files=[p for p, _ in calib], held_out_files=[p for p, _ in held])


def _pixels(files: list[str], size: int) -> np.ndarray:
    from graftkit.data.images import load_image

    return np.stack([load_image(p, size) for p in files]).astype(np.float32)


def sample(items: list[tuple[str, str]], seed: int = 0
           ) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The calibration items and the held-out ones among ``(path, label)`` training items: a
    stratified sample, so both parts span the classes. Exports of an int8 run calibrate on
    the same items."""
    from graftkit.data.sample import stratified

    chosen = stratified(items, CALIBRATION_IMAGES + HELD_OUT_IMAGES, seed)
    step = max(2, len(chosen) // max(1, HELD_OUT_IMAGES))  # every step-th item held out
    held = [c for i, c in enumerate(chosen) if i % step == step - 1][:HELD_OUT_IMAGES]
    return [c for c in chosen if c not in held], held


def engine_settings(folder, size: int, requested: str = "auto", whole_base: bool = False
                    ) -> tuple[str, str, Calibration | None]:
    """(precision, why, calibration) of the frozen part for a job on ``folder``'s images: what
    ``graft fit`` and ``graft check --labels`` use, so that one reads the other's rows."""
    chosen, why = resolve(requested, whole_base)
    if chosen != "int8":
        return chosen, why, None
    # labels as split.json writes them: an export of the run draws the same sample from it
    items = [(p, folder.label_text(y)) for p, y in zip(folder.train.paths, folder.train.labels)]
    digests = dict(zip(folder.train.paths, folder.digests(folder.train)))
    return chosen, why, Calibration.from_files(items, digests, size)


@dataclass(frozen=True)
class EngineFile:
    """An int8 run's engine in its run folder, and the digest the run recorded for it: the
    engine was accepted when the run was made, so a file with that digest needs no new check
    (a check on arbitrary inputs, say a blank warm-up image, would be meaningless in 8 bits)."""

    path: Path
    sha256: str
    runtime: str = "tflite"  # the runtime it was made for: "tflite" or "openvino"

    def content(self) -> bytes:
        data = self.path.read_bytes()
        if hashlib.sha256(data).hexdigest() != self.sha256:
            raise ValueError(f"{self.path} is not the engine the run recorded (its sha256 "
                             "differs)")
        return data


def run_engine(frozen_outputs: dict | None, run_dir: Path | None) -> EngineFile | None:
    """An int8 run's engine of the frozen part, as its ``metrics.json`` recorded it (missing or
    changed: float32, said on first use); None for other runs."""
    frozen = frozen_outputs or {}
    if frozen.get("precision") != "int8" or run_dir is None:
        return None
    runtime = str(frozen.get("engine"))
    runtime = runtime if runtime in INT8_ENGINE_FILES else "tflite"
    return EngineFile(Path(run_dir) / INT8_ENGINE_FILES[runtime],
                      str((frozen.get("int8") or {}).get("engine_sha256", "")), runtime)


def cosines(got: list[np.ndarray], ref: list[np.ndarray]) -> list[float]:
    """Mean cosine similarity of each output's rows (flattened), engine vs reference."""
    out = []
    for a, b in zip(got, ref):
        a = a.reshape(len(a), -1).astype(np.float64)
        b = b.reshape(len(b), -1).astype(np.float64)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        sims = np.where(norms > 0, (a * b).sum(axis=1) / np.maximum(norms, 1e-30), 1.0)
        out.append(float(sims.mean()))
    return out
