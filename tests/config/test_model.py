"""gateway/config/model.py: the configuration's sections as frozen values, and their defaults.

Sections cannot be changed once loaded (a reload builds new ones) and compare by value (what a
reload compares to tell which settings need a restart).  ``HttpsConfig.url`` writes an IPv6 host in
brackets; ``AdminConfig.loopback`` is true only for the loopback names, so anything else asks for a
bearer token.  The defaults are the documented limits (64 MiB per message, XML depth 100, …) and
lie within the bounds gateway/config/load.py enforces on operator-set values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from gateway.config.load import MAX_BACKOFF_S
from gateway.config.model import (
    DEFAULT_MAX_ATTRIBUTES,
    DEFAULT_MAX_BODY_BYTES,
    DEFAULT_MAX_DEPTH,
    DEFAULT_MAX_ELEMENTS,
    DEFAULT_MAX_IN_FLIGHT_BYTES,
    DEFAULT_XML_LIMITS,
    DESTINATION_TYPES,
    AdminConfig,
    ConsoleConfig,
    Destination,
    HttpsConfig,
    Route,
    XmlLimits,
)


def https(host: str = "127.0.0.1", port: int = 8443) -> HttpsConfig:
    return HttpsConfig(host=host, port=port, certificate=Path("pki/server.crt"), private_key=Path("pki/server.key"),
                       client_ca=(Path("pki/ca.crt"),), workers=1, max_body_bytes=DEFAULT_MAX_BODY_BYTES,
                       max_in_flight_bytes=DEFAULT_MAX_IN_FLIGHT_BYTES, read_timeout_s=60.0, keepalive_timeout_s=75.0)


@pytest.mark.parametrize(("host", "url"), [
    ("127.0.0.1", "https://127.0.0.1:8443"),
    ("gateway.example", "https://gateway.example:8443"),
    ("::1", "https://[::1]:8443"),  # a bare IPv6 address would run into the port
    ("2001:db8::10", "https://[2001:db8::10]:8443"),
])
def test_https_url_brackets_ipv6_hosts(host: str, url: str) -> None:
    assert https(host).url == url


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "localhost"])
def test_admin_on_a_loopback_name_is_loopback(host: str) -> None:
    assert AdminConfig(host, 8445, None).loopback


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "admin.example", "127.0.0.2", "[::1]", "::ffff:127.0.0.1",  # noqa: S104
                                  "LOCALHOST", ""])
def test_anything_else_is_not_loopback_so_it_needs_a_token(host: str) -> None:
    """Fail safe: an address that might be reachable from other hosts (or is written unusually) is not
    taken for loopback; the worst outcome is that the operator is asked for a token file."""
    assert not AdminConfig(host, 8445, None).loopback


def test_sections_are_frozen_and_slotted() -> None:
    section = https()
    with pytest.raises(dataclasses.FrozenInstanceError):
        section.port = 443  # type: ignore[misc]
    with pytest.raises((AttributeError, TypeError)):
        section.extra = 1  # type: ignore[attr-defined]
    assert not hasattr(section, "__dict__")


def test_sections_compare_by_value() -> None:
    """A reload compares old and new sections to find settings that need a restart."""
    assert https() == https() and hash(https()) == hash(https())
    assert https() != https(port=8444)
    assert Route(("erp",), receiver="0088:1") == Route(("erp",), receiver="0088:1") != Route(("erp",), receiver="0088:2")
    assert ConsoleConfig() == ConsoleConfig() != ConsoleConfig(backoff_after=3)


def test_message_and_xml_limits() -> None:
    assert DEFAULT_MAX_BODY_BYTES == 64 * 1024 * 1024 > 50_000_000  # a 50 MB invoice with its PDF passes (Decision 3)
    assert DEFAULT_MAX_IN_FLIGHT_BYTES > DEFAULT_MAX_BODY_BYTES  # else a body of the largest size would always get 503
    assert DEFAULT_XML_LIMITS == XmlLimits(max_depth=DEFAULT_MAX_DEPTH, max_elements=DEFAULT_MAX_ELEMENTS,
                                           max_attributes=DEFAULT_MAX_ATTRIBUTES)
    assert (DEFAULT_MAX_DEPTH, DEFAULT_MAX_ELEMENTS, DEFAULT_MAX_ATTRIBUTES) == (100, 2_000_000, 256)
    assert DEFAULT_MAX_DEPTH < 2048  # below libxml2's own huge_tree limit, so ours is the one that answers


def test_console_defaults_are_within_what_an_operator_may_set() -> None:
    """The bounds gateway/config/load.py puts on each console setting hold for the defaults too."""
    d = ConsoleConfig()
    assert d.enabled
    assert 30.0 <= d.fresh_auth_s <= 300.0  # re-authentication at most five minutes old
    assert 60.0 <= d.idle_timeout_s <= d.absolute_timeout_s
    assert 3 <= d.backoff_after <= 20 and 60.0 <= d.backoff_max_s <= MAX_BACKOFF_S
    assert 10 <= d.account_backoff_after <= 10_000 and d.account_backoff_after > d.backoff_after
    assert 1 <= d.login_burst <= 1000 and d.login_every_s >= 0.01
    assert set(d.allowed_hosts) == {"localhost", "127.0.0.1", "::1"}  # loopback names only


def test_destination_defaults() -> None:
    d = Destination("erp-inbox", "directory", path=Path("/srv/erp/inbox"))
    assert DESTINATION_TYPES == ("directory", "https", "partner", "email")
    assert d.cipher == "aes-256-gcm"  # authenticated encryption (AuthEnvelopedData) unless the operator chooses CBC
    assert (d.concurrency, d.timeout_s) == (16, 30.0)
    assert (d.url, d.partner, d.to) == ("", "", "")
    assert all(getattr(d, f) is None for f in ("ca", "hmac_key_file", "bearer_token_file", "client_certificate",
                                               "client_key", "recipient_certificate"))
