"""Every kind of bad input a real photo folder holds, each with its observed outcome.

Outcome for each: skipped with a reason (listed in ``skipped_files`` and the run summary), a
warning from ``graft check``, or one clear error; never a traceback, never a silent wrong label.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from pathlib import Path

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from graftkit import defaults
from graftkit.cli import main
from graftkit.data import images as images_module
from graftkit.data.checks import check
from graftkit.data.folder import scan
from graftkit.data.images import load_image, probe_image
from graftkit.data.pipeline import make_dataset
from graftkit.errors import BackboneError, DataError

from .conftest import make_folder


def _reasons(folder) -> dict[str, str]:
    return {Path(s["path"]).name: s["reason"] for s in folder.skipped}


def _png16_rgb(path: Path, arr: np.ndarray) -> None:
    """A 48-bit RGB PNG written by hand (Pillow cannot write 16 bits per channel)."""
    def chunk(kind, body):
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    h, w, _ = arr.shape
    raw = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


@pytest.fixture
def folder(tmp_path) -> Path:
    return make_folder(tmp_path / "d", classes=2, per_class=6)


def test_zero_byte_truncated_jpeg_and_html(folder):
    (folder / "class_0" / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG")
    (folder / "class_0" / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (folder / "class_1" / "page.jpg").write_text("<!doctype html><html>404</html>")
    r = _reasons(scan(folder))
    assert r["zero.jpg"] == "empty file (0 bytes)"
    assert "truncated" in r["cut.jpg"]
    assert "cannot identify image file" in r["page.jpg"]


def test_sixteen_bit_rgb_png_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    _png16_rgb(path, np.full((8, 8, 3), 32768, np.uint16))
    out = load_image(path, 8)
    assert probe_image(str(path)).reason is None
    assert 120 <= out.mean() <= 135  # half scale, not saturated white


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0] + [10, 200, 10] * 255)
    img.info["transparency"] = 0
    img.save(tmp_path / "p.png", transparency=0)
    assert load_image(tmp_path / "p.png", 8).min() == 255


def test_animated_gif_uses_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (16, 16), c) for c in ((250, 0, 0), (0, 0, 250), (0, 250, 0))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    out = load_image(tmp_path / "anim.gif", 8)
    assert out[..., 0].mean() > 200 and out[..., 2].mean() < 50


def test_one_pixel_image_is_used_and_flagged_tiny(folder):
    Image.new("RGB", (1, 1), (9, 9, 9)).save(folder / "class_0" / "dot.png")
    assert load_image(folder / "class_0" / "dot.png", 16).shape == (16, 16, 3)
    rep = check(folder)
    assert any(f.kind == "tiny" and any(p.endswith("dot.png") for p in f.paths)
               for f in rep.findings)
    assert rep.exit_code == 1


def test_decompression_bomb_is_refused_before_decoding(folder, monkeypatch):
    monkeypatch.setattr(defaults, "MAX_PIXELS", 100 * 100)
    Image.new("RGB", (101, 100)).save(folder / "class_0" / "bomb.png")
    assert "too many pixels" in _reasons(scan(folder))["bomb.png"]


def test_unreadable_file_permissions(folder, monkeypatch):
    target = folder / "class_0" / "locked.png"
    Image.new("RGB", (8, 8)).save(target)
    if os.geteuid() == 0:  # root reads anything: simulate what a user without rights sees
        real = images_module.read_bytes

        def denied(path):
            if str(path).endswith("locked.png"):
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(images_module, "read_bytes", denied)
    else:
        target.chmod(0)
    assert _reasons(scan(folder))["locked.png"].startswith("permission denied")


def test_dangling_symlink_and_symlink_loop(folder):
    (folder / "class_0" / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (folder / "class_1" / "a.jpg").symlink_to(folder / "class_1" / "b.jpg")
    (folder / "class_1" / "b.jpg").symlink_to(folder / "class_1" / "a.jpg")
    (folder / "class_1" / "loop").symlink_to(folder / "class_1", target_is_directory=True)
    r = _reasons(scan(folder))
    assert "dangling" in r["gone.jpg"]
    assert r["a.jpg"] == r["b.jpg"] == "symbolic link loop"


def test_hidden_files_are_listed_not_read(folder):
    (folder / "class_0" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (folder / "class_0" / "._photo.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (folder / "class_0" / ".ipynb_checkpoints").mkdir()
    f = scan(folder)
    r = _reasons(f)
    assert r[".DS_Store"] == r["._photo.jpg"] == "hidden file"
    assert r[".ipynb_checkpoints"] == "hidden folder"
    assert len(f.train) + len(f.val) == 12


def test_names_with_spaces_and_non_ascii_characters(tmp_path):
    root = tmp_path / "données"
    for c, name in enumerate(("chats noirs", "été 🐝")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (10, 10), (200 * c, 50, 50)).save(root / name / f"photo n°{i} é.png")
    f = scan(root)
    assert f.classes == ["chats noirs", "été 🐝"] and not f.skipped
    batch = next(iter(make_dataset(f.train.paths, f.train.labels, 8, 8)))
    assert batch[0].shape[0] == len(f.train)


def test_class_names_that_could_escape_a_folder(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=3)
    (root / "..sneaky").mkdir()  # hidden: ignored and listed, never a class
    assert "..sneaky" not in scan(root).classes
    (root / "a\\..\\b").mkdir()
    with pytest.raises(DataError, match="not usable: rename it"):
        scan(root)


def test_nested_folders_and_non_image_files(folder):
    (folder / "class_1" / "2019" / "summer").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "class_1" / "2019" / "summer" / "deep.png")
    (folder / "class_1" / "notes.txt").write_text("x")
    (folder / "class_1" / "README").write_text("x")
    f = scan(folder)
    assert any(p.endswith("deep.png") for p in f.train.paths + f.val.paths)
    r = _reasons(f)
    assert r["notes.txt"] == "not an image file (.txt)" and r["README"] == "not an image file (no extension)"


@pytest.mark.integration
def test_fit_lists_every_skipped_file_in_metrics_and_summary(folder, tmp_path, capsys):
    (folder / "class_0" / "zero.jpg").write_bytes(b"")
    (folder / "class_1" / "page.jpg").write_text("<html/>")
    code = main(["fit", str(folder), "--out", str(tmp_path / "run"), "--image-size", "32",
                 "--head-epochs", "1", "--fine-tune-epochs", "0"])
    out = capsys.readouterr().out
    assert code == 0
    skipped = json.loads((tmp_path / "run" / "metrics.json").read_text())["skipped_files"]
    assert {Path(s["path"]).name for s in skipped} == {"zero.jpg", "page.jpg"}
    assert "skipped files        2" in out and "zero.jpg" in out


def test_graft_check_exit_codes_and_leakage(tmp_path, capsys):
    root = tmp_path / "d"
    make_folder(root / "train", classes=2, per_class=5)
    make_folder(root / "val", classes=2, per_class=2, seed=7)
    assert main(["check", str(root)]) == 0
    (root / "val" / "class_0" / "copy.png").write_bytes(
        (root / "train" / "class_0" / "img_000.png").read_bytes())
    capsys.readouterr()
    assert main(["check", str(root), "--format", "json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert any(f["kind"] == "leak" for f in rep["findings"]) and rep["exit_code"] == 1
    one = make_folder(tmp_path / "one", classes=1)
    assert main(["check", str(one)]) == 2


def test_crafted_keras_file_with_code_is_refused(tmp_path, monkeypatch):
    """A Lambda whose function writes a file: loading must neither run it nor succeed."""
    monkeypatch.chdir(tmp_path)
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Lambda(lambda t: (open("pwned-by-lambda", "w").close(), t)[1])(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "evil.keras")
    (tmp_path / "pwned-by-lambda").unlink()  # created while saving the model above
    from graftkit.backbones import load_base

    with pytest.raises(BackboneError, match="--unsafe"):
        load_base(str(tmp_path / "evil.keras"))
    assert not (tmp_path / "pwned-by-lambda").exists()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=2048), ext=st.sampled_from(defaults.IMAGE_EXTENSIONS))
def test_random_bytes_never_crash_the_decoder(tmp_path, blob, ext):
    """Whatever the bytes, the scan and the decoder agree: a file the scan keeps decodes to
    pixels, a file it skips has a reason and the decoder refuses it too."""
    path = tmp_path / f"blob{ext}"
    path.write_bytes(blob)
    probe = probe_image(str(path))
    if probe.reason is None:
        assert probe.width > 0 and probe.height > 0
        pixels = load_image(str(path), 16)
        assert pixels.shape == (16, 16, 3) and pixels.dtype == np.uint8
    else:
        assert probe.reason.strip() and "Traceback" not in probe.reason
        with pytest.raises(Exception):  # noqa: B017 - Pillow's own errors, whichever it is
            load_image(str(path), 16)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(w=st.integers(1, 64), h=st.integers(1, 64),
       mode=st.sampled_from(["RGB", "L", "RGBA", "P", "LA", "CMYK", "1"]),
       fmt=st.sampled_from(["PNG", "JPEG", "BMP", "GIF", "WEBP"]), seed=st.integers(0, 2**16),
       size=st.integers(8, 48))
def test_random_valid_images_always_decode(tmp_path, w, h, mode, fmt, seed, size):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
    img = Image.fromarray(arr).convert(mode)
    path = tmp_path / f"img.{fmt.lower()}"
    try:
        img.save(path, format=fmt)
    except (OSError, ValueError, KeyError):  # a mode this format cannot hold
        img.convert("RGB").save(path, format=fmt)
    assert probe_image(str(path)).reason is None
    out = load_image(path, size)
    assert out.shape == (size, size, 3) and out.dtype == np.uint8


def _bad_files(folder: Path, monkeypatch) -> list[Path]:
    """One of each kind a scan skips, next to readable images."""
    monkeypatch.setattr(defaults, "MAX_PIXELS", 100 * 100)
    d = folder / "class_0"
    (d / "zero.jpg").write_bytes(b"")
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        buf, "JPEG")
    (d / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (d / "page.jpg").write_text("<!doctype html><html>404</html>")
    Image.new("RGB", (101, 100)).save(d / "bomb.png")
    (d / "gone.jpg").symlink_to(folder / "nowhere.jpg")
    (d / "a.jpg").symlink_to(d / "b.jpg")
    (d / "b.jpg").symlink_to(d / "a.jpg")
    return [d / n for n in ("zero.jpg", "cut.jpg", "page.jpg", "bomb.png", "gone.jpg", "a.jpg",
                            "b.jpg")]


def test_scoring_gives_a_bad_file_the_scan_s_reason(folder, monkeypatch):
    """Scoring decodes each file once and skips the ones that fail there: in the same words
    as the scan and the up-front check."""
    from graftkit.data.images import decode_checked

    for path in _bad_files(folder, monkeypatch):
        reason = decode_checked(str(path), 16)
        assert isinstance(reason, str) and reason == probe_image(str(path)).reason, path.name
    good = decode_checked(str(next((folder / "class_1").glob("*.png"))), 16)
    assert isinstance(good, np.ndarray) and good.shape == (16, 16, 3)


class _Engine:
    """A stand-in for ``SplitClassifier``: the model's outputs, and each batch it was given."""

    def __init__(self, model):
        self.model, self.batches = model, []

    def plan(self, images: int) -> str:
        return "keras"

    def outputs(self, pixels):
        self.batches.append(pixels.reshape(len(pixels), -1).sum(1).tolist())
        return [np.asarray(o) for o in self.model(pixels)]

    def __call__(self, pixels):
        return self.outputs(pixels)[-1]


def test_unreadable_files_leave_the_scoring_loop_as_if_never_given(tmp_path, monkeypatch):
    """Files checked while they decode for the engine: outputs, skipped files and their order,
    and every batch the engine sees are those of files checked before (with ``Inputs.checked``),
    whether the engine runs them or the Keras pipeline does."""
    from graftkit.data.inputs import gather
    from graftkit.outputs.evaluation import inputs_outputs

    folder = make_folder(tmp_path / "d", classes=2, per_class=40, size=20)
    bad = [p for p in _bad_files(folder, monkeypatch) if p.is_file()]  # a folder's walk
    x = keras.Input((16, 16, 3))
    pooled = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(x, [pooled, keras.layers.Dense(2, activation="softmax")(pooled)])
    pixels = np.full((16, 16, 3), 7, np.uint8)
    given = [str(folder / "class_0"), pixels, str(folder / "class_1")]

    def run(check: bool, fast) -> tuple:
        inputs = gather(given, 16, check=check)
        outs = inputs_outputs(model, inputs, 16, False, None, fast,
                              lambda p: [np.asarray(o) for o in model(p)])
        assert not inputs.unchecked and len(outs[-1]) == len(inputs.names)
        return inputs, outs

    checked = _Engine(model)
    before, want = run(True, checked)
    lazy = _Engine(model)
    after, got = run(False, lazy)
    assert len(before.names) == 81 and len(before.skipped) == len(bad)
    assert after.names == before.names and after.skipped == before.skipped
    assert [s["path"] for s in after.skipped] == sorted(str(p) for p in bad)
    assert lazy.batches == checked.batches and [len(b) for b in lazy.batches] == [32, 32, 16]
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)
    keras_inputs, keras_outs = run(False, None)  # no engine: checked first, then the pipeline
    assert keras_inputs.skipped == before.skipped
    np.testing.assert_allclose(keras_outs[-1], want[-1], atol=1e-6)
