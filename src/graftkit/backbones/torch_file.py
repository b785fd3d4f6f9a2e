"""Read a PyTorch ``.pth`` state dict into numpy arrays without torch and without running code.

A ``.pth`` file is a pickle, and unpickling runs whatever callables the file names. The
unpickler below resolves only the handful of globals a state dict needs and refuses every
other one, so a crafted file raises ``UnsafeFileError`` instead of executing anything.
Both of torch's formats are read: the legacy one (five pickles followed by raw storages) and
the zip one (``data.pkl`` plus one member per storage).
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafeFileError(pickle.UnpicklingError):
    """The file names a global that a plain state dict never needs."""


@dataclass
class _Storage:
    dtype: np.dtype
    key: str
    data: np.ndarray | None = None


@dataclass
class _TensorRef:
    storage: _Storage
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def to_numpy(self) -> np.ndarray:
        flat = self.storage.data
        assert flat is not None, "the storage was read before its tensors"
        itemsize = flat.dtype.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[self.offset :],
            shape=self.shape,
            strides=tuple(s * itemsize for s in self.stride),
            writeable=False,
        )
        return np.array(view)  # contiguous copy, independent of the storage buffer


def _rebuild_tensor_v2(storage, storage_offset, size, stride, *_ignored):
    return _TensorRef(storage, int(storage_offset), tuple(size), tuple(stride))


class _StorageType:
    def __init__(self, name: str):
        self.dtype = np.dtype(_STORAGE_DTYPES[name])


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, storages: dict[str, _Storage]):
        super().__init__(file)
        self._storages = storages

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeFileError(
            f"refusing to load global {module}.{name}: a weights file should only hold tensors"
        )

    def persistent_load(self, pid):
        # ('storage', storage_type, key, location, numel[, view_metadata])
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise UnsafeFileError(f"unexpected persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        if not isinstance(storage_type, _StorageType):
            raise UnsafeFileError(f"unexpected storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = _Storage(storage_type.dtype, key)
        return self._storages[key]


class _PlainUnpickler(pickle.Unpickler):
    """For the legacy header pickles, which hold only ints, dicts and strings."""

    def find_class(self, module: str, name: str):
        raise UnsafeFileError(f"refusing to load global {module}.{name} in a file header")


def _materialise(obj):
    if isinstance(obj, _TensorRef):
        return obj.to_numpy()
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v)) for k, v in obj.items())
    return obj


def _load_legacy(f) -> dict:
    magic = _PlainUnpickler(f).load()
    if magic != LEGACY_MAGIC:
        raise pickle.UnpicklingError("not a PyTorch file (wrong magic number)")
    _PlainUnpickler(f).load()  # protocol version
    _PlainUnpickler(f).load()  # sys info
    storages: dict[str, _Storage] = {}
    state = _StateDictUnpickler(f, storages).load()
    keys = _PlainUnpickler(f).load()
    for key in keys:
        (numel,) = struct.unpack("<q", f.read(8))
        storage = storages[str(key)]
        nbytes = numel * storage.dtype.itemsize
        buf = f.read(nbytes)
        if len(buf) != nbytes:
            raise pickle.UnpicklingError("file is truncated")
        storage.data = np.frombuffer(buf, dtype=storage.dtype)
    return state


def _load_zip(path: Path) -> dict:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise pickle.UnpicklingError("zip file has no data.pkl")
        prefix = pkl[: -len("data.pkl")]
        storages: dict[str, _Storage] = {}
        state = _StateDictUnpickler(io.BytesIO(zf.read(pkl)), storages).load()
        for key, storage in storages.items():
            storage.data = np.frombuffer(zf.read(f"{prefix}data/{key}"), dtype=storage.dtype)
    return state


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Return the file's state dict as ``{name: numpy array}`` in file order."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        state = _load_zip(path)
    else:
        with open(path, "rb") as f:
            state = _load_legacy(f)
    if not isinstance(state, dict):
        raise pickle.UnpicklingError("the file does not hold a state dict")
    return _materialise(state)
