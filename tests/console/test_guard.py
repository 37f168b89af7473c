"""What a handler declares and the guard knows (``gateway/console/guard.py``): ``@page`` specs, the
request's ``Context`` under a typed request key, the relying party of a passkey ceremony and a JSON
body (refused with ``Refused``).  (The checks themselves, Host, Origin, CSRF, session, run in ``app.Console._guard``:
tests/console/test_app.py.)"""

from __future__ import annotations

import asyncio
import warnings
from unittest import mock

import pytest
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_exceptions import NotAppKeyWarning
from aiohttp.web_request import BaseRequest

from gateway.console.approvals import ApprovalPages
from gateway.console.guard import PUBLIC, Page, Refused, json_body, page, relying_party
from gateway.console.login import LoginPages
from gateway.console.messages import MessagePages
from gateway.console.users import UserPages
from tests.helpers.console import Browser, audits, password_step, shared


def json_request(body: bytes) -> web.Request:
    """A POST whose body is ``body``, as the passkey script sends one (Content-Type: application/json)."""
    payload = streams.StreamReader(mock.Mock(_reading_paused=False), 2**16, loop=asyncio.get_running_loop())
    payload.feed_data(body)
    payload.feed_eof()
    return make_mocked_request("POST", "/console/passkey/login/verify", headers={
        "Host": "localhost:8443", "Content-Type": "application/json"}, payload=payload)


# --- 1. what a handler declares ------------------------------------------------------------------------


def test_page_marks_the_handler_with_what_it_needs():
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="the same handler")

    assert page("users.manage", fresh=True)(handler) is handler  # marked, not wrapped: the router calls it as it is
    assert handler.console_page == Page("users.manage", fresh=True, stage="full")

    async def second_factor(request: web.Request) -> web.Response:
        return web.Response()

    assert page(stage="mfa")(second_factor).console_page == Page(None, fresh=False, stage="mfa")  # any user, mid-login
    assert page()(second_factor).console_page == Page(None, fresh=False, stage="full")
    assert PUBLIC == Page(None, fresh=False, stage="none") and PUBLIC.stage not in ("full", "mfa")


def test_the_console_handlers_declare_their_permission_freshness_and_stage():
    """What the guard enforces comes from these marks: a handler that lost its mark would be public."""
    assert not hasattr(LoginPages.login, "console_page") and not hasattr(LoginPages.logout, "console_page")
    assert LoginPages.mfa_totp.console_page == Page(None, stage="mfa")
    assert LoginPages.mfa_recovery.console_page == Page(None, stage="mfa")
    assert MessagePages.content.console_page == Page("content", fresh=True)
    assert MessagePages.dead_letters_act.console_page == Page("messages.act")
    assert ApprovalPages.decide.console_page == Page("view", fresh=True)
    assert UserPages.user_add.console_page == Page("users.manage", fresh=True)
    assert UserPages.user_act.console_page == Page("users.manage", fresh=True)
    assert UserPages.new_recovery_codes.console_page == Page(None, fresh=True)


# --- 2. a passkey ceremony's relying party and body -------------------------------------------------------


@pytest.mark.parametrize("host, rp_id, origin", [
    ("localhost:8443", "localhost", "http://localhost:8443"),
    ("console.example.test", "console.example.test", "http://console.example.test"),
    ("gateway.example.test:9000", "gateway.example.test", "http://gateway.example.test:9000"),
])
def test_relying_party_is_the_name_the_console_was_opened_by(host, rp_id, origin):
    assert relying_party(make_mocked_request("POST", "/console/passkey/login/options", headers={"Host": host})) == \
        (rp_id, origin)


@pytest.mark.parametrize("host", ["127.0.0.1:8443", "10.0.0.1", "[::1]:8443", "[fe80::1]", "[2001:db8::7]:8443"])
def test_relying_party_refuses_an_address(host):
    with pytest.raises(Refused) as refused:
        relying_party(make_mocked_request("POST", "/console/passkey/login/options", headers={"Host": host}))
    assert (refused.value.status, refused.value.audit) == (400, False)
    assert "by a name, not an address" in refused.value.message and "://localhost:" in refused.value.message


async def test_json_body_is_an_object_or_refused():
    assert await json_body(json_request(b'{"id": "abc", "response": {}}')) == {"id": "abc", "response": {}}
    assert await json_body(json_request(b'["id", "abc"]')) == {}  # JSON, but not an object: nothing to read
    for body in (b"id=abc&response=", b"", b'{"id": '):
        with pytest.raises(Refused) as refused:
            await json_body(json_request(body))
        assert (refused.value.status, refused.value.message, refused.value.audit) == \
            (400, "the request body is not JSON", False), body


@shared
async def test_a_passkey_login_by_address_or_without_json_is_refused_before_any_factor_is_checked(world):
    p = await world.person("guard-passkey", "operator")
    by_address = f"http://127.0.0.1:{world.running.gw.admin_port}"
    async with Browser(by_address) as b:
        answer = await password_step(b, p)
        assert answer.path == "/console/mfa", answer.error
        async with b.s.post(by_address + "/console/passkey/login/options", json={}, headers={"X-CSRF-Token": b.csrf}) as r:
            assert r.status == 400  # the console names the address to use instead
            assert f"http://localhost:{world.running.gw.admin_port}/console/" in await r.text()
    async with world.browser() as b:
        answer = await password_step(b, p)
        assert answer.path == "/console/mfa", answer.error
        async with b.s.post(world.base + "/console/passkey/login/verify", data=b"{not json",
                            headers={"X-CSRF-Token": b.csrf, "Content-Type": "application/json"}) as r:
            assert r.status == 400 and "the request body is not JSON" in await r.text()
        assert (await world.session_of(b)).stage == "mfa"  # still mid-login: the second factor can follow
    assert (await world.accounts.user(p.name)).failed_logins == 0  # a malformed request is not a failed factor
    assert [r for r in await audits(world.store, "console.denied") if r["actor"] == f"console:{p.name}"] == []


# --- 3. the request's context ----------------------------------------------------------------------------


@shared
async def test_request_storage_uses_request_keys(world, monkeypatch):
    monkeypatch.setattr(BaseRequest, "_seen_str_keys", set())  # as in a fresh process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with world.browser() as b:
            page = await b.get("/console/login")
            assert page.status == 200 and page.has("//form[@id='login']")
    assert [str(w.message) for w in caught if issubclass(w.category, NotAppKeyWarning)] == []
