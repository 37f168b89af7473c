"""``einvoice-gateway users …``: console accounts from the host, the break-glass path.

Whoever can run this on the host can read the configuration and keys anyway, so these commands act
at once (no four-eyes request); each is an audit record naming the Unix user, sealed by a signed
checkpoint.  A new or reset account gets a random initial password that must be changed at the
first login, and it enrols its second factor there.
"""

from __future__ import annotations

import argparse
import json
import re
from typing import Any

from ..config import load as config_mod
from ..console import security
from ..console.accounts import ROLES, USER_NAME, AccountError, Accounts
from ..errors import ConfigError
from ..operations.instance import current_user
from ..storage.sqlite import SqliteStore
from .ops import seal


def add_parsers(sub: Any, with_config: Any) -> None:
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
                         ("unlock", "lift a lockout after failed logins"),
                         ("reset-password", "set a new random initial password (printed; change at next login)")):
        sp = with_config(usub.add_parser(action, help=what))
        sp.add_argument("name")
        if action == "reset-password":
            sp.add_argument("--json", action="store_true")


def create(accounts: Accounts, name: str, roles: tuple[str, ...], content: bool, actor: str) -> str:
    """A new account with a random initial password (returned); used by `users add` and `init`."""
    if not re.fullmatch(USER_NAME, name):
        raise ConfigError(f"users add: {name!r} is not a user name (2 to 40 lower-case letters, digits, '.', '_' or '-', "
                          "starting with a letter)")
    password = security.new_password()
    accounts.add_user(name, roles, content, security.hash_password(password), actor).result()
    return password


def main(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    store = SqliteStore(cfg.state_dir)
    accounts = Accounts(store)
    actor = f"cli:{current_user()}"
    try:
        if args.action == "list":
            people = accounts.users()
            rows: list[dict[str, Any]] = [{"name": u.name, "roles": list(u.roles), "content": u.content, "state": u.state,
                     "locked": u.locked(), "second_factor": u.enrolled, "must_change_password": u.must_change,
                     "passkeys": len(accounts.passkeys(u.name)), "created_at": u.created_at, "created_by": u.created_by}
                    for u in people]
            if args.json:
                print(json.dumps(rows, indent=2))
            for r in rows if not args.json else ():
                flags = [f for f, on in (("locked", r["locked"]), ("no second factor yet", not r["second_factor"]),
                                         ("must change password", r["must_change_password"])) if on]
                print(f"{r['name']}\t{','.join(r['roles']) or '-'}{' +content' if r['content'] else ''}\t{r['state']}"
                      f"\t{'; '.join(flags)}")
            return 0
        if args.action == "add":
            password = create(accounts, args.name, tuple(dict.fromkeys(args.role)), args.content, actor)
        elif args.action == "reset-password":
            if accounts.user(args.name) is None:
                raise AccountError(f"no user {args.name!r} (see: einvoice-gateway users list)")
            password = security.new_password()
            accounts.set_password(args.name, security.hash_password(password), actor, must_change=True).result()
        else:
            password = ""
            {"disable": lambda: accounts.set_state(args.name, "disabled", actor),
             "enable": lambda: accounts.set_state(args.name, "active", actor),
             "reset-mfa": lambda: accounts.reset_mfa(args.name, actor),
             "unlock": lambda: accounts.unlock(args.name, actor)}[args.action]().result()
        seal(cfg, store)
        if password and getattr(args, "json", False):
            print(json.dumps({"name": args.name, "password": password,
                              "roles": sorted(set(getattr(args, "role", []) or []))}))
        elif password:
            print(f"{args.name}: initial password {password}\n(hand it over in person; it must be changed at the first "
                  "login, where the second factor is set up)")
        else:
            print(f"{args.name}: {args.action} done")
        return 0
    except AccountError as exc:
        raise ConfigError(f"users {args.action}: {exc}") from None
    finally:
        store.close()
