"""Result files are written atomically: a temporary file beside the target, then a rename.

The temporary file is flushed to disk (``fsync``) before the rename and the folder after it, so a
crash leaves the old file or the whole new one under the real name, never a part. Temporary files
that an interrupted write left behind (``.<name>.<random>.tmp``) are removed by the next write into
the same folder once no process holds them and they are a minute old.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from pathlib import Path

try:  # POSIX: a writer holds a lock on its temporary file, so live ones are never cleaned
    import fcntl
except ImportError:  # pragma: no cover - Windows: the age rule alone (open files cannot be deleted)
    fcntl = None

STALE_SECONDS = 60.0
TMP_NAME = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")  # what mkstemp makes of prefix ".<name>." and ".tmp"


def _lock(fd: int, blocking: bool) -> bool:
    """Take an exclusive lock on ``fd``; False when another process holds one (True without fcntl)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except OSError:
        return False
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete temporary files of interrupted writes in ``folder``; returns the ones removed."""
    removed = []
    for tmp in folder.glob(".*.tmp"):
        if not TMP_NAME.match(tmp.name):
            continue
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            old = time.time() - os.fstat(fd).st_mtime > STALE_SECONDS
            if old and _lock(fd, blocking=False):
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass  # another writer's file, or it vanished meanwhile: leave it
        finally:
            os.close(fd)
    return removed


def _sync_folder(folder: Path) -> None:
    """Flush the folder entry of a rename to disk where the platform allows it."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (and Windows) cannot fsync a directory
    finally:
        os.close(fd)


def _explained(exc: OSError, path: Path) -> OSError:
    """The same kind of error, naming the output and its folder instead of a temporary file."""
    message = f"cannot write {path.name} into folder {path.parent}: {exc.strerror or exc}"
    try:
        return type(exc)(exc.errno, message) if exc.errno is not None else type(exc)(message)
    except TypeError:  # an OSError subclass with another constructor
        return OSError(exc.errno, message)


def write_atomic(path: str | Path, payload: str | bytes) -> None:
    """Write ``payload`` to ``path`` so readers see the old file or the whole new one, never a part.

    An ``OSError`` (a read-only folder, a full disk) is re-raised as the same type with a message
    naming ``path`` and its folder.
    """
    path = Path(path)
    data = payload.encode("utf-8") if isinstance(payload, str) else payload
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path.parent)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            _lock(handle.fileno(), blocking=True)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
        tmp = None
        _sync_folder(path.parent)
    except OSError as exc:
        raise _explained(exc, path) from exc
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def check_writable_folder(path: str | Path, what: str) -> None:
    """Fail before any heavy work when results cannot be written under ``path`` (a folder that may not
    exist yet; a ``.json`` path names a file in its parent): its nearest existing ancestor must be a
    folder where a file can be created."""
    path = Path(path)
    folder = path.parent if path.suffix == ".json" else path
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}={str(path)!r} cannot be written: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ValueError(
            f"{what}={str(path)!r} cannot be written: no file can be created in {existing} "
            f"({exc.strerror or exc}); choose a writable folder"
        ) from exc
