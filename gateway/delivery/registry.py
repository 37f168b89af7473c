"""The sender for each configured destination, by its kind."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Executor

from ..config.model import Destination
from ..errors import ConfigError
from ..partners.book import PartnerBook
from .email import EmailSender
from .folder import DirectorySender
from .partner import PartnerSender
from .sender import Sender
from .smarthost import Mailer
from .webhook import HttpsSender


def make_sender(dest: Destination, partners: PartnerBook, executor: Executor,
                mailer: Callable[[], Mailer | None] = lambda: None) -> Sender:
    if dest.type == "directory":
        return DirectorySender(dest, executor)
    if dest.type == "https":
        return HttpsSender(dest)
    if dest.type == "email":
        return EmailSender(dest, mailer)
    if dest.type == "partner":
        return PartnerSender(dest, partners, mailer)
    raise ConfigError(f"destinations: {dest.name!r} has type {dest.type!r}, which no sender delivers")
