"""The .pth reader: real file contents, both formats, and refusal of code in pickles."""

from __future__ import annotations

import io
import os
import pickle
import struct
import sys
import types
import zipfile

import numpy as np
import pytest

from graftkit.backbones.efficientnet_lite import pytorch_weights_file
from graftkit.backbones.torch_file import LEGACY_MAGIC, UnsafeFileError, load_state_dict


def test_reads_the_shipped_lite0_file():
    sd = load_state_dict(pytorch_weights_file())
    assert len(sd) == 296
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (1000, 1280)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert np.isfinite(sd["_blocks.15._project_conv.weight"]).all()


class _Marker:
    """Pickles as a call to os.system: what a malicious weights file would contain."""

    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def _legacy_file(payload) -> bytes:
    buf = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    pickle.dump(payload, buf, protocol=2)
    pickle.dump([], buf, protocol=2)
    return buf.getvalue()


def test_malicious_legacy_pickle_is_refused_without_running(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_file({"weight": _Marker()}))
    with pytest.raises(UnsafeFileError, match="posix.system|os.system|nt.system"):
        load_state_dict(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_malicious_zip_pickle_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": _Marker()}, protocol=2))
    with pytest.raises(UnsafeFileError):
        load_state_dict(path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def _fake_torch_modules(monkeypatch):
    """Stand-ins named like torch's globals, so pickle writes the names a real file holds."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:  # noqa: N801 - torch's name
        pass

    def _rebuild_tensor_v2(*args):  # pragma: no cover - never called while writing
        raise AssertionError

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return FloatStorage, _rebuild_tensor_v2


class _Pickler(pickle.Pickler):
    def __init__(self, f, storage_cls, rebuild):
        super().__init__(f, protocol=2)
        self.storage_cls, self.rebuild = storage_cls, rebuild

    def persistent_id(self, obj):
        if isinstance(obj, tuple) and obj and obj[0] == "STORAGE":
            return ("storage", self.storage_cls, obj[1], "cpu", obj[2])
        return None

    def reducer_override(self, obj):
        if isinstance(obj, _FakeTensor):
            return (self.rebuild, (("STORAGE", obj.key, obj.numel), obj.offset, obj.shape,
                                   obj.stride, False, {}))
        return NotImplemented


class _FakeTensor:
    def __init__(self, key, numel, offset, shape, stride):
        self.key, self.numel, self.offset, self.shape, self.stride = key, numel, offset, shape, stride


def test_zip_format_with_strided_views(tmp_path, monkeypatch):
    """A transposed view and an offset view share one storage, as torch writes them."""
    storage_cls, rebuild = _fake_torch_modules(monkeypatch)
    data = np.arange(12, dtype=np.float32)
    state = {
        "a": _FakeTensor("0", 12, 0, (3, 4), (4, 1)),
        "a_t": _FakeTensor("0", 12, 0, (4, 3), (1, 4)),
        "tail": _FakeTensor("0", 12, 8, (4,), (1,)),
    }
    buf = io.BytesIO()
    _Pickler(buf, storage_cls, rebuild).dump(state)
    path = tmp_path / "weights.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", buf.getvalue())
        zf.writestr("archive/data/0", data.tobytes())
    monkeypatch.delitem(sys.modules, "torch")
    sd = load_state_dict(path)
    np.testing.assert_array_equal(sd["a"], data.reshape(3, 4))
    np.testing.assert_array_equal(sd["a_t"], data.reshape(3, 4).T)
    np.testing.assert_array_equal(sd["tail"], data[8:])

    # The same tensors in the legacy format: pickles, then each storage with its element count.
    buf = io.BytesIO()
    for obj in (LEGACY_MAGIC, 1001, {"little_endian": True}):
        pickle.dump(obj, buf, protocol=2)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))
    sys.modules["torch"].FloatStorage = storage_cls
    _Pickler(buf, storage_cls, rebuild).dump(state)
    pickle.dump(["0"], buf, protocol=2)
    buf.write(struct.pack("<q", 12) + data.tobytes())
    legacy = tmp_path / "weights.pth"
    legacy.write_bytes(buf.getvalue())
    sd2 = load_state_dict(legacy)
    np.testing.assert_array_equal(sd2["a_t"], data.reshape(3, 4).T)


def test_truncated_file_is_an_error(tmp_path):
    full = pytorch_weights_file().read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(full[: len(full) // 2])
    with pytest.raises(pickle.UnpicklingError, match="truncated"):
        load_state_dict(path)
