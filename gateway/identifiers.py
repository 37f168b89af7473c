"""Identifiers as the gateway compares them: party identifiers (``scheme:value``) and e-mail addresses.

One canonical form each, applied wherever an identifier enters — the configuration, the partners
file, the CLI and console, and the invoice itself (gateway/stages/ubl.py, cii.py) — so that the
same identifier always compares equal.
"""

from __future__ import annotations

import re

from .errors import ConfigError

EMAIL = re.compile(r"[^@\s<>\"(),;:]{1,64}@[A-Za-z0-9.-]{1,253}")  # an addr-spec, without quoting or comments
_PARTY_ID = re.compile(r"^(?:([^:\s]{1,32}):\s*)?(\S(?:.{0,198}\S)?)$")
_SCHEME_ONLY = re.compile(r"^[^:\s]{1,32}:\s*$")


def identifier(scheme: str | None, value: str) -> str:
    """The canonical ``scheme:value`` form (or the bare value when no scheme is given)."""
    value = value.strip()
    scheme = (scheme or "").strip()
    return f"{scheme}:{value}" if scheme else value


def parse_party_id(text: str, where: str) -> str:
    """``scheme:value`` or a bare value, normalised exactly as identifiers read from invoices."""
    m = _PARTY_ID.match(text.strip())
    if not m or any(ord(c) < 32 for c in text) or _SCHEME_ONLY.match(text.strip()):
        raise ConfigError(f"{where}: {text!r} is not an identifier (write scheme:value, e.g. 0088:5790000435975)")
    return identifier(m.group(1), m.group(2))


def parse_email(text: str, where: str) -> str:
    """An e-mail address, lowercased (addresses are compared case-insensitively)."""
    if not EMAIL.fullmatch(text):
        raise ConfigError(f"{where}: {text!r} is not an e-mail address (write local@domain, without a display name)")
    return text.lower()
