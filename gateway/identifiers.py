"""Identifiers as the gateway compares them: party identifiers (``scheme:value``) and e-mail addresses.

A party identifier has two forms:

* **as written** — ``identifier(scheme, value)`` for what an invoice carries, ``parse_party_id`` for
  what an operator types (the configuration, the partners file, the CLI, the console).  This is what
  is stored and shown, so a refusal can quote what the sender wrote.
* **its comparison key** — ``party_key``: one canonical form per scheme, applied to both sides
  wherever two identifiers are compared (a partner's own ids, another partner's, the buyer a route
  names, this business's outbound identities).  ``0088:579 0000 435975``, ``０088:5790000435975`` and
  ``GLN:5790000435975`` are one key; ``9925:0123456789``, ``BE 0123.456.789`` and ``BE0123456789`` are
  the one VAT key ``VAT:BE0123456789``.

The key, step by step (``party_key``):

1. Everything not seen is removed: whitespace of every kind (NBSP U+00A0, U+2007, U+202F, …),
   controls, format characters (category Cf: zero-width space and joiners, U+FEFF, U+2060, the soft
   hyphen U+00AD, bidi marks) and the other default-ignorable code points; the rest is Unicode NFKC
   (full-width digits and letters become ASCII).
2. The scheme (before the first ``:``) is compared case-insensitively, a few names stand for their
   ISO 6523 code (``GLN`` and ``EAN`` → 0088, ``DUNS`` → 0060, Peppol's ``SE:ORGNR`` → 0007, …), and a
   Peppol participant identifier (``iso6523-actorid-upis::0088:…``) is the identifier it wraps.
3. The value, by kind of scheme:

   * **VAT** — the Peppol EAS VAT schemes (9906 IT, 9914 AT, 9920 ES, 9925 BE, 9930 DE, 9944 NL,
     9957 FR, …; 9912 EU:VAT), ICD 0211 (IT partita IVA) and 0213 (FI), the scheme names
     ``BE:VAT`` …, ``VAT`` and ``VA`` (UN/CEFACT 1153), and a bare value shaped like a VAT number of
     a country (``BE0123456789``, ``DE 123 456 789``, ``NL8200.98.395.B.01``): the key is
     ``VAT:`` + country prefix + number, uppercase, without separators.  A country-specific scheme
     implies its country, so ``9925:0123456789`` and ``9925:BE0123456789`` are one number; a value
     that carries a VAT prefix of its own keeps it (``9925:FR…`` is a French number, whatever the
     scheme claims: compared as written, an identifier of another partner cannot hide behind a
     wrong scheme).  Greece is ``EL`` (``GR`` is read as ``EL``); the Swiss ``MWST``/``TVA``/``IVA``
     and Norwegian ``MVA`` suffixes mark the registration, not the number, and are dropped.
   * **codes** — the other ISO 6523 ICD and Peppol EAS schemes (0088 GLN, 0060 DUNS, 0007, 0208, …):
     registry numbers, whose values people write with spaces, dots, dashes (Unicode ones too) and
     slashes that the registries never use: these go, letters are uppercase.  Schemes whose values
     are structured by their separators keep them (Leitweg-ID 0204 and 9958, whose parts are of
     variable length; EUID 9913; GS1 keys 0209; eDelivery ids 0203), and so does any value that is
     not a plain code (``rechnung@…`` written under 0088).
   * **e-mail** (``EM``, 0202 PEC): lowercase; dots and dashes are part of an address.
   * **anything else** — an unknown scheme, or a bare value that is not a VAT number: lowercase
     (case-folded), separators kept.  Their format is not known, and a dot, dash or slash may be
     what tells two of them apart (German tax numbers ``12/345/67890`` and ``123/4567/890``).

Identifiers compare equal when their keys do.  An identifier whose scheme does not say which registry
issued it (no scheme, or an unknown one) is also compared by its value alone: with another such one
as their keys have it, with a registry's identifier uppercase and without separators
(``PartyKey.loose``).  ``PartyKey.clashes`` says whether two identifiers may name the same party —
what a refusal needs (gateway/partners/directory.py) — and ``Owners`` looks that up among the
registered ones.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from .errors import ConfigError

EMAIL = re.compile(r"[^@\s<>\"(),;:]{1,64}@[A-Za-z0-9.-]{1,253}")  # an addr-spec, without quoting or comments
_PARTY_ID = re.compile(r"^(?:([^:\s]{1,32}):\s*)?(\S(?:.{0,198}\S)?)$")
_SCHEME_ONLY = re.compile(r"^[^:\s]{1,32}:\s*$")
MAX_SCHEME = 32  # characters before the first ':' that can be a scheme (as parse_party_id reads it)

# Default_Ignorable_Code_Point ranges beyond category Cf (Unicode DerivedCoreProperties.txt): the
# combining grapheme joiner, Hangul fillers, Khmer and Mongolian invisibles, variation selectors.
_IGNORABLE = ((0x034F, 0x034F), (0x115F, 0x1160), (0x17B4, 0x17B5), (0x180B, 0x180F), (0x3164, 0x3164),
              (0xFE00, 0xFE0F), (0xFFA0, 0xFFA0), (0xFFF0, 0xFFF8), (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A),
              (0xE0000, 0xE0FFF))
# What people write between the digits of a registry number: dots, slashes and every dash (category
# Pd: U+2010-U+2015, the hyphen-minus, …), the minus sign U+2212, the fraction and division slashes.
_SLASHES = frozenset("/\u2044\u2215")
_SEPARATORS = frozenset(".-\u2212") | _SLASHES
_ASCII_HIDDEN = re.compile(r"[\x00-\x20\x7f]")  # the ASCII whitespace and controls
_SETTLE_ROUNDS = 8  # NFKC after removing invisibles can compose anew; a few rounds reach the fixed point

# Peppol EAS VAT schemes (Peppol code list "Participant identifier schemes") and ICD 0211 (IT, partita
# IVA), 0213 (FI VAT): the country whose VAT number the value is; "" for 9912 EU:VAT, whose values carry
# their own prefix.  9909 NO:VA is removed from the list, and still read.
_VAT_SCHEMES = {
    "9906": "IT", "9909": "NO", "9910": "HU", "9912": "", "9914": "AT", "9920": "ES", "9922": "AD", "9923": "AL",
    "9924": "BA", "9925": "BE", "9926": "BG", "9927": "CH", "9928": "CY", "9929": "CZ", "9930": "DE", "9931": "EE",
    "9932": "GB", "9933": "EL", "9934": "HR", "9935": "IE", "9936": "LI", "9937": "LT", "9938": "LU", "9939": "LV",
    "9940": "MC", "9941": "ME", "9942": "MK", "9943": "MT", "9944": "NL", "9945": "PL", "9946": "PT", "9947": "RO",
    "9948": "RS", "9949": "SI", "9950": "SK", "9951": "SM", "9952": "TR", "9953": "VA", "9955": "SE", "9957": "FR",
    "0211": "IT", "0213": "FI",
}
# Scheme names that mean a VAT number: Peppol's "BE:VAT" …, and "VAT"/"VA" (UN/CEFACT 1153, as CII writes
# a tax registration's schemeID).
_VAT_NAMES = {f"{'GR' if c == 'EL' else c}:VAT": c for c in _VAT_SCHEMES.values() if c} | {
    "EU:VAT": "", "IT:IVA": "IT", "NO:VA": "NO", "VAT": "", "VA": ""}
# Scheme names used for an ISO 6523 code (OIOUBL's GLN/EAN, Peppol's scheme ids).
_ALIASES = {
    "GLN": "0088", "EAN": "0088", "DUNS": "0060", "FR:SIRENE": "0002", "SE:ORGNR": "0007", "FR:SIRET": "0009",
    "FI:OVT": "0037", "DK:P": "0096", "NL:KVK": "0106", "AU:ABN": "0151", "DK:DIGST": "0184", "NL:OIN": "0190",
    "EE:CC": "0191", "NO:ORG": "0192", "LEI": "0199", "DE:LWID": "0204", "BE:EN": "0208", "DK:CPR": "9901",
    "DK:CVR": "9902", "DK:SE": "9904", "NO:ORGNR": "9908", "DE:LID": "9958",
}
_PEPPOL_PARTICIPANT = "ISO6523-ACTORID-UPIS"  # the Peppol participant identifier scheme: "…::0088:5790000435975"
_EMAIL_SCHEMES = frozenset({"EM", "0202"})  # EAS EM (electronic mail), ICD 0202 (IT, PEC address)
_STRUCTURED = frozenset({"0203", "0204", "0209", "9913", "9958"})  # separators tell the parts apart
_CODE = re.compile(r"[0-9A-Z]+")  # a plain registry code, once its separators are gone
_VAT_CHARACTERS = re.compile(r"[0-9A-Z+*]+")  # what VAT numbers are made of (old Irish ones have + and *)


def _known_code(scheme: str) -> bool:
    """An ISO 6523 ICD (0002-0240 assigned) or a Peppol EAS code (9901-9959)."""
    return len(scheme) == 4 and scheme.isdigit() and (2 <= int(scheme) <= 240 or 9901 <= int(scheme) <= 9959)


# VAT numbers by prefix (the VIES formats; "EL" for Greece, "XI" Northern Ireland, "EU" the non-union
# scheme), for telling a bare value that is one.  Other prefixes of the EAS VAT schemes: any digits and
# letters starting with a digit.
_VAT_SHAPES = {
    "AT": r"U\d{8}", "BE": r"[01]?\d{9}", "BG": r"\d{9,10}", "CY": r"\d{8}[A-Z]", "CZ": r"\d{8,10}", "DE": r"\d{9}",
    "DK": r"\d{8}", "EE": r"\d{9}", "EL": r"\d{9}", "GR": r"\d{9}", "ES": r"[0-9A-Z]\d{7}[0-9A-Z]", "FI": r"\d{8}",
    "FR": r"[0-9A-Z]{2}\d{9}", "HR": r"\d{11}", "HU": r"\d{8}", "IE": r"\d[0-9A-Z+*]\d{5}[A-Z]{1,2}", "IT": r"\d{11}",
    "LT": r"\d{9}|\d{12}", "LU": r"\d{8}", "LV": r"\d{11}", "MT": r"\d{8}", "NL": r"\d{9}B\d{2}", "PL": r"\d{10}",
    "PT": r"\d{9}", "RO": r"\d{2,10}", "SE": r"\d{12}", "SI": r"\d{8}", "SK": r"\d{10}",
    "XI": r"\d{9}|\d{12}|GD\d{3}|HA\d{3}", "GB": r"\d{9}|\d{12}|GD\d{3}|HA\d{3}", "EU": r"\d{9}",
    "CH": r"E\d{9}(?:MWST|TVA|IVA|TPV)*", "NO": r"\d{9}(?:MVA)*",
}
_VAT_PREFIXES = frozenset(_VAT_SHAPES) | frozenset(c for c in _VAT_SCHEMES.values() if c)
_BARE_VAT = {p: re.compile(_VAT_SHAPES.get(p, r"\d[0-9A-Z]{1,12}")) for p in _VAT_PREFIXES}
_VAT_SUFFIX = {"CH": re.compile(r"(?:MWST|TVA|IVA|TPV)+$"), "NO": re.compile(r"(?:MVA)+$")}


@functools.lru_cache(maxsize=4096)
def _hidden(c: str) -> bool:
    if c.isspace() or unicodedata.category(c) in ("Cc", "Cf"):
        return True
    o = ord(c)
    return any(lo <= o <= hi for lo, hi in _IGNORABLE)


def _settle(text: str, step: Callable[[str], str] = str) -> str:
    """Invisibles removed, NFKC, then ``step`` (case, separators), repeated to the fixed point."""
    if text.isascii():  # NFKC changes no ASCII, and each step is idempotent on it
        return step(_ASCII_HIDDEN.sub("", text))
    for _ in range(_SETTLE_ROUNDS):
        shown = "".join(c for c in text if not _hidden(c))
        new = step("".join(c for c in unicodedata.normalize("NFKC", shown) if not _hidden(c)))
        if new == text:
            break
        text = new
    return text


def _unseparated(text: str) -> str:
    return "".join(c for c in text.upper() if c not in _SEPARATORS and unicodedata.category(c) != "Pd")


@dataclass(frozen=True, slots=True)
class PartyKey:
    """How one party identifier compares."""

    key: str  # the canonical form: "0088:5790000435975", "VAT:BE0123456789", "ZZZ:supp-1", "godkändförf-skatt"
    pinned: bool  # the scheme says which registry issued it (an ICD/EAS code, VAT, e-mail); else it is a guess
    value: str = ""  # the value in its key, without the scheme
    loose: frozenset[str] = frozenset()  # the value uppercase without separators (a VAT number with its prefix)

    def clashes(self, other: PartyKey) -> bool:
        """Whether the two may name the same party: one key; or, where a scheme does not say which registry
        issued the value, one value (two such values as their keys have them; against a registry's value,
        its digits and letters alone)."""
        if self.key == other.key:
            return True
        if self.pinned and other.pinned:
            return False
        if not self.pinned and not other.pinned:
            return bool(self.value) and self.value == other.value
        return bool(self.loose & other.loose)


def _vat(country: str, value: str) -> PartyKey:
    number = _settle(value, _unseparated)
    if not _VAT_CHARACTERS.fullmatch(number):  # not a VAT number: compared as written, under no country
        return PartyKey(f"VAT:{number}", True, number, frozenset(filter(None, (number,))))
    if number[:2] == "GR":
        number = "EL" + number[2:]
    if number[:2] not in _VAT_PREFIXES:
        number = country + number
    if number[:2] in _VAT_SUFFIX:
        number = _VAT_SUFFIX[number[:2]].sub("", number)
    if len(number) <= 2:  # a country prefix alone is no number
        number = ""
    return PartyKey(f"VAT:{number}", True, number, frozenset(filter(None, (number,))))


def _scheme_and_value(text: str) -> tuple[str, str] | None:
    """(scheme, value) of settled text, or None for a bare value; a scheme name with a colon of its
    own (``BE:VAT``, ``SE:ORGNR``) is taken whole, a Peppol participant identifier unwrapped."""
    while True:
        head, sep, rest = text.partition(":")
        head = _settle(head, str.upper)
        if not sep or not head or len(head) > MAX_SCHEME:
            return None
        second, sep2, after = rest.partition(":")
        named = f"{head}:{second.upper()}"
        scheme, value = (named, after) if sep2 and (named in _VAT_NAMES or named in _ALIASES) else (head, rest)
        if scheme != _PEPPOL_PARTICIPANT:
            return _ALIASES.get(scheme, scheme), value
        text = rest.lstrip(":")


def party_key(text: str) -> PartyKey:
    """The comparison key of an identifier in either written form (``scheme:value`` or a bare value).

    Total: any text has a key (the empty key for text with nothing visible in it)."""
    settled = _settle(text)
    parts = _scheme_and_value(settled)
    if parts is None:
        plain = _settle(settled, _unseparated)
        shape = _BARE_VAT.get(plain[:2])
        if shape is not None and shape.fullmatch(plain, 2) and not _SLASHES & set(settled):  # slashes: a tax number
            return _vat("", plain)
        folded = _settle(settled, str.casefold)
        return PartyKey(folded, False, folded, frozenset(filter(None, (plain,))))
    scheme, value = parts
    if scheme in _VAT_SCHEMES or scheme in _VAT_NAMES:
        return _vat(_VAT_SCHEMES.get(scheme, _VAT_NAMES.get(scheme, "")), value)
    loose = frozenset(filter(None, (_settle(value, _unseparated),)))
    if scheme in _EMAIL_SCHEMES:
        shown = _settle(value, str.casefold)
    elif _known_code(scheme):
        shown = _settle(value, _unseparated)
        if shown and (scheme in _STRUCTURED or not _CODE.fullmatch(shown)):
            shown = _settle(value, str.upper)
    else:
        shown = _settle(value, str.casefold)
        return PartyKey(f"{scheme}:{shown}", False, shown, loose)
    return PartyKey(f"{scheme}:{shown}", True, shown, loose)


class Owners:
    """Who registered which party identifiers, looked up as ``PartyKey.clashes`` compares them.

    Filled once (``add``, in registration order) by whoever builds it, then only read."""

    def __init__(self) -> None:
        self._key: dict[str, tuple[str, str]] = {}  # key → (owner, as written)
        self._value: dict[str, list[tuple[str, str]]] = {}  # value of an unpinned identifier → owners
        self._loose: dict[tuple[bool, str], list[tuple[str, str]]] = {}  # (pinned, loose value) → owners

    def add(self, written: str, owner: str) -> None:
        k = party_key(written)
        self._key.setdefault(k.key, (owner, written))
        if not k.pinned and k.value:
            self._value.setdefault(k.value, []).append((owner, written))
        for loose in k.loose:
            self._loose.setdefault((k.pinned, loose), []).append((owner, written))

    def owner(self, written: str) -> str | None:
        """Whose identifier this is: the owner of its key, or None."""
        found = self._key.get(party_key(written).key)
        return found[0] if found else None

    def clashing(self, written: str) -> list[tuple[str, str]]:
        """(owner, identifier as registered) of every registered identifier that may name the same party."""
        k = party_key(written)
        found = [self._key[k.key]] if k.key in self._key else []
        if not k.pinned:
            found += self._value.get(k.value, [])
        for loose in k.loose:  # against the other kind: a pinned identifier meets unpinned ones, and back
            found += self._loose.get((not k.pinned, loose), [])
        return list(dict.fromkeys(found))

    def __iter__(self) -> Iterator[tuple[str, str]]:
        """(key, owner) of every registered key."""
        return ((key, owner) for key, (owner, _) in self._key.items())


def keys_of(ids: Iterable[str]) -> frozenset[str]:
    """The comparison keys of identifiers in their written form."""
    return frozenset(party_key(i).key for i in ids)


def blank(value: str) -> bool:
    """Whether nothing of ``value`` is visible (only whitespace and invisible characters)."""
    return not _settle(value)


def identifier(scheme: str | None, value: str) -> str:
    """An identifier as an invoice writes it: ``scheme:value`` (the bare value when no scheme is given),
    both trimmed, otherwise as written (compare with ``party_key``)."""
    value = value.strip()
    scheme = (scheme or "").strip()
    return f"{scheme}:{value}" if scheme else value


def parse_party_id(text: str, where: str) -> str:
    """``scheme:value`` or a bare value, as an operator types it: trimmed, invisible characters removed
    and NFKC (full-width digits become ASCII), otherwise as typed; compared by ``party_key``."""
    visible = unicodedata.normalize("NFKC", "".join(c for c in text if c.isspace() or not _hidden(c)))
    shown = "".join(" " if c.isspace() else c for c in visible).strip()
    m = _PARTY_ID.match(shown)
    if (not m or any(ord(c) < 32 for c in text) or _SCHEME_ONLY.match(shown)
            or party_key(shown).key.endswith(":")):  # nothing left of the value (only separators or invisibles)
        raise ConfigError(f"{where}: {text!r} is not an identifier (write scheme:value, e.g. 0088:5790000435975)")
    return identifier(m.group(1), m.group(2))


def parse_email(text: str, where: str) -> str:
    """An e-mail address, lowercased (addresses are compared case-insensitively)."""
    if not EMAIL.fullmatch(text):
        raise ConfigError(f"{where}: {text!r} is not an e-mail address (write local@domain, without a display name)")
    return text.lower()
