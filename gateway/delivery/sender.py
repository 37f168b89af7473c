"""What every destination kind implements, and how an attempt that did not deliver is reported."""

from __future__ import annotations

from typing import Protocol

from ..storage.records import DeliveryJob

MAX_ERROR_CHARS = 300  # of a reason kept with a job (an ERP's error body, an exception)


class DeliveryFailed(Exception):
    """An attempt that did not deliver.  ``permanent``: retrying cannot help (dead-letter now)."""

    def __init__(self, error: str, *, permanent: bool = False, retry_after: float | None = None):
        super().__init__(error)
        self.error = error[:MAX_ERROR_CHARS]
        self.permanent = permanent
        self.retry_after = retry_after


class Sender(Protocol):
    name: str
    concurrency: int

    async def send(self, job: DeliveryJob, document: bytes) -> str:
        """Deliver or raise DeliveryFailed; returns a short note for the log (e.g. "HTTP 201")."""
        ...

    async def close(self) -> None: ...
