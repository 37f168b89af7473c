"""``einvoice-gateway users …``: console accounts from the host, the break-glass path.

Whoever can run this on the host can read the configuration and keys anyway, so these commands act
at once (no four-eyes request); each is an audit record naming the Unix user, sealed by a signed
checkpoint.  A new or reset account gets a random initial password that must be changed at the
first login, and it enrols its second factor there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import Any

from ..config.load import load
from ..config.model import Config
from ..console import security
from ..console.roles import ROLES, USER_NAME
from ..operations.audit import seal
from ..storage.base import AccountStore
from .common import actor, opened, with_by, with_config, with_json
from .errors import NotFound, UsageError
from .output import Column, listing


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("users", help="console accounts: add, list, disable, reset a second factor (audited)")
    usub = u.add_subparsers(dest="action", required=True)
    add = with_config(usub.add_parser("add", help="create an account; prints its initial password (change at first login)"))
    add.add_argument("name", help="the account's name (2 to 40 lower-case letters, digits, '.', '_' or '-')")
    add.add_argument("--role", action="append", choices=ROLES, default=[], help="admin, operator or auditor (repeatable)")
    add.add_argument("--content", action="store_true", help="may view invoice content (every view is audited)")
    with_json(add, "the account and its initial password")
    ls = with_config(usub.add_parser("list", help="accounts, roles, state and second factors"))
    with_json(ls)
    for action, what in (("disable", "disable an account and end its sessions"), ("enable", "enable a disabled account"),
                         ("reset-mfa", "forget an account's second factors (it enrols anew at its next login)"),
                         ("unlock", "forget an account's failed logins, ending the waits they cause (nothing locks)"),
                         ("reset-password", "set a new random initial password (printed; change at next login)")):
        sp = with_config(usub.add_parser(action, help=what))
        sp.add_argument("name", help="the account's name")
        if action == "reset-password":
            with_json(sp, "the account and its new password")
    for action, sp in usub.choices.items():
        if action != "list":
            with_by(sp)


async def create(accounts: AccountStore, name: str, roles: tuple[str, ...], content: bool, actor: str) -> str:
    """A new account with a random initial password (returned)."""
    if not re.fullmatch(USER_NAME, name):
        raise UsageError(f"users add: {name!r} is not a user name (2 to 40 lower-case letters, digits, '.', '_' or '-', "
                         "starting with a letter)")
    password = security.new_password()
    await accounts.add_user(name, roles, content, security.hash_password(password), actor)
    return password


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_users(load(args.config), args))


USERS: list[Column[dict[str, Any]]] = [
    ("name", lambda r: r["name"]), ("roles", lambda r: f"{','.join(r['roles']) or '-'}{' +content' if r['content'] else ''}"),
    ("state", lambda r: r["state"]),
    ("notes", lambda r: "; ".join(f for f, on in ((f"{r['failed_logins']} failed logins", r["failed_logins"]),
                                                  ("no second factor yet", not r["second_factor"]),
                                                  ("must change password", r["must_change_password"])) if on))]


async def _users(cfg: Config, args: argparse.Namespace) -> int:
    async with opened(cfg) as store:
        accounts = store.accounts
        if args.action == "list":
            rows: list[dict[str, Any]] = [{"name": u.name, "roles": list(u.roles), "content": u.content, "state": u.state,
                     "failed_logins": u.failed_logins, "second_factor": u.enrolled, "must_change_password": u.must_change,
                     "passkeys": len(await accounts.passkeys(u.name)), "created_at": u.created_at, "created_by": u.created_by}
                    for u in await accounts.users()]
            return listing(rows, args.json, USERS, "no console accounts (add one: einvoice-gateway users add)", dict)
        who = actor(args.by)
        if args.action != "add" and await accounts.user(args.name) is None:
            raise NotFound(f"no user {args.name!r} (see: einvoice-gateway users list)")
        if args.action == "add":
            password = await create(accounts, args.name, tuple(dict.fromkeys(args.role)), args.content, who)
        elif args.action == "reset-password":
            password = security.new_password()
            await accounts.set_password(args.name, security.hash_password(password), who, must_change=True)
        else:
            password = ""
            await {"disable": lambda: accounts.set_state(args.name, "disabled", who),
                   "enable": lambda: accounts.set_state(args.name, "active", who),
                   "reset-mfa": lambda: accounts.reset_mfa(args.name, who),
                   "unlock": lambda: accounts.unlock(args.name, who)}[args.action]()
        await seal(cfg, store.audit)
    if password and getattr(args, "json", False):
        print(json.dumps({"name": args.name, "password": password, "roles": sorted(set(getattr(args, "role", []) or []))}))
    elif password:
        print(f"{args.name}: initial password {password}\n(hand it over in person; it must be changed at the first "
              "login, where the second factor is set up)")
    else:
        print(f"{args.name}: {args.action} done")
    return 0
