"""The people pages (``gateway/console/users.py``): an administrator adds an account (its roles wait for a
second administrator), disables and enables others but never acts on their own account; one's own
account makes new recovery codes; sessions are ended by their owner or an administrator.

Over the real admin listener of the package's one gateway (tests/console/conftest.py); every test
makes its own accounts, named ``users-…``.
"""

from __future__ import annotations

from gateway.console import security
from gateway.console.login import WRONG_LOGIN
from tests.helpers.console import audits, login, password_step, shared


@shared
async def test_a_new_account_starts_without_roles_until_a_second_administrator_approves(world):
    first = await world.person("users-admin-a", "admin")
    second = await world.person("users-admin-b", "admin")
    async with world.browser() as b:
        await login(b, first)
        page = await b.get("/console/users")
        assert page.has("//form[@id='add-user']//input[@name='name']")
        page = await b.post("/console/users", {"name": " Users-New ", "role_operator": "on", "content": "on"})
        assert page.status == 200, page.error
        [password] = page.xpath("//code[@id='initial-password']/text()")
        assert page.has("//table[@id='users']//tr[@data-user='users-new']")
        page = await b.get("/console/users")
        assert not page.has("//code[@id='initial-password']") and password not in page.text  # shown once
    new = await world.accounts.user("users-new")
    assert (new.roles, new.content, new.state, new.must_change, new.enrolled, new.created_by) == \
        ((), False, "active", True, False, "console:users-admin-a")
    assert security.verify_password(new.password_hash, password)
    [req] = [a for a in await world.approvals.requests("pending") if a.kind == "user.roles" and a.target == "users-new"]
    assert (req.params, req.requested_by, req.reason) == ({"roles": ["operator"], "content": True}, "console:users-admin-a",
                                                          "new account")
    async with world.browser() as b:
        await login(b, second)
        page = await b.post(f"/console/approvals/{req.id}/approve")
        assert page.path == "/console/approvals", page.error
    new = await world.accounts.user("users-new")
    assert (new.roles, new.content) == (("operator",), True)
    [added] = [r for r in await audits(world.store, "user.added") if r["detail"]["user"] == "users-new"]
    assert (added["actor"], added["detail"]["roles"], added["detail"]["content"]) == ("console:users-admin-a", [], False)
    [changed] = [r for r in await audits(world.store, "user.roles_changed") if r["detail"]["user"] == "users-new"]
    assert (changed["actor"], changed["detail"]["requested_by"], changed["detail"]["after"]) == \
        ("console:users-admin-b", "console:users-admin-a", ["operator"])


@shared
async def test_a_user_name_is_checked_and_unique(world):
    admin = await world.person("users-admin-c", "admin")
    before = [(u.name, u.roles, u.content) for u in await world.accounts.users()]
    async with world.browser() as b:
        await login(b, admin)
        for name in ("x", "1abc", "bad name", "bad/name", "a" * 41, "élan", ""):
            page = await b.post("/console/users", {"name": name, "role_auditor": "on"})
            assert page.status == 400 and "a user name is 2 to 40" in page.error, name
            assert not page.has("//code[@id='initial-password']"), name
        page = await b.post("/console/users", {"name": "BOSS", "role_auditor": "on"})  # the same name, in capitals
        assert page.status == 409 and "exists already" in page.error
        assert not page.has("//code[@id='initial-password']")
    assert [(u.name, u.roles, u.content) for u in await world.accounts.users()] == before  # nobody added, nothing changed
    assert [a for a in await world.approvals.requests("pending") if a.requested_by == f"console:{admin.name}"] == []


@shared
async def test_an_administrator_disables_others_but_not_themselves(world):
    admin = await world.person("users-admin-d", "admin")
    other = await world.person("users-other", "operator")
    async with world.browser() as theirs, world.browser() as b:
        await login(theirs, other)
        await login(b, admin)
        page = await b.get("/console/users")
        assert page.has("//tr[@data-user='users-other']//form[@action='/console/users/users-other/disable']")
        assert not page.has("//tr[@data-user='users-admin-d']//form")  # nothing offered on one's own row
        for action in ("disable", "reset-mfa", "roles"):  # nor done when posted anyway
            page = await b.post(f"/console/users/{admin.name}/{action}", {"role_operator": "on", "reason": "me too"})
            assert page.status == 403 and "your own account" in page.error, action
        me = await world.accounts.user(admin.name)
        assert (me.state, me.enrolled, me.roles) == ("active", True, ("admin",))
        assert await world.session_of(b) is not None

        page = await b.post(f"/console/users/{other.name}/disable", follow=False)
        assert (page.status, page.location) == (303, "/console/users?done=disable+done")
        assert (await world.accounts.user(other.name)).state == "disabled"
        page = await theirs.get("/console/messages", follow=False)  # their session ended with the account
        assert (page.status, page.location) == (303, "/console/login?next=/console/messages")
        page = await password_step(theirs, other)
        assert (page.status, page.error) == (401, WRONG_LOGIN)  # the right password, refused

        page = await b.post(f"/console/users/{other.name}/enable")
        assert (page.status, page.path) == (200, "/console/users"), page.error
        page = await b.post(f"/console/users/{other.name}/promote")
        assert page.status == 404
        page = await b.post("/console/users/nobody-here/disable")
        assert page.status == 409 and "no user 'nobody-here'" in page.error
        await login(theirs, other)  # enabled: the account logs in again
    denied = [r["detail"]["path"] for r in await audits(world.store, "console.denied") if r["actor"] == f"console:{admin.name}"]
    assert sorted(denied) == sorted(f"/console/users/{admin.name}/{a}" for a in ("disable", "reset-mfa", "roles"))
    done = [(r["action"], r["actor"]) for r in await audits(world.store, "user.disabled") + await audits(world.store, "user.enabled")
            if r["detail"]["user"] == other.name]
    assert sorted(done) == [("user.disabled", f"console:{admin.name}"), ("user.enabled", f"console:{admin.name}")]


@shared
async def test_new_recovery_codes_replace_the_old_ones(world):
    p = await world.person("users-codes", "auditor")
    async with world.browser() as b:
        await login(b, p)
        page = await b.get("/console/account")
        assert "10 unused" in page.text and not page.has("//ol[@id='recovery-codes']")
        page = await b.post("/console/account/recovery")
        assert page.status == 200, page.error
        fresh = [c.strip() for c in page.xpath("//ol[@id='recovery-codes']/li/code/text()")]
        assert len(set(fresh)) == 10 and not set(fresh) & set(p.codes)
        page = await b.get("/console/account")
        assert "10 unused" in page.text and not page.has("//ol[@id='recovery-codes']") and fresh[0] not in page.text
        await b.post("/console/logout")
        await password_step(b, p)
        page = await b.post("/console/mfa/recovery", {"recovery_code": p.codes[0]})
        assert page.status == 401 and "not valid" in page.error  # an earlier code no longer works
        page = await b.post("/console/mfa/recovery", {"recovery_code": fresh[0]})
        assert page.path == "/console/", page.error
    assert await world.accounts.recovery_left(p.name) == 9


@shared
async def test_a_session_is_ended_by_its_owner_or_an_administrator_only(world):
    owner = await world.person("users-sessions", "operator")
    stranger = await world.person("users-stranger", "operator")
    admin = await world.person("users-admin-e", "admin")
    async with world.browser() as one, world.browser() as two, world.browser() as b:
        await login(one, owner)
        await login(two, owner)
        first, second = await world.session_of(one), await world.session_of(two)
        page = await one.get("/console/account")
        assert page.has(f"//table[@id='sessions']//form[@action='/console/sessions/{second.id_hash}/revoke']")
        assert not page.has(f"//form[@action='/console/sessions/{first.id_hash}/revoke']")  # this one: logout instead
        page = await one.post(f"/console/sessions/{second.id_hash}/revoke", follow=False)
        assert (page.status, page.location) == (303, "/console/account?done=session+ended")
        assert await world.accounts.session(second.id_hash) is None
        assert (await two.get("/console/account")).path == "/console/login"

        await login(b, stranger)
        page = await b.post(f"/console/sessions/{first.id_hash}/revoke")
        assert page.status == 403 and "only administrators" in page.error
        assert await world.session_of(one) is not None
        page = await b.post(f"/console/sessions/{'0' * 64}/revoke")
        assert page.status == 404
    async with world.browser() as b:
        await login(b, admin)
        page = await b.get("/console/users")
        assert page.has(f"//table[@id='all-sessions']//form[@action='/console/sessions/{first.id_hash}/revoke']")
        page = await b.post(f"/console/sessions/{first.id_hash}/revoke", follow=False)
        assert (page.status, page.location) == (303, "/console/users?done=session+ended")
    assert await world.accounts.session(first.id_hash) is None
    revoked = [(r["actor"], r["detail"]["session"]) for r in await audits(world.store, "console.session_revoked")
               if r["detail"]["user"] == owner.name]
    assert sorted(revoked) == sorted([(f"console:{owner.name}", second.id_hash[:12]), (f"console:{admin.name}", first.id_hash[:12])])
