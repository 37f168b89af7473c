"""gateway/storage/chain.py: the audit chain's form, the same for every backend.

``record_hash`` is SHA-256 over the compact, ASCII-only JSON array of the eight ``FIELDS`` in their
order, ``detail`` as its stored JSON text; the first record's ``prev`` is ``GENESIS``; checkpoints
are records whose action is ``CHECKPOINT``.  Hashes are stored, so this form may never change: a
fixed record's hash is pinned here.  Any change to any field, even of type or of where one field
ends and the next begins, gives another hash; what is not a field (the stored hash itself) does not
count.  Appending and verifying chains is tests/storage/test_base_contract.py and tests/operations/test_audit.py.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import pytest

from gateway.storage.chain import CHECKPOINT, FIELDS, GENESIS, record_hash
from gateway.storage.records import AuditRecord

RECORD: dict[str, Any] = {
    "seq": 1, "at": "2026-11-02T08:30:00.000000Z", "actor": "pytest", "action": "invoice.accepted", "partner": "acme",
    "message_id": "m-1", "detail": '{"sha256": "ab"}', "prev": GENESIS,
}
PINNED = "42142325efc8acf0233a2a8031419e85495695a607afb4a6dbc299e925e56a41"  # record_hash(RECORD), as stored since schema 5


def test_the_constants() -> None:
    assert GENESIS == "0" * 64 and len(GENESIS) == len(PINNED)  # shaped like a SHA-256 hex digest, and none
    assert CHECKPOINT == "audit.checkpoint"
    assert FIELDS == ("seq", "at", "actor", "action", "partner", "message_id", "detail", "prev")


def test_the_hash_of_a_fixed_record_never_changes() -> None:
    assert record_hash(RECORD) == PINNED
    canonical = '[1,"2026-11-02T08:30:00.000000Z","pytest","invoice.accepted","acme","m-1","{\\"sha256\\": \\"ab\\"}","' + \
        GENESIS + '"]'
    assert hashlib.sha256(canonical.encode()).hexdigest() == PINNED  # the documented form, written out


def test_a_stored_record_hashes_from_what_it_holds() -> None:
    """What a backend returns (``AuditRecord.as_chain``) is exactly what was hashed, plus the hash."""
    stored = AuditRecord(**RECORD, hash=PINNED)
    assert [f.name for f in dataclasses.fields(AuditRecord)] == [*FIELDS, "hash"]
    assert record_hash(stored.as_chain()) == stored.hash
    assert record_hash(RECORD | {"hash": "f" * 64, "id": 9}) == PINNED  # keys that are not fields do not count


@pytest.mark.parametrize(("field", "value"), [
    ("seq", 2),
    ("seq", "1"),  # the same digits as text
    ("at", "2026-11-02T08:30:00.000001Z"),
    ("actor", "Pytest"),
    ("action", CHECKPOINT),
    ("partner", None),
    ("partner", ""),
    ("partner", "null"),
    ("message_id", None),
    ("detail", '{"sha256":"ab"}'),  # the text is hashed: the same JSON spaced otherwise is another record
    ("detail", '{"sha256": "ac"}'),
    ("prev", PINNED),
    ("prev", "0" * 63 + "1"),
])
def test_changing_any_field_changes_the_hash(field: str, value: Any) -> None:
    assert record_hash(RECORD | {field: value}) != PINNED


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_is_required(field: str) -> None:
    with pytest.raises(KeyError):
        record_hash({k: v for k, v in RECORD.items() if k != field})


def test_no_field_can_borrow_characters_from_its_neighbour() -> None:
    """Moving text across a field boundary is a change (the fields are JSON strings in an array, not joined)."""
    a = RECORD | {"actor": "op:admin", "action": "partner.added"}
    b = RECORD | {"actor": "op", "action": ":admin" + "partner.added"}
    c = RECORD | {"actor": 'op","partner.added', "action": ""}
    assert len({record_hash(a), record_hash(b), record_hash(c)}) == 3


def test_detail_as_a_mapping_hashes_as_its_stored_text() -> None:
    """Storage keeps ``json.dumps(detail, sort_keys=True)``; hashing the mapping gives the same hash,
    whatever the order its keys were given in."""
    detail = {"through_seq": 40, "head": "ab" * 32, "note": "Müller"}
    as_stored = RECORD | {"detail": json.dumps(detail, sort_keys=True)}
    assert record_hash(RECORD | {"detail": detail}) == record_hash(as_stored)
    assert record_hash(RECORD | {"detail": dict(reversed(detail.items()))}) == record_hash(as_stored)


def test_text_outside_ascii_is_hashed_exactly() -> None:
    """Escaped to ASCII before hashing: no encoding question, yet every code point counts."""
    composed, decomposed = "Müller", "Mu\u0308ller"  # the same name in NFC and NFD
    hashes = {record_hash(RECORD | {"actor": name}) for name in (composed, decomposed, "M\\u00fcller", "Muller")}
    assert len(hashes) == 4


def test_each_hash_covers_the_whole_chain_before_it() -> None:
    """Chained from GENESIS, changing the first record changes every later hash."""

    def chain(first_actor: str) -> list[str]:
        prev, out = GENESIS, []
        for seq in range(1, 6):
            prev = record_hash(RECORD | {"seq": seq, "actor": first_actor if seq == 1 else "pytest", "prev": prev})
            out.append(prev)
        return out

    original, edited = chain("pytest"), chain("mallory")
    assert all(a != b for a, b in zip(original, edited, strict=True))
    assert original[0] == PINNED
