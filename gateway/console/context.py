"""What a page group uses of the console (``app.Console`` is the one implementation)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from aiohttp import web

from ..config.model import Config
from ..partners.directory import PartnerDirectory
from ..stages.signature import SigningKey
from ..storage.base import Store
from ..vault import Vault

T = TypeVar("T")


class ConsoleContext(Protocol):
    config: Config
    store: Store
    partners_changed: Callable[[], Awaitable[None]] | None  # re-read the partners file now (the console just wrote it)

    # The gateway's current parts (they change on a reload), and its outbox and refusal counters.
    directory: Callable[[], PartnerDirectory]
    vault: Callable[[], Vault]
    signer: Callable[[], SigningKey | None]
    wake_outbox: Callable[[], None]
    rejections: Callable[[], dict[str, float]]

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the gateway's I/O executor."""

    def render(self, request: web.Request, template: str, context: dict[str, Any], status: int = 200) -> web.Response:
        """A page from ``templates/``, with what every page shows (the user, the CSRF token, the flash)."""

    def actor(self, request: web.Request) -> str:
        """The logged-in user as the audit log names them."""

    async def hash_password(self, password: str) -> str:
        """An argon2id hash, on the console's one hashing thread."""

    async def check_password(self, stored: str | None, password: str) -> bool:
        """A password check on the hashing thread; ``Refused`` (429) when too many are waiting."""

    def first_this_minute(self, key: str) -> bool:
        """Whether ``key`` (a refusal from one address) was not yet audited in the last minute."""
