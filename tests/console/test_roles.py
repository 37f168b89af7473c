"""Who may do what (``gateway/console/roles.py``): the permission matrix and the four-eyes needs."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.console.roles import APPROVAL_NEEDS, PERMISSIONS, allowed


@dataclass(frozen=True)
class Who:
    roles: tuple[str, ...]
    content: bool = False


ALL_PERMISSIONS = sorted(set().union(*PERMISSIONS.values()))


def test_auditor_reads_only():
    auditor = Who(("auditor",))
    assert [p for p in ALL_PERMISSIONS if allowed(auditor, p) and p.endswith((".act", ".manage"))] == []
    assert allowed(auditor, "audit.export") and allowed(auditor, "audit.read") and allowed(auditor, "messages.read")


def test_operator_works_messages_but_not_users():
    op = Who(("operator",))
    assert allowed(op, "messages.act")
    assert not allowed(op, "users.manage") and not allowed(op, "partners.manage") and not allowed(op, "audit.export")


def test_admin_does_not_act_on_messages():
    admin = Who(("admin",))
    assert allowed(admin, "users.manage") and allowed(admin, "partners.manage")
    assert not allowed(admin, "messages.act")
    assert not allowed(admin, "audit.export")


def test_content_only_with_the_flag():
    for roles in (("admin",), ("operator",), ("auditor",), ("admin", "operator", "auditor")):
        assert not allowed(Who(roles), "content"), roles
        assert allowed(Who(roles, content=True), "content"), roles
    assert all(not allowed(Who(()), p) for p in ALL_PERMISSIONS)
    assert all(not allowed(Who(("root",)), p) for p in ALL_PERMISSIONS)  # an unknown role grants nothing


def test_every_four_eyes_kind_has_a_second_person_role():
    for kind, need in APPROVAL_NEEDS.items():
        assert any(need in perms for perms in PERMISSIONS.values()), kind
