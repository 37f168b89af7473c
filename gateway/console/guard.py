"""What the console's guard (``app.Console._guard``) knows of a request, and how a page handler
declares what it needs: ``@page(permission, fresh=…, stage=…)``.  Handlers raise ``Refused`` for an
error page the person can act on, and read a passkey ceremony's request with ``relying_party`` and
``json_body``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from ..storage.records import Session, User

F = TypeVar("F", bound=Callable[..., Any])

SESSION_COOKIE = "egw_console"  # the session token (the store keeps its SHA-256)
LOGIN_CSRF_COOKIE = "egw_login_csrf"  # before login: the double-submit CSRF token


class Refused(Exception):
    """A request the console answers with an error page (status and a message for the person)."""

    def __init__(self, status: int, message: str, audit: bool = True):
        super().__init__(message)
        self.status, self.message, self.audit = status, message, audit


@dataclass(frozen=True, slots=True)
class Page:
    permission: str | None  # None: any logged-in user
    fresh: bool = False  # needs an authentication at most fresh_auth_s old
    stage: str = "full"  # the session stage the handler serves (mfa pages serve "mfa"/"enroll")


def page(permission: str | None = None, *, fresh: bool = False, stage: str = "full") -> Callable[[F], F]:
    def mark(handler: F) -> F:
        handler.console_page = Page(permission, fresh, stage)  # type: ignore[attr-defined]
        return handler
    return mark


PUBLIC = Page(None, stage="none")


@dataclass
class Context:
    """What the guard learnt about a request, and what a handler passes to the page it renders."""

    session: Session | None = None
    user: User | None = None
    login_csrf: str = ""
    error: str = ""
    status: int = 200
    codes: list[str] | None = None  # new recovery codes, shown once
    created: dict[str, Any] | None = None  # a new account and its initial password, shown once


CTX = web.RequestKey("console", Context)


def user_of(request: web.Request) -> User:
    """The logged-in user (the guard lets a handler run only with one)."""
    user = request[CTX].user
    assert user is not None
    return user


def session_of(request: web.Request) -> Session:
    session = request[CTX].session
    assert session is not None
    return session


def relying_party(request: web.Request) -> tuple[str, str]:
    """The WebAuthn relying party id and origin: the host name the console was opened by."""
    host = (request.host or "").rsplit(":", 1)[0].strip("[]")
    if not host or host.replace(".", "").isdigit() or ":" in host:
        raise Refused(400, f"passkeys need the console opened by a name, not an address: use "
                      f"{request.scheme}://localhost:{request.url.port}/console/ (or the host's name)", audit=False)
    return host, f"{request.scheme}://{request.host}"


async def json_body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Refused(400, "the request body is not JSON", audit=False) from None
    return body if isinstance(body, dict) else {}
