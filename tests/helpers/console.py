"""The console as a person meets it: a browser (cookies, Origin, CSRF token), accounts ready to log in.

``World`` is one running gateway with its console; ``World.person`` makes an account with a password,
an enrolled authenticator and recovery codes; ``login`` goes through both factors.  ``shared`` marks a
test that runs against the console package's one gateway (``world`` in tests/console/conftest.py).
"""

from __future__ import annotations

import asyncio
import functools
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import lxml.html
import pyotp
import pytest
import tomli_w
from yarl import URL

from gateway.console import security
from gateway.console.guard import SESSION_COOKIE
from gateway.operations import instance
from gateway.storage.base import AccountStore, ApprovalStore, Store
from gateway.storage.records import Session
from gateway.storage.sqlite.store import SqliteStore
from tests.helpers import Running, audit_of

PASSWORD = "correct horse battery staple"  # every test account's password (one argon2 hash for all)
shared = pytest.mark.asyncio(loop_scope="package")  # runs against the package's one gateway (tests/console/conftest.py)

@functools.cache
def password_hash() -> str:
    return security.hash_password(PASSWORD)


async def audits(store: Store, action: str) -> list[dict[str, Any]]:
    """The audit records of one action, newest first, ``detail`` parsed."""
    return list(reversed(await audit_of(store, action)))


@dataclass
class Page:
    status: int
    url: URL
    text: str
    headers: Any
    history: tuple[aiohttp.ClientResponse, ...]

    @property
    def path(self) -> str:
        return self.url.path

    @property
    def location(self) -> str:
        return str(self.headers.get("Location", ""))

    def xpath(self, query: str) -> list[Any]:
        return lxml.html.fromstring(self.text).xpath(query) if self.text.strip() else []

    @property
    def error(self) -> str:
        return " ".join(" ".join(e.itertext()) for e in self.xpath("//*[contains(concat(' ', @class, ' '), ' error ')]"))

    def has(self, query: str) -> bool:
        return bool(self.xpath(query))


class Browser:
    """A browser's view: a cookie jar, the console's own Origin on every request, the page's CSRF token.
    ``address``: the loopback address it connects from (127.0.0.2 …: another source to the console)."""

    def __init__(self, base: str, *, origin: str | None = "", host: str | None = None, address: str | None = None):
        self.base = base
        self.jar = aiohttp.CookieJar(unsafe=True)
        headers = {} if origin is None else {"Origin": origin or base}
        if host is not None:
            headers["Host"] = host
        connector = aiohttp.TCPConnector(local_addr=(address, 0)) if address is not None else None
        self.s = aiohttp.ClientSession(cookie_jar=self.jar, headers=headers, connector=connector)
        self.csrf = ""

    async def __aenter__(self) -> Browser:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.s.close()

    async def _page(self, r: aiohttp.ClientResponse) -> Page:
        text = await r.text()
        page = Page(r.status, r.url, text, r.headers, tuple(r.history))
        if r.content_type == "text/html":
            token = page.xpath("//meta[@name='csrf-token']/@content")
            if token and token[0]:
                self.csrf = str(token[0])
        return page

    async def get(self, path: str, *, follow: bool = True, **kw: Any) -> Page:
        async with self.s.get(self.base + path, allow_redirects=follow, **kw) as r:
            return await self._page(r)

    async def post(self, path: str, data: Any = None, *, follow: bool = True, csrf: bool = True, **kw: Any) -> Page:
        form = list((data or {}).items()) if isinstance(data, dict) else list(data or [])
        if csrf:
            form.append(("csrf", self.csrf))
        async with self.s.post(self.base + path, data=form, allow_redirects=follow, **kw) as r:
            return await self._page(r)

    def cookie(self, name: str = SESSION_COOKIE) -> str | None:
        found = self.jar.filter_cookies(URL(self.base + "/console/")).get(name)
        return None if found is None else found.value


@dataclass
class Person:
    name: str
    roles: tuple[str, ...]
    secret: str
    codes: list[str]
    last_step: int = 0

    async def code(self) -> str:
        """A TOTP code for a step not used yet, within the server's window (waits when both are spent)."""
        while True:
            now = int(time.time() // 30)
            step = max(self.last_step + 1, now)
            if step <= now + 1:
                self.last_step = step
                return pyotp.TOTP(self.secret).at(step * 30)
            await asyncio.sleep((step - 1) * 30 - time.time() + 0.1)


@dataclass
class World:
    inst: instance.Instance
    running: Running
    ids: dict[str, str]  # delivered, dead, pending, foreign, held → message id
    people: dict[str, Person] = field(default_factory=dict)

    @property
    def store(self) -> SqliteStore:
        return self.running.gw.store

    @property
    def accounts(self) -> AccountStore:
        return self.store.accounts

    @property
    def approvals(self) -> ApprovalStore:
        return self.store.approvals

    @property
    def base(self) -> str:
        return f"http://localhost:{self.running.gw.admin_port}"

    def browser(self, **kw: Any) -> Browser:
        return Browser(self.base, **kw)

    async def person(self, name: str, *roles: str, content: bool = False) -> Person:
        """An account with a password, an enrolled authenticator and recovery codes, ready to log in."""
        acc = self.accounts
        await acc.add_user(name, roles, content, password_hash(), "pytest")
        p = Person(name, roles, security.new_totp_secret(), security.new_recovery_codes())
        await acc.enroll_totp(name, p.secret, 0, [security.recovery_hash(c) for c in p.codes])
        await acc.set_password(name, password_hash(), "pytest", must_change=False)
        self.people[name] = p
        return p

    async def session_of(self, b: Browser) -> Session | None:
        token = b.cookie()
        return None if token is None else await self.accounts.session(security.token_hash(token))

    async def sql(self, query: str, *args: Any) -> int:
        return int(await self.store.engine.write(lambda c: c.execute(query, args).rowcount))


async def password_step(b: Browser, who: Person | str, password: str = PASSWORD, **kw: Any) -> Page:
    await b.get("/console/login")
    name = who if isinstance(who, str) else who.name
    return await b.post("/console/login", {"username": name, "password": password}, **kw)


async def login(b: Browser, p: Person) -> Page:
    page = await password_step(b, p)
    assert (page.status, page.path) == (200, "/console/mfa"), (page.status, page.url, page.error)
    page = await b.post("/console/mfa/totp", {"code": await p.code()})
    assert (page.status, page.path) == (200, "/console/"), (page.status, page.url, page.error)
    assert page.xpath("//h1/text()") == ["Dashboard"]
    return page


def set_options(config: Path, **tables: dict[str, Any]) -> None:
    """Set options in the named tables of an instance's configuration (other options kept)."""
    data = tomllib.loads(config.read_text(encoding="utf-8"))
    for name, values in tables.items():
        data.setdefault(name, {}).update(values)
    config.write_text(tomli_w.dumps(data), encoding="utf-8")
