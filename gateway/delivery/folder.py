"""``type = "directory"``: each invoice and its facts as files in an ERP's inbox folder.

The ERP reads the folder through a group: ``group = "NAME"`` makes that group own the folder (with
the setgid bit, so that every file made in it gets the group from the kernel) and each delivered
file; ``mode`` (default 0640) is each file's mode, and a group that may read the files may search
the folder and remove what it has taken (0770, ``folder_mode``): how an ERP consumes each invoice once.
Both are applied at the first delivery after a start, not by ``check-config``, which only reports
(``access_warnings``) where the ERP's group would be stopped on the way to the folder.
"""

from __future__ import annotations

import asyncio
import grp
import json
import os
import stat
from concurrent.futures import Executor

from ..config.model import Destination, folder_mode
from ..files import fsync_path, write_aside
from ..storage.records import DeliveryJob, DocumentFacts
from .sender import DeliveryFailed


class DirectorySender:
    """Writes ``<message_id>.json`` then ``<message_id>.xml`` (``.pdf`` for a Factur-X PDF) into an ERP's inbox folder.

    Each file is written under a dot-name, fsynced and renamed into place, then the folder is
    fsynced: a reader sees a whole file or none.  The document appears last, so when it is
    there its sidecar is too.  A redelivery after a crash rewrites the same names with the same bytes.
    """

    def __init__(self, dest: Destination, executor: Executor):
        assert dest.path is not None
        self.name = dest.name
        self.concurrency = dest.concurrency
        self.folder = dest.path
        self.executor = executor
        self.group = dest.group
        self.mode = dest.mode
        self._gid: int | None = None
        self._prepared = False

    def prepare(self) -> None:
        """Give the folder its group (setgid) and mode, once; only what differs is changed (a folder
        that tmpfiles.d made right is left alone, as a sandboxed service may not change its group)."""
        if self.group is not None:
            try:
                self._gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise DeliveryFailed(f"the group {self.group!r} (destinations {self.name!r}: group) does not exist: "
                                     f"create it (groupadd {self.group}) or change the configuration") from None
        st = self.folder.stat()
        if self._gid is not None and st.st_gid != self._gid:
            os.chown(self.folder, -1, self._gid)
        setgid = stat.S_ISGID if self._gid is not None else st.st_mode & stat.S_ISGID
        wanted = folder_mode(self.mode) | setgid
        if stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(self.folder, wanted)
        self._prepared = True

    def write(self, message_id: str, document: bytes, facts: DocumentFacts) -> None:
        if not self._prepared:
            self.prepare()
        write_aside(self.folder, f"{message_id}.json", json.dumps(facts.as_json(), indent=2, sort_keys=True).encode() + b"\n",
                    self.mode, self._gid)
        write_aside(self.folder, f"{message_id}.{'pdf' if facts.media_type == 'application/pdf' else 'xml'}", document,
                    self.mode, self._gid)
        fsync_path(self.folder)

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        try:
            await asyncio.get_running_loop().run_in_executor(self.executor, self.write, job.message_id, document,
                                                             job.facts)
        except OSError as exc:
            raise DeliveryFailed(f"cannot write to {self.folder}: {exc.strerror or exc}") from exc
        return "written"

    async def close(self) -> None:
        pass


def access_warnings(dest: Destination, where: str) -> list[str]:
    """What keeps members of ``dest.group`` from reading the delivered files: a group that does not
    exist, or a folder on the way (the inbox itself, or any folder above it) that does not let the
    group search it (or read, search and remove files, for the inbox).  Owner and group bits and "others" are weighed; ACLs are not."""
    if dest.group is None or dest.path is None:
        return []
    try:
        gid = grp.getgrnam(dest.group).gr_gid
    except KeyError:
        return [f"{where}.group: the group {dest.group!r} does not exist, so the ERP cannot read {dest.path}: create it "
                f"(groupadd {dest.group}) and add the ERP's account to it (usermod -aG {dest.group} ERP-USER)"]
    out = []
    folder = dest.path.resolve()
    for path in [folder, *folder.parents]:
        try:
            st = path.stat()
        except OSError as exc:
            out.append(f"{where}.path: cannot check {path} ({exc.strerror or exc})")
            break
        need = (folder_mode(dest.mode) >> 3) & 0o7 if path == folder else 0o1  # the inbox as the gateway sets it; search above
        bits = (st.st_mode >> 3) & 0o7 if st.st_gid == gid else st.st_mode & 0o7
        if bits & need == need:
            continue
        shown = f"{path} (mode {stat.S_IMODE(st.st_mode):04o}, group {_group_name(st.st_gid)})"
        if path == folder:
            out.append(f"{where}.path: {shown} does not let the group {dest.group!r} read it and remove what it took "
                       f"yet; the gateway sets group and mode at its first delivery, or now: chgrp {dest.group} {path} && chmod "
                       f"{folder_mode(dest.mode) | stat.S_ISGID:04o} {path}")
        else:
            out.append(f"{where}.path: {shown} does not let the group {dest.group!r} search it, so the ERP cannot reach "
                       f"{folder}: deliver to a folder outside it (the systemd layout's ERP inbox is /var/spool/einvoice-gateway/inbox, "
                       f"see systemd/einvoice-gateway.tmpfiles), or let the group search it: chgrp {dest.group} {path} && "
                       f"chmod g+x {path}")
    return out


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

