"""Who may do what in the console.

``admin`` runs the gateway (users, partners, keys), ``operator`` works the message flow (dead
letters, quarantine), ``auditor`` reads everything and exports the audit log.  Viewing an invoice's
content is a permission of its own (``content``), granted per user beside a role, and every view is
audited.  Roles grant disjoint powers on purpose: an administrator does not release invoices.
"""

from __future__ import annotations

from typing import Protocol

ROLES = ("admin", "operator", "auditor")
USER_NAME = r"[a-z][a-z0-9._-]{1,39}"  # a console account's name
PERMISSIONS: dict[str, frozenset[str]] = {
    "admin": frozenset({"view", "messages.read", "partners.read", "partners.manage", "users.read", "users.manage",
                        "audit.read"}),
    "operator": frozenset({"view", "messages.read", "messages.act", "partners.read"}),
    "auditor": frozenset({"view", "messages.read", "partners.read", "users.read", "audit.read", "audit.export"}),
}

# What the second person of a four-eyes request must be allowed to do.
APPROVAL_NEEDS = {
    "quarantine.release": "messages.act",
    "deadletter.discard": "messages.act",
    "user.roles": "users.manage",
    "partner.activate": "partners.manage",
    "partner.certificates": "partners.manage",
    "partner.bank": "partners.manage",
}


class HasRoles(Protocol):
    @property
    def roles(self) -> tuple[str, ...]: ...

    @property
    def content(self) -> bool: ...


def allowed(user: HasRoles, permission: str) -> bool:
    if permission == "content":
        return user.content
    return any(permission in PERMISSIONS.get(role, frozenset()) for role in user.roles)
