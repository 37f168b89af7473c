"""gateway/identifiers.py: party identifiers as written, compared by one canonical key per scheme; e-mail addresses.

``identifier(scheme, value)`` is how an identifier read from an invoice is written (``scheme:value``,
both trimmed; the bare value without a scheme).  ``parse_party_id`` reads what an operator types (the
configuration, the partners file, the CLI, the console): trimmed, invisible characters removed, NFKC;
``parse_email`` lowercases an addr-spec.  Both refuse anything else with a ConfigError that starts with
where the text came from and says what to write instead.

``party_key`` is how two identifiers compare (issue 20, item 3): every disguise of one identifier
(tests/helpers/identities.py: spacing, punctuation, NBSP and zero-width characters, full-width digits,
case, another scheme for the same VAT number) has one key, while identifiers that differ stay apart.
``PartyKey.clashes`` and ``Owners`` add the value-only comparison of identifiers whose scheme says
nothing.  Hypothesis properties: the key is idempotent, total (any text, no exception), and
``parse_party_id`` raises only ConfigError.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ConfigError
from gateway.identifiers import Owners, blank, identifier, keys_of, parse_email, parse_party_id, party_key
from tests.helpers.identities import DISGUISES, forms, vat_forms


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


@pytest.mark.parametrize(("typed", "shown"), [
    ("０088:５７９0000435975", "0088:5790000435975"),  # full-width digits become ASCII
    ("0088:579\u200b0000435975\ufeff", "0088:5790000435975"),  # invisible characters go
    ("0088:Acme\u2003Corp", "0088:Acme Corp"),  # another space is a space
    ("BE 0123.456.789", "BE 0123.456.789"),  # otherwise as typed: it is compared by its key
])
def test_party_id_is_kept_as_typed_without_what_cannot_be_seen(typed: str, shown: str) -> None:
    assert parse_party_id(typed, "x") == shown
    assert party_key(parse_party_id(typed, "x")).key == party_key(typed).key


@pytest.mark.parametrize("text", ["0088:", "0088: ", "0088:\u200b", "0088:\u00a0\ufeff", "0088:---", "9925:-.-",
                                  "\u200b", "\ufeff\u00ad"])
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



# --- the comparison key ---------------------------------------------------------------------------


@pytest.mark.parametrize(("written", "key"), [
    # codes (ISO 6523 ICD, Peppol EAS): separators go, letters are uppercase, a few scheme names are codes
    ("0088:5790000435975", "0088:5790000435975"),
    ("0088: 579 0000.435-975", "0088:5790000435975"),
    ("GLN:5790000435975", "0088:5790000435975"),
    ("ean:5790000435975", "0088:5790000435975"),
    ("DUNS:12-345-6789", "0060:123456789"),
    ("SE:ORGNR:556721-2047", "0007:5567212047"),
    ("iso6523-actorid-upis::0088:5790000435975", "0088:5790000435975"),  # a Peppol participant identifier
    ("0208:0123.456.789", "0208:0123456789"),
    ("0088:invoices@acme.example", "0088:INVOICES@ACME.EXAMPLE"),  # not a plain code: separators stay
    ("0204:04011000-1234-56", "0204:04011000-1234-56"),  # Leitweg-ID: the dashes tell the parts apart
    # VAT: one key, "VAT:" + country prefix + number
    ("9925:BE0123456789", "VAT:BE0123456789"),
    ("9925:0123456789", "VAT:BE0123456789"),  # the EAS scheme implies the country
    ("BE:VAT:0123456789", "VAT:BE0123456789"),
    ("9912:BE0123456789", "VAT:BE0123456789"),
    ("VA:BE0123456789", "VAT:BE0123456789"),
    ("BE0123456789", "VAT:BE0123456789"),  # a bare value shaped like a VAT number is one
    ("BE 0123.456.789", "VAT:BE0123456789"),
    ("9925:FR12345678901", "VAT:FR12345678901"),  # a prefix of its own wins over the scheme's country
    ("9933:123456789", "VAT:EL123456789"), ("GR123456789", "VAT:EL123456789"),  # Greece is EL
    ("9914:U12345678", "VAT:ATU12345678"),
    ("CHE-123.456.789 MWST", "VAT:CHE123456789"), ("9927:E123456789 TVA", "VAT:CHE123456789"),  # registration marks
    ("NO 123 456 789 MVA", "VAT:NO123456789"),
    ("NL8200.98.395.B.01", "VAT:NL820098395B01"),
    # e-mail
    ("EM:Invoices@ACME.example", "EM:invoices@acme.example"),
    # anything else: case-folded, whitespace and invisibles gone, separators kept
    ("ZZZ:Supp-123", "ZZZ:supp-123"),
    ("zzz :SUPP-123", "ZZZ:supp-123"),
    ("HRB 123456", "hrb123456"),
    ("12/345/67890", "12/345/67890"),
    ("DE/12/345/67890", "de/12/345/67890"),  # slashes: a tax number, not a VAT number
    ("Godkänd för F-skatt", "godkändförf-skatt"),
])
def test_each_scheme_has_its_canonical_key(written: str, key: str) -> None:
    assert party_key(written).key == key


@pytest.mark.parametrize("name", sorted(DISGUISES))
def test_every_disguise_of_an_identifier_has_its_key(name: str) -> None:
    gln = party_key("0088:5790000435975").key
    scheme, value = forms("0088", "5790000435975")[name]
    assert party_key(identifier(scheme, value)).key == gln, (scheme, value)
    vat = party_key("BE0123456789").key
    for scheme, value in (("9925", DISGUISES[name]("0123456789")), ("", DISGUISES[name]("BE0123456789"))):
        k = party_key(identifier(scheme, value))
        assert k.key == vat or k.clashes(party_key("BE0123456789")), (scheme, value, k)


@pytest.mark.parametrize(("form", "scheme_value"), sorted(vat_forms("BE", "0123456789", "9925").items()))
def test_every_form_of_a_vat_number_has_one_key(form: str, scheme_value: tuple[str, str]) -> None:
    assert party_key(identifier(*scheme_value)).key == "VAT:BE0123456789"


@pytest.mark.parametrize(("a", "b"), [
    ("12/345/67890", "123/4567/890"),  # two German tax numbers, one digit string
    ("0204:04011000-1234-56", "0204:0401100012-34-56"),  # two Leitweg-IDs
    ("EM:a.b@acme.example", "EM:ab@acme.example"),  # two mailboxes
    ("0088:123456789", "0060:123456789"),  # the same digits in two registries
    ("9925:0123456789", "9930:0123456789"),  # the same digits, two countries' VAT
    ("ZZZ:a-1", "ZZZ:a1"),  # an unknown scheme: its separators may matter
    ("0088:5790000435975", "0088:5790000435976"),
])
def test_different_identifiers_stay_apart(a: str, b: str) -> None:
    assert party_key(a).key != party_key(b).key


@pytest.mark.parametrize(("a", "b", "clash"), [
    ("5790000435975", "0088:5790000435975", True),  # no scheme: another's value under any scheme
    ("579-0000-435975", "0088:5790000435975", True),
    ("ZZZ:5790000435975", "0088:5790000435975", True),  # an unknown scheme says nothing either
    ("be/0123/456789", "9925:BE0123456789", True),  # (slashes: not read as a VAT number, but its value is one)
    ("123456789", "DE123456789", False),  # a VAT number is its prefix and number: 9 digits alone are something else
    ("ZZZ:Supp123", "Supp123", True),  # two unpinned values, as their keys have them
    ("12/345/67890", "123/4567/890", False),  # ... and their separators
    ("0060:5790000435975", "0088:5790000435975", False),  # two registries' numbers are two identifiers
    ("0088:5790000435975", "GLN:5790000435975", True),  # one key
])
def test_an_identifier_without_a_known_scheme_clashes_with_its_value(a: str, b: str, clash: bool) -> None:
    assert party_key(a).clashes(party_key(b)) is clash
    assert party_key(b).clashes(party_key(a)) is clash


def test_owners_find_an_identifier_in_any_of_its_forms() -> None:
    owners = Owners()
    for written, owner in (("0088:5790000435975", "acme"), ("BE0123456789", "acme"), ("ZZZ:supp-1", "beta"),
                           ("0060:123456789", "beta")):
        owners.add(written, owner)
    assert dict(owners) == {"0088:5790000435975": "acme", "VAT:BE0123456789": "acme", "ZZZ:supp-1": "beta",
                            "0060:123456789": "beta"}
    assert owners.owner("GLN: 579 0000 435975") == "acme"
    assert owners.owner("9925:0123.456.789") == "acme"
    assert owners.owner("5790000435975") is None  # no key of its own ...
    assert owners.clashing("5790000435975") == [("acme", "0088:5790000435975")]  # ... but another's value
    assert owners.clashing("supp-1") == [("beta", "ZZZ:supp-1")]
    assert owners.clashing("0088:123456789") == []  # a registry's number meets only its own key
    assert owners.clashing("123456789") == [("beta", "0060:123456789")]


def test_keys_of_and_blank() -> None:
    assert keys_of(["0088:1", "GLN:1", "BE0123456789", "9925:0123456789"]) == {"0088:1", "VAT:BE0123456789"}
    assert blank(" \u00a0\u200b\ufeff\u2060\u00ad\u200e\t") and not blank(" 1 ")


# --- properties (Hypothesis) ----------------------------------------------------------------------

PIECES = st.sampled_from([*"0123456789ABEZabez:.-/ ", "\u00a0", "\u200b", "\u00ad", "\u2011", "\u2212", "\uff10",
                          "\uff21", "\u0301", "\u00a8", "ß", "İ", "ǰ", "ΐ", "\ufeff", "\u202e", "\u3164", "\uff1a",
                          "iso6523-actorid-upis::", "9925:", "0088:", "VAT:", "BE:VAT:", "EM:", "GLN:", "0204:", "GR",
                          "CHE", "MWST", "NO", "MVA"])
TEXTS = st.one_of(st.text(max_size=60), st.lists(PIECES, max_size=24).map("".join))
PROPERTY = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(TEXTS)
def test_the_key_is_idempotent_and_total(text: str) -> None:
    k = party_key(text)  # any text has a key: nothing is raised
    again = party_key(k.key)
    assert again.key == k.key
    assert (again.pinned, again.value, again.loose) == (k.pinned, k.value, k.loose) or not k.key
    assert k.clashes(k) or not k.key


@PROPERTY
@given(TEXTS)
def test_parse_party_id_raises_only_config_errors_and_keeps_the_key(text: str) -> None:
    try:
        shown = parse_party_id(text, "party_ids[0]")
    except ConfigError as exc:
        assert exc.message.startswith("party_ids[0]: ")
        return
    assert party_key(shown).key == party_key(text).key
    assert parse_party_id(shown, "x") == shown  # what is stored reads back as itself


@PROPERTY
@given(st.sampled_from(sorted(DISGUISES)), st.sampled_from(sorted(DISGUISES)),
       st.text(alphabet="0123456789", min_size=8, max_size=14))
def test_disguises_compose(first: str, second: str, number: str) -> None:
    written = DISGUISES[second](DISGUISES[first](number))
    assert party_key(f"0088:{written}").key == f"0088:{number}"
