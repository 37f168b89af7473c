"""The one recipe for durable files: write aside, fsync, rename into place, fsync the folder.

A reader sees the old content or the new, never a mix, and what was written survives a crash.
Used for the partners file, the configuration ``init`` writes, backups and the ERP's folder.

``replace_many`` is the same recipe for many files at once (a delivery batch to the ERP's folder):
every file is written under a dot-name, all of them are made durable by one ``syncfs(2)`` of the
folder's file system (where the C library offers it; else each file is fsynced as it is written),
then each is renamed into place and the folder is fsynced once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import sys
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
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


@functools.cache
def _libc_syncfs() -> Callable[[int], int] | None:
    """syncfs(2) from the C library (Linux, glibc 2.14 and later; Python's ``os`` has no binding), or None."""
    if sys.platform != "linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
    return fn


def sync_method() -> str:
    """How ``replace_many`` makes a batch durable here: "syncfs" (one call) or "fsync" (each file)."""
    return "syncfs" if _libc_syncfs() is not None else "fsync"


def syncfs(fd: int) -> None:
    """Write out everything the file system holding ``fd`` has in memory, and wait for it (syncfs(2);
    since Linux 5.8 it reports a write-back error of any file there, as fsync would)."""
    fn = _libc_syncfs()
    if fn is None:
        raise OSError(errno.ENOSYS, "syncfs is not available on this system")
    if fn(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write_hidden(folder: Path, name: str, data: bytes, mode: int, gid: int | None, sync: bool) -> Path:
    """``data`` in a new dot-file beside ``folder/name``, mode ``mode`` (and group ``gid``) before anything
    is in it; fsynced if ``sync``.  Returns its path; on failure nothing is left behind."""
    tmp = folder / f".{name}.{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        try:
            if gid is not None and os.fstat(fd).st_gid != gid:  # (a setgid folder has given it the group already)
                os.fchown(fd, -1, gid)
            os.fchmod(fd, mode)  # whatever the umask (the service runs with UMask=0077); after fchown, which may clear bits
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_aside(folder: Path, name: str, data: bytes, mode: int, gid: int | None = None) -> None:
    """``folder/name`` replaced by ``data``: written under a dot-name, fsynced, renamed into place
    (the folder itself is not fsynced: a caller writing several files syncs it once).  With ``gid``
    the file belongs to that group before it gets its name."""
    tmp = _write_hidden(folder, name, data, mode, gid, sync=True)
    try:
        os.replace(tmp, folder / name)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@dataclass(frozen=True, slots=True)
class FileFailure:
    """Why one group of ``replace_many`` is not in place: the file it stopped at ("" for a step of the
    whole batch: the sync of the files or of the folder) and the system's error."""

    name: str
    error: OSError

    def explain(self, folder: Path) -> str:
        reason = self.error.strerror or str(self.error)
        return (f"cannot write {self.name} in {folder}: {reason}" if self.name
                else f"cannot make the files written in {folder} durable: {reason}")


def replace_many(folder: Path, groups: Sequence[Sequence[tuple[str, bytes]]], mode: int,
                 gid: int | None = None) -> list[FileFailure | None]:
    """Each group's files (name, content) written into ``folder`` as ``write_aside`` would, all groups with
    one sync: every file under a dot-name, then one ``syncfs`` (or, without it, an fsync of each file as
    it is written), then each renamed into place in its group's order (a later file of a group is
    visible only with the earlier ones), then one fsync of the folder.

    Returns, per group, None (every file in place and durable) or where it stopped: a file that cannot be
    written or renamed stops its own group only (its files not yet renamed are removed); a failed sync
    stops every group it covered.  A crash at any point leaves whole files or none under the real names
    (at worst stray dot-files): a group reported in place survives, any other may be written again."""
    use_syncfs = _libc_syncfs() is not None
    failures: list[FileFailure | None] = [None] * len(groups)
    aside: list[list[tuple[Path, str]]] = [[] for _ in groups]  # per group: (temporary file, final name), in order
    try:
        for i, files in enumerate(groups):
            for name, data in files:
                try:
                    aside[i].append((_write_hidden(folder, name, data, mode, gid, sync=not use_syncfs), name))
                except OSError as exc:
                    failures[i] = FileFailure(name, exc)
                    _discard(aside[i])
                    break
        if not any(aside):
            return failures
        dirfd = os.open(folder, os.O_RDONLY)
        try:
            if use_syncfs:
                try:
                    syncfs(dirfd)
                except OSError as exc:
                    for i, written in enumerate(aside):
                        if written:
                            failures[i] = FileFailure("", exc)
                            _discard(written)
                    return failures
            shown: list[int] = []  # groups with a file under its real name
            for i, written in enumerate(aside):
                while written:
                    tmp, name = written[0]
                    try:
                        os.replace(tmp, folder / name)
                    except OSError as exc:
                        failures[i] = FileFailure(name, exc)
                        _discard(written)
                        break
                    written.pop(0)
                    if not shown or shown[-1] != i:
                        shown.append(i)
            try:
                os.fsync(dirfd)
            except OSError as exc:  # the names may not survive a crash: written again at the next attempt
                for i in shown:
                    failures[i] = failures[i] or FileFailure("", exc)
        finally:
            os.close(dirfd)
    except BaseException:
        for written in aside:
            _discard(written)
        raise
    return failures


def _discard(written: list[tuple[Path, str]]) -> None:
    for tmp, _ in written:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    written.clear()


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
