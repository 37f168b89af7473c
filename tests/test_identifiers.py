"""gateway/identifiers.py: one canonical form for party identifiers and e-mail addresses.

``identifier(scheme, value)`` is how an identifier read from an invoice is written (``scheme:value``,
both trimmed; the bare value without a scheme).  ``parse_party_id`` reads what an operator types (the
configuration, the partners file, the CLI, the console) into that same form, so the two compare
equal; ``parse_email`` lowercases an addr-spec.  Both refuse anything else with a ConfigError that
starts with where the text came from and says what to write instead.
"""

from __future__ import annotations

import pytest

from gateway.errors import ConfigError
from gateway.identifiers import identifier, parse_email, parse_party_id


def test_identifier_trims_and_joins() -> None:
    assert identifier("0088", "5790000435975") == "0088:5790000435975"
    assert identifier(" 0088 ", "\n 5790000435975\t") == "0088:5790000435975"  # as string() of an element gives it
    assert identifier(None, " DE123456789 ") == "DE123456789"
    assert identifier("", "DE123456789") == identifier("  ", "DE123456789") == "DE123456789"  # an empty schemeID is none


@pytest.mark.parametrize(("typed", "canonical"), [
    ("0088:5790000435975", "0088:5790000435975"),
    ("  0088:5790000435975\u00a0", "0088:5790000435975"),  # surrounding (also non-breaking) spaces go
    ("DE123456789", "DE123456789"),  # a bare value (a VAT number) stays bare
    ("iso6523-actorid-upis::0088:1", "iso6523-actorid-upis::0088:1"),  # the value may hold colons
    ("0088:Acme Corp", "0088:Acme Corp"),  # and inner spaces
    ("a" * 32 + ":1", "a" * 32 + ":1"),  # the longest scheme
    ("0088:" + "9" * 200, "0088:" + "9" * 200),  # the longest value
])
def test_party_id_accepted_in_canonical_form(typed: str, canonical: str) -> None:
    assert parse_party_id(typed, "party_ids[0]") == canonical


def test_party_id_matches_the_invoices_form() -> None:
    """What the partners file says and what an invoice carries meet in one string."""
    assert parse_party_id(" 0088:5790000435975 ", "x") == identifier("0088", "5790000435975")
    assert parse_party_id("NL123456789B01", "x") == identifier(None, "NL123456789B01")


def test_party_id_with_a_space_after_the_scheme_matches_the_invoices_form() -> None:
    assert parse_party_id("0088: 5790000435975", "x") == identifier("0088", " 5790000435975")


@pytest.mark.parametrize("text", ["0088:", "0088: "])
def test_party_id_with_a_scheme_but_no_value_is_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="is not an identifier"):
        parse_party_id(text, "party_ids[0]")


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "0088:1\n2",  # control characters anywhere, even where the trim would remove them
    "\t0088:1",
    "0088:1\x00",
    "0088:" + "9" * 201,  # longer than 200 characters
])
def test_party_id_refused_naming_where_and_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_party_id(text, "partners[3].party_ids[1]")
    msg = err.value.message
    assert msg.startswith(f"partners[3].party_ids[1]: {text!r} is not an identifier")
    assert "write scheme:value, e.g. 0088:5790000435975" in msg


@pytest.mark.parametrize(("typed", "canonical"), [
    ("billing@acme.example", "billing@acme.example"),
    ("Billing.Dept@ACME.Example", "billing.dept@acme.example"),  # compared case-insensitively
    ("a+invoices@mail-1.acme.example", "a+invoices@mail-1.acme.example"),
    ("x" * 64 + "@acme.example", "x" * 64 + "@acme.example"),
])
def test_email_accepted_lowercased(typed: str, canonical: str) -> None:
    assert parse_email(typed, "smtp.addresses[0]") == canonical


@pytest.mark.parametrize("text", [
    "",
    "billing",
    "@acme.example",
    "billing@",
    "Billing <billing@acme.example>",  # a display name
    '"billing"@acme.example',  # quoting
    "billing@acme.example (accounts)",  # a comment
    "billing@acme.example, ap@acme.example",  # two addresses
    "bill ing@acme.example",
    "billing@acme.example\r\nBcc: x@evil.example",  # header injection
    "billing@ac_me.example",
    "x" * 65 + "@acme.example",  # local part over 64 octets (RFC 5321 4.5.3.1.1)
    "a@b@acme.example",
])
def test_email_refused_naming_where_and_what_to_write(text: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_email(text, "emails[2]")
    assert err.value.message == (f"emails[2]: {text!r} is not an e-mail address "
                                 "(write local@domain, without a display name)")

