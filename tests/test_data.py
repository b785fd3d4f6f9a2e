"""Scanning, splitting and decoding image folders, and the bad inputs users bring."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from graftkit.data.augment import parse_augment
from graftkit.data.folder import scan
from graftkit.data.images import load_image
from graftkit.data.pipeline import make_dataset
from graftkit.errors import DataError, UsageError

from .conftest import make_folder


def test_seeded_stratified_split(tmp_path):
    root = make_folder(tmp_path / "d", classes=3, per_class=10)
    a = scan(root, val_split=0.2, seed=1)
    b = scan(root, val_split=0.2, seed=1)
    c = scan(root, val_split=0.2, seed=2)
    assert a.classes == ["class_0", "class_1", "class_2"]
    assert len(a.train) == 24 and len(a.val) == 6
    assert sorted(a.val.labels) == [0, 0, 1, 1, 2, 2]  # stratified
    assert a.val.paths == b.val.paths and a.val.paths != c.val.paths
    assert not set(a.train.paths) & set(a.val.paths)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    make_folder(tmp_path / "d" / "train", classes=2, per_class=5)
    make_folder(tmp_path / "d" / "validation", classes=2, per_class=3, seed=1)
    folder = scan(tmp_path / "d")
    assert folder.split_source == "folders"
    assert (len(folder.train), len(folder.val)) == (10, 6)
    assert all("/validation/" in p for p in folder.val.paths)


def test_exif_orientation_is_applied(tmp_path):
    """A landscape pixel array stored with 'rotate 90' shows as portrait, as a viewer shows it."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = 255  # left half white
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    path = tmp_path / "rotated.jpg"
    img.save(path, exif=exif, quality=95)
    out = load_image(path, 40)
    assert out[:15].mean() > 200 and out[-15:].mean() < 50  # white on top after rotation


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "LA"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.full((16, 16, 3), 200, np.uint8))
    if mode == "I;16":
        img = Image.fromarray(np.full((16, 16), 50000, np.uint16))
        path = tmp_path / "deep.png"
    else:
        img = rgb.convert(mode)
        path = tmp_path / ("img.jpg" if mode == "CMYK" else "img.png")
    img.save(path)
    out = load_image(path, 8)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8
    if mode == "I;16":
        assert 190 < out.mean() < 200  # 50000/65535 of full scale, not clipped to white
    else:
        assert abs(float(out.mean()) - 200) < 12


def test_transparent_pixels_become_white(tmp_path):
    img = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    img.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png", 8).min() == 255


@pytest.mark.parametrize("ext,fmt", [(".bmp", "BMP"), (".gif", "GIF"), (".webp", "WEBP"),
                                     (".JPG", "JPEG")])
def test_formats(tmp_path, ext, fmt):
    path = tmp_path / f"x{ext}"
    Image.fromarray(np.full((10, 10, 3), 90, np.uint8)).save(path, format=fmt)
    assert load_image(path, 6).shape == (6, 6, 3)


def test_bad_files_are_skipped_with_a_reason(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=6)
    (root / "class_0" / "empty.jpg").write_bytes(b"")
    (root / "class_0" / "page.jpg").write_text("<html>not an image</html>")
    good = (root / "class_1" / "img_000.png").read_bytes()
    (root / "class_1" / "cut.png").write_bytes(good[: len(good) // 2])
    (root / "class_1" / "notes.txt").write_text("hello")
    (root / "class_1" / ".DS_Store").write_bytes(b"\0\0")
    folder = scan(root)
    reasons = {p.rsplit("/", 1)[-1]: r for p, r in ((s["path"], s["reason"]) for s in folder.skipped)}
    assert set(reasons) == {"empty.jpg", "page.jpg", "cut.png", "notes.txt", ".DS_Store"}
    assert reasons[".DS_Store"] == "hidden file"
    assert "0 bytes" in reasons["empty.jpg"] and "not an image" in reasons["notes.txt"]
    assert len(folder.train) + len(folder.val) == 12


def test_nested_folders_belong_to_their_class(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=4)
    (root / "class_0" / "more").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "class_0" / "more" / "x.png")
    folder = scan(root)
    assert len(folder.train) + len(folder.val) == 9


@pytest.mark.parametrize("case,message", [
    ("missing", "not found"),
    ("file", "not a data folder"),
    ("no_classes", "no class subfolders"),
    ("one_class", "only one class"),
    ("empty_class", "no readable image"),
    ("all_corrupt", "no readable image"),
])
def test_unusable_folders_raise_one_clear_error(tmp_path, case, message):
    root = tmp_path / "d"
    if case == "file":
        root.write_text("x")
    elif case == "no_classes":
        root.mkdir()
        (root / "loose.png").write_bytes(b"")
    elif case == "one_class":
        make_folder(root, classes=1)
    elif case in ("empty_class", "all_corrupt"):
        make_folder(root, classes=2)
        (root / "zzz").mkdir()
        if case == "all_corrupt":
            (root / "zzz" / "a.jpg").write_bytes(b"garbage")
    with pytest.raises(DataError, match=message):
        scan(root)


def test_bad_val_split():
    with pytest.raises(UsageError):
        scan(".", val_split=1.5)


def test_augment_spec():
    assert parse_augment("none") == {}
    assert parse_augment("flip,zoom=0.3") == {"flip": True, "zoom": 0.3}
    assert parse_augment(None) == {"flip": True, "rotation": 0.1, "zoom": 0.1, "contrast": 0.1}
    assert parse_augment("grayscale,hue=0.1") == {"grayscale": 0.2, "hue": 0.1}
    assert parse_augment("basic") == parse_augment(None)
    assert parse_augment("style,hue=0.1") == {**parse_augment(None), "brightness": 0.2,
                                              "saturation": 0.3, "hue": 0.1, "grayscale": 0.2}
    with pytest.raises(UsageError, match="unknown augmentation"):
        parse_augment("blur")
    with pytest.raises(UsageError, match="not a number"):
        parse_augment("zoom=big")
    assert parse_augment("basic,augmix") == {**parse_augment(None), "augmix": 3.0}
    assert parse_augment("rotation=0.5,hue=0,crop=0.95,augmix=10") == {
        "rotation": 0.5, "hue": 0.0, "crop": 0.95, "augmix": 10.0}


@pytest.mark.parametrize("spec", ["augmix=11", "augmix=0", "grayscale=5", "zoom=1",
                                  "rotation=-0.1", "hue=0.6", "crop=0.99", "contrast=1.5",
                                  "saturation=nan", "brightness=inf", "style,hue=2"])
def test_augment_strength_out_of_range(spec):
    """A strength past its range would silently give repeated or broken views: refused."""
    key = spec.split(",")[-1].partition("=")[0]
    with pytest.raises(UsageError, match=rf"--augment {key}=\S+ is out of range: {key} takes"):
        parse_augment(spec)


@pytest.mark.parametrize("spec", ["flip=0.3", "basic=0.2", "style=1"])
def test_augment_names_without_value(spec):
    with pytest.raises(UsageError, match="takes no value"):
        parse_augment(spec)


def test_augment_dict_from_the_api_is_checked():
    from graftkit.train.workflow import make_options

    assert make_options(augment={"flip": True, "zoom": 0.2}).augment == {"flip": True, "zoom": 0.2}
    with pytest.raises(UsageError, match="grayscale=5 is out of range"):
        make_options(augment={"grayscale": 5})
    with pytest.raises(UsageError, match="not a number"):
        make_options(augment={"zoom": "big"})
    with pytest.raises(UsageError, match="unknown augmentation 'blur'"):
        make_options(augment={"blur": 1})


def test_pipeline_streams_batches(tmp_path):
    root = make_folder(tmp_path / "d", classes=2, per_class=5, size=20)
    folder = scan(root)
    ds = make_dataset(folder.train.paths, folder.train.labels, 16, 3, shuffle=True)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [3, 3, 2]
    assert batches[0][0].dtype.name == "float32" and float(batches[0][0].numpy().max()) > 1
