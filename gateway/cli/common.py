"""What every command group shares: the configuration option, the acting user, the store, option types.

Who acts, for the audit log: the OS account the command runs as (``cli:erin``), from the password
database by the effective uid — the kernel's word, which ``$USER`` is not (unset under cron, systemd
and some shells, and anyone can set it).  Two claims may stand beside it, never instead of it:
the account that ran sudo (``SUDO_USER``, when the password database knows it) and ``--by NAME`` (the
person the operator acts for), e.g. ``cli:root (sudo erin; --by alice)``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import pwd
from collections.abc import AsyncIterator
from datetime import UTC, datetime

from ..config.model import Config
from ..storage.base import Store
from ..storage.factory import open_store

DEFAULT_CONFIG = os.environ.get("EINVOICE_GATEWAY_CONFIG", "/etc/einvoice-gateway/config.toml")
NAME_MAX = 64  # characters of a --by name: a person or a ticket, not a paragraph


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    return sp


def with_json(sp: argparse.ArgumentParser, what: str = "the rows") -> argparse.ArgumentParser:
    sp.add_argument("--json", action="store_true", help=f"print {what} as JSON (for programs) instead of a table")
    return sp


# --- who acts -------------------------------------------------------------------------------------


def current_user() -> str:
    """The OS account the command runs as (its effective uid), or ``uid:N`` for a uid without an entry."""
    uid = os.geteuid()
    try:
        return pwd.getpwuid(uid).pw_name or f"uid:{uid}"
    except KeyError:  # a container run with --user 12345
        return f"uid:{uid}"


def sudo_user() -> str | None:
    """The account that ran sudo, as sudo said (``SUDO_USER``); only a name the password database knows."""
    name = os.environ.get("SUDO_USER", "")
    if not name or name == current_user():
        return None
    try:
        pwd.getpwnam(name)
    except KeyError:
        return None
    return name


def actor(by: str | None = None) -> str:
    """Who acts, for the audit log: ``cli:<OS account>``, with the sudo user and ``--by`` beside it."""
    claims = []
    if (sudo := sudo_user()) is not None:
        claims.append(f"sudo {sudo}")
    if by:
        claims.append(f"--by {by}")
    return f"cli:{current_user()}" + (f" ({'; '.join(claims)})" if claims else "")


def person(text: str) -> str:
    """An argparse type: a name to record (``--by``), one printable line of at most NAME_MAX characters."""
    name = text.strip()
    if not name or len(name) > NAME_MAX or not name.isprintable():
        raise argparse.ArgumentTypeError(f"{text!r} is not a name: 1 to {NAME_MAX} printable characters on one line")
    return name


def with_by(sp: argparse.ArgumentParser, what: str = "who you act for") -> argparse.ArgumentParser:
    sp.add_argument("--by", type=person, metavar="NAME",
                    help=f"{what}; recorded in the audit log beside your own account (cli:USER (--by NAME))")
    return sp


# --- the store, and option types -------------------------------------------------------------------


@contextlib.asynccontextmanager
async def opened(cfg: Config) -> AsyncIterator[Store]:
    """The instance's store, open for one command (beside the daemon, which keeps writing)."""
    store = open_store(cfg)
    try:
        yield store
    finally:
        await store.close()


def when(text: str) -> datetime:
    """An argparse type: a date (YYYY-MM-DD) or an RFC 3339 time, in UTC."""
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD) or time (2026-11-20T14:00:00Z)") from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def count(text: str) -> int:
    """An argparse type: a whole number of at least 1 (``--limit``)."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return n
