"""Files written whole or not at all: a crash, an error or another process never sees half a file."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write (unique per call, so processes writing the
    same file do not share it); on success it is fsynced and renamed over ``path`` (readers see the
    old file or the whole new one), on failure removed (``path`` is left as it was); the directory
    is fsynced too, so that the rename outlives a power loss."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        # mkstemp's 0600 would outlive the rename: an ordinary file's mode
        os.chmod(tmp, 0o666 & ~current_umask())
        yield Path(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make the renames into ``directory`` durable (where the platform lets a directory be opened)."""
    try:
        handle = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:  # some file systems refuse fsync on a directory: the rename stands anyway
        pass
    finally:
        os.close(handle)


def current_umask() -> int:
    """The process's umask: read from ``/proc`` where there is one (setting it to read it, the
    fallback, leaves a moment in which another thread's new files get mode 0666)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0)  # read by setting: put straight back
    os.umask(mask)
    return mask


@contextlib.contextmanager
def directory_lock(
    directory: Path, doing: str, busy: Callable[[], Exception] | None = None
) -> Iterator[None]:
    """An exclusive ``flock`` on ``directory`` itself (no lock file left behind) for the processes
    of this host; released when the block ends or the process dies. Waited for, or with ``busy``,
    refused at once: ``busy()`` is raised while another process holds it. Without ``flock`` (not
    POSIX, or a file system that refuses it: Lustre without flock, some FUSE mounts) a warning,
    and the block runs unlocked."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    handle = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy is not None else 0))
        except BlockingIOError:
            raise busy() from None  # type: ignore[misc]
        except OSError as error:  # ENOLCK, EOPNOTSUPP
            log.warning("%s: cannot lock it (%s); %s without the lock", directory, error.strerror, doing)
        yield
    finally:
        os.close(handle)  # releases the lock


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, payload: Any) -> None:
    """``payload`` as strict JSON (indented, one trailing newline): a number that is not finite (a
    diverged run's NaN loss) is written ``null``, since strict readers (``jq``, JavaScript, Go)
    refuse Python's ``NaN`` and ``Infinity``; tensors and NumPy numbers are written as numbers."""
    write_text_atomic(path, json.dumps(_strict(payload), indent=2, allow_nan=False) + "\n")


def _strict(value: Any) -> Any:
    if callable(getattr(value, "item", None)):  # a NumPy scalar or 0-d tensor: its Python value
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            return value  # more than one element: json.dumps names its type
    if isinstance(value, Mapping):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value
