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
from ..errors import ConfigError
from ..operations.audit import seal
from ..storage.base import AccountError, AccountStore
from .common import current_user, opened, with_config


def add_parsers(sub: Any) -> None:
    u = sub.add_parser("users", help="console accounts: add, list, disable, reset a second factor (audited)")
    usub = u.add_subparsers(dest="action", required=True)
    add = with_config(usub.add_parser("add", help="create an account; prints its initial password (change at first login)"))
    add.add_argument("name")
    add.add_argument("--role", action="append", choices=ROLES, default=[], help="admin, operator or auditor (repeatable)")
    add.add_argument("--content", action="store_true", help="may view invoice content (every view is audited)")
    add.add_argument("--json", action="store_true")
    ls = with_config(usub.add_parser("list", help="accounts, roles, state and second factors"))
    ls.add_argument("--json", action="store_true")
    for action, what in (("disable", "disable an account and end its sessions"), ("enable", "enable a disabled account"),
                         ("reset-mfa", "forget an account's second factors (it enrols anew at its next login)"),
                         ("unlock", "forget an account's failed logins, ending the waits they cause (nothing locks)"),
                         ("reset-password", "set a new random initial password (printed; change at next login)")):
        sp = with_config(usub.add_parser(action, help=what))
        sp.add_argument("name")
        if action == "reset-password":
            sp.add_argument("--json", action="store_true")


async def create(accounts: AccountStore, name: str, roles: tuple[str, ...], content: bool, actor: str) -> str:
    """A new account with a random initial password (returned)."""
    if not re.fullmatch(USER_NAME, name):
        raise ConfigError(f"users add: {name!r} is not a user name (2 to 40 lower-case letters, digits, '.', '_' or '-', "
                          "starting with a letter)")
    password = security.new_password()
    await accounts.add_user(name, roles, content, security.hash_password(password), actor)
    return password


def run(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_users(load(args.config), args))
    except AccountError as exc:
        raise ConfigError(f"users {args.action}: {exc}") from None


async def _users(cfg: Config, args: argparse.Namespace) -> int:
    actor = f"cli:{current_user()}"
    async with opened(cfg) as store:
        accounts = store.accounts
        if args.action == "list":
            rows: list[dict[str, Any]] = [{"name": u.name, "roles": list(u.roles), "content": u.content, "state": u.state,
                     "failed_logins": u.failed_logins, "second_factor": u.enrolled, "must_change_password": u.must_change,
                     "passkeys": len(await accounts.passkeys(u.name)), "created_at": u.created_at, "created_by": u.created_by}
                    for u in await accounts.users()]
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in rows if not args.json else ():
                flags = [f for f, on in ((f"{r['failed_logins']} failed logins", r["failed_logins"]),
                                         ("no second factor yet", not r["second_factor"]),
                                         ("must change password", r["must_change_password"])) if on]
                print(f"{r['name']}\t{','.join(r['roles']) or '-'}{' +content' if r['content'] else ''}\t{r['state']}"
                      f"\t{'; '.join(flags)}")
            return 0
        if args.action == "add":
            password = await create(accounts, args.name, tuple(dict.fromkeys(args.role)), args.content, actor)
        elif args.action == "reset-password":
            if await accounts.user(args.name) is None:
                raise AccountError(f"no user {args.name!r} (see: einvoice-gateway users list)")
            password = security.new_password()
            await accounts.set_password(args.name, security.hash_password(password), actor, must_change=True)
        else:
            password = ""
            await {"disable": lambda: accounts.set_state(args.name, "disabled", actor),
                   "enable": lambda: accounts.set_state(args.name, "active", actor),
                   "reset-mfa": lambda: accounts.reset_mfa(args.name, actor),
                   "unlock": lambda: accounts.unlock(args.name, actor)}[args.action]()
        await seal(cfg, store.audit)
    if password and getattr(args, "json", False):
        print(json.dumps({"name": args.name, "password": password, "roles": sorted(set(getattr(args, "role", []) or []))}))
    elif password:
        print(f"{args.name}: initial password {password}\n(hand it over in person; it must be changed at the first "
              "login, where the second factor is set up)")
    else:
        print(f"{args.name}: {args.action} done")
    return 0
