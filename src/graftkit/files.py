"""Files written whole or not at all, and a full disk told apart from other errors.

A file appears under its final name only once complete (temp file + rename), so an interrupted
run never leaves a half-written ``model.keras`` that looks valid. Temp files are created like
``open()`` creates files, so they honour the umask.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
import uuid
from pathlib import Path

from graftkit.errors import DiskFullError, UsageError


def prepare_output_file(path: str | os.PathLike, option: str = "--output") -> Path:
    """A file the user names, checked before the work that fills it: parent made, writable."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder: pass a file path, e.g. {path / 'out.csv'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {option} {path}: {exc.strerror or exc}; choose another "
                         "path") from None
    return path



def prepare_output_dir(path: str | os.PathLike, option: str) -> Path:
    """A folder the user names for files to come, checked before the work: made, writable."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file: pass a folder for the files")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write into {option} {path}: {exc.strerror or exc}; choose "
                         "another folder") from None
    return path



DISK_FULL = (errno.ENOSPC, errno.EDQUOT)



def is_disk_full(exc: BaseException) -> bool:
    """ENOSPC/EDQUOT, also when a library (h5py, Keras' zip writer) wraps it in its own text."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL:
        return True
    text = str(exc)
    return "No space left on device" in text or "Disk quota exceeded" in text



def _new_file(folder: Path, prefix: str, suffix: str) -> str:
    """A new empty file created as ``open()`` does (mode 0666 less the umask), unlike mkstemp's 0600.

    Run folders are read by colleagues, serving accounts and web servers: their files must
    have the permissions of any file the user writes.
    """
    for _ in range(100):
        name = folder / f"{prefix}{uuid.uuid4().hex[:12]}{suffix}"
        try:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return str(name)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {folder}")



def fsync_dir(path: Path) -> None:
    """Make a rename or link in ``path`` durable (POSIX; Windows has no directory handles)."""
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """``write(tmp)`` to a hidden temp file beside ``path``, then rename it into place.

    The temp name keeps every suffix (``.weights.h5``, ``.keras``), which Keras insists on. A
    full disk raises ``DiskFullError`` naming the folder; the file in place stays as it was.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    tmp = None
    try:
        tmp = _new_file(path.parent, f".{stem}-", "".join(path.suffixes))
        write(tmp)
        os.replace(tmp, path)
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(path.parent) from None
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)



def write_text(path: Path, text: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    atomic_write(path, write)



def write_json(path: Path, data) -> None:
    write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (/proc), else by
    setting and restoring it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def honour_umask(path: Path) -> None:
    """Give every file and folder under ``path`` the permissions ``open()`` and ``mkdir`` would
    have given them: converters that write through mkstemp/mkdtemp (coremltools, for one) leave
    0600 files in 0700 folders, which only their owner can read."""
    if os.name == "nt":
        return
    mask = umask()
    for item in [path, *path.rglob("*")] if path.is_dir() else [path]:
        if item.is_symlink():
            continue
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)
