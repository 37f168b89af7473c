"""``type = "directory"``: each invoice and its facts as files in an ERP's inbox folder."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import Executor

from ..config.model import Destination
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

    def write(self, message_id: str, document: bytes, facts: DocumentFacts) -> None:
        # Mode 0640: readable by the ERP's group even under the service's UMask=0077.
        write_aside(self.folder, f"{message_id}.json", json.dumps(facts.as_json(), indent=2, sort_keys=True).encode() + b"\n",
                    0o640)
        write_aside(self.folder, f"{message_id}.{'pdf' if facts.media_type == 'application/pdf' else 'xml'}", document, 0o640)
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
