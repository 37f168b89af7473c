"""gateway/files.py: the one recipe for durable files.

``atomic_write`` and ``write_aside`` replace a file whole (a reader sees the old content or the new,
never a mix) by writing a temporary dot-file beside it, fsyncing it and renaming it into place; a
failure at any step leaves the old file as it was and no temporary file behind.  New files are mode
0600 (or the mode asked for) whatever the umask; ``atomic_write`` keeps the mode of a file it
replaces.  ``fsync_path`` syncs a file or a folder; ``private`` is an opener that makes 0600 files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from gateway import files
from gateway.files import atomic_write, fsync_path, private, write_aside


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def loose_umask():
    """No umask at all: a new file would be 0666 if the module trusted the umask to narrow it."""
    old = os.umask(0)
    yield
    os.umask(old)


def test_atomic_write_creates_a_private_file(tmp_path: Path, loose_umask) -> None:
    path = tmp_path / "partners.toml"
    atomic_write(path, b"[[partners]]\n")
    assert path.read_bytes() == b"[[partners]]\n"
    assert mode(path) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["partners.toml"]  # no temporary file left


def test_atomic_write_replaces_the_content_whole_with_a_new_inode(tmp_path: Path) -> None:
    """A reader that opened the old file keeps reading the old content: the new one is renamed in."""
    path = tmp_path / "config.toml"
    path.write_bytes(b"old content, longer than the new one\n")
    with path.open("rb") as reader:
        atomic_write(path, b"new\n")
        assert reader.read() == b"old content, longer than the new one\n"
    assert path.read_bytes() == b"new\n"  # no tail of the old content


def test_atomic_write_keeps_the_mode_of_an_existing_file(tmp_path: Path, loose_umask) -> None:
    path = tmp_path / "config.toml"
    path.write_bytes(b"old")
    path.chmod(0o640)  # the operator let the service's group read it
    atomic_write(path, b"new")  # the default mode (0600) is for new files only
    assert (path.read_bytes(), mode(path)) == (b"new", 0o640)
    atomic_write(tmp_path / "fresh", b"x", mode=0o644)
    assert mode(tmp_path / "fresh") == 0o644


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another owner")
def test_atomic_write_as_root_keeps_the_owner(tmp_path: Path) -> None:
    """When root edits the service's file, the service must still be able to read it."""
    path = tmp_path / "partners.toml"
    path.write_bytes(b"old")
    os.chown(path, 12345, 23456)
    atomic_write(path, b"new")
    st = path.stat()
    assert (st.st_uid, st.st_gid, path.read_bytes()) == (12345, 23456, b"new")


@pytest.mark.parametrize("writer", ["atomic_write", "write_aside"])
def test_a_failed_rename_leaves_the_old_file_and_no_temporary_file(tmp_path: Path, monkeypatch, writer: str) -> None:
    path = tmp_path / "invoice.xml"
    path.write_bytes(b"old")
    renamed: list[tuple[str, str]] = []

    def replace(src, dst) -> None:
        renamed.append((Path(src).name, Path(dst).name))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        if writer == "atomic_write":
            atomic_write(path, b"new")
        else:
            write_aside(tmp_path, "invoice.xml", b"new", 0o600)
    monkeypatch.undo()
    [(src, dst)] = renamed
    assert src.startswith(".invoice.xml.") and src.endswith(".tmp") and dst == "invoice.xml"  # written aside, as a dot-file
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["invoice.xml"]


@pytest.mark.parametrize("writer", ["atomic_write", "write_aside"])
def test_a_failed_write_leaves_no_temporary_file(tmp_path: Path, monkeypatch, writer: str) -> None:
    """Even an interruption (KeyboardInterrupt, a cancelled task) during the fsync cleans up."""
    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        if writer == "atomic_write":
            atomic_write(tmp_path / "a", b"data")
        else:
            write_aside(tmp_path, "a", b"data", 0o600)
    assert list(tmp_path.iterdir()) == []


def test_write_aside_sets_the_mode_asked_for_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)  # the service's UMask=0077 would make a 0640 file 0600
    try:
        write_aside(tmp_path, "a.xml", b"<a/>", 0o640)
    finally:
        os.umask(old)
    assert ((tmp_path / "a.xml").read_bytes(), mode(tmp_path / "a.xml")) == (b"<a/>", 0o640)


def test_write_aside_replaces_whole_and_sets_the_new_mode(tmp_path: Path) -> None:
    """Unlike atomic_write, write_aside gives the file the mode asked for, not the old file's."""
    target = tmp_path / "a.json"
    target.write_bytes(b'{"old": "and longer"}')
    target.chmod(0o644)
    write_aside(tmp_path, "a.json", b"{}", 0o600)
    assert (target.read_bytes(), mode(target)) == (b"{}", 0o600)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_write_aside_temporary_names_do_not_collide(tmp_path: Path, monkeypatch) -> None:
    """Two writers of one name (two worker threads) never share a temporary file."""
    seen: list[str] = []
    real = os.replace

    def replace(src, dst) -> None:
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    write_aside(tmp_path, "x", b"1", 0o600)
    write_aside(tmp_path, "x", b"2", 0o600)
    assert len(set(seen)) == 2 and (tmp_path / "x").read_bytes() == b"2"


def test_atomic_write_syncs_the_file_then_the_folder(tmp_path: Path, monkeypatch) -> None:
    """The rename is durable only once the folder is synced: after the file, after the rename."""
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync file")
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append("rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write(tmp_path / "f", b"data")
    assert events == ["fsync file", "rename", "fsync folder"]


def test_fsync_path_on_a_folder_and_a_file(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "f").write_bytes(b"x")
    synced: list[bool] = []  # whether each fsync was of a folder
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    fsync_path(tmp_path)
    fsync_path(tmp_path / "f")
    assert synced == [True, False]
    with pytest.raises(FileNotFoundError):
        fsync_path(tmp_path / "absent")


def test_fsync_path_closes_its_descriptor_even_when_fsync_fails(tmp_path: Path, monkeypatch) -> None:
    opened: list[int] = []
    real_open = os.open

    def track(*args, **kw) -> int:
        fd = real_open(*args, **kw)
        opened.append(fd)
        return fd

    monkeypatch.setattr(files.os, "open", track)
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(files.os, "fsync", failing)
    with pytest.raises(OSError, match="Input/output error"):
        fsync_path(tmp_path)
    monkeypatch.undo()
    [fd] = opened
    with pytest.raises(OSError):
        os.fstat(fd)  # closed


def test_private_opener_makes_0600_files_regardless_of_umask(tmp_path: Path, loose_umask) -> None:
    path = tmp_path / "master.key"
    with open(path, "wb", opener=private) as fh:
        fh.write(b"secret")
    assert (path.read_bytes(), mode(path)) == (b"secret", 0o600)
    with open(tmp_path / "plain", "wb") as fh:  # what the umask alone gives, for contrast
        fh.write(b"x")
    assert mode(tmp_path / "plain") == 0o666
