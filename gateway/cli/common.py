"""What every command group shares: the configuration option, the acting user, output, the store."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from ..config.model import Config
from ..storage.base import Store
from ..storage.factory import open_store

DEFAULT_CONFIG = os.environ.get("EINVOICE_GATEWAY_CONFIG", "/etc/einvoice-gateway/config.toml")


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help=f"configuration file (default {DEFAULT_CONFIG})")
    return sp


def current_user() -> str:
    """Who runs the command, for the audit log: the user behind sudo, else the logged-in one."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())


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


def print_rows(rows: Sequence[Any], as_json: bool, line: Callable[[Any], str]) -> int:
    """A listing: one JSON array (each row's ``as_json()``), or one tab-separated line per row."""
    if as_json:
        print(json.dumps([r.as_json() for r in rows], indent=2))
    else:
        for r in rows:
            print(line(r))
    return 0


def print_one(found: Any | None, missing: str) -> int:
    if found is None:
        print(f"einvoice-gateway: {missing}", file=sys.stderr)
        return 1
    print(json.dumps(found.as_json(), indent=2))
    return 0


def refused(message: str) -> int:
    """A refusal that is not a configuration problem: said on stderr, exit 1."""
    print(f"einvoice-gateway: {message}", file=sys.stderr)
    return 1
