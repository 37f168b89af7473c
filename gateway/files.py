"""The one recipe for durable files: write aside, fsync, rename into place, fsync the folder.

A reader sees the old content or the new, never a mix, and what was written survives a crash.
Used for the partners file, the configuration ``init`` writes, backups and the ERP's folder.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder opens read-only too; fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def private(path: str, flags: int) -> int:
    """``open(..., opener=private)``: a new file is mode 0600 from its first moment."""
    return os.open(path, flags, 0o600)


def write_aside(folder: Path, name: str, data: bytes, mode: int, gid: int | None = None) -> None:
    """``folder/name`` replaced by ``data``: written under a dot-name, fsynced, renamed into place
    (the folder itself is not fsynced: a caller writing several files syncs it once).  With ``gid``
    the file belongs to that group before it gets its name."""
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if gid is not None and os.fstat(fd).st_gid != gid:  # (a setgid folder has given it the group already)
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # whatever the umask (the service runs with UMask=0077); after fchown, which may clear bits
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write a file so that readers see the old or the new content, never a mix, and it survives a crash.
    An existing file keeps its mode (and, when root edits it, its owner: the service must still read it)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with contextlib.suppress(FileNotFoundError):
            st = path.stat()
            os.fchmod(fd, st.st_mode & 0o7777)
            if os.geteuid() == 0:
                os.fchown(fd, st.st_uid, st.st_gid)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
