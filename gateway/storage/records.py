"""The values storage hands back: frozen records, the same whichever backend stored them.

Each record that reaches a remote reader (the partner API's status, the CLI's ``--json``) has an
``as_json()`` giving exactly the shape documented in docs/.  Free-form parts (an audit
record's detail, a rules report, an approval's parameters) stay mappings: their shape is the
writer's, not storage's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# What a message's sender (or ERP) is told, in one word; kept in the invoices' status column.
SUMMARIES = ("accepted", "held", "delivered", "dead-letter", "rejected")
# The outbox's destination for notices (the SMTP listener's replies): no configured destination can
# have this name (names start with a letter or digit).
REPLIES = "@smtp-replies"
# What the sender is told about a quarantined invoice: that it is held, or rejected after review;
# never why (the reasons would tell a fraudster what to change).
SENDER_STATUS = {"held": "held", "rejected": "rejected", "released": "accepted"}


def status_summary(quarantine_state: str | None, states: set[str]) -> str:
    """One word for a message: what its sender (or ERP) is told."""
    if quarantine_state in ("held", "rejected"):
        return SENDER_STATUS[quarantine_state]
    if "dead" in states:
        return "dead-letter"
    return "delivered" if states == {"delivered"} else "accepted"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return value.as_json() if hasattr(value, "as_json") else {f.name: _plain(getattr(value, f.name))
                                                                     for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


class Record:
    """``as_json()``: the record's fields in order, nested records and tuples as JSON values."""

    def as_json(self) -> dict[str, Any]:
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


# --- intake: what a partner (or the ERP) reads back ----------------------------------------------

@dataclass(frozen=True, slots=True)
class DeliveryState(Record):
    destination: str
    status: str
    attempts: int
    delivered_at: str | None


@dataclass(frozen=True, slots=True)
class InvoiceStatus(Record):
    """``GET /v1/invoices/{id}`` (and ``/v1/outbound/{id}``, which also names the recipient partner)."""

    message_id: str
    status: str
    sha256: str
    received_at: str
    partner: str | None  # outbound only: the recipient
    document_type: str
    invoice_number: str
    deliveries: tuple[DeliveryState, ...]
    signature: Mapping[str, Any] | None
    rules: Mapping[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        out = Record.as_json(self)
        if self.partner is None:
            del out["partner"]
        return out


# --- the outbox ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class DocumentFacts(Record):
    """What a destination is told about the document it receives (the folder's sidecar, headers)."""

    message_id: str
    partner: str
    sha256: str
    received_at: str
    document_type: str
    invoice_number: str
    supplier_ids: tuple[str, ...]
    customer_ids: tuple[str, ...]
    customization_id: str
    profile_id: str
    issue_date: str
    size: int
    signature: Mapping[str, Any] | None
    media_type: str
    rules: Mapping[str, Any] | None
    direction: str


@dataclass(frozen=True, slots=True)
class DeliveryJob:
    """One claimed (or due) delivery of a stored invoice to one destination."""

    message_id: str
    destination: str
    attempts: int
    created_at: float
    partner: str
    sha256: str
    facts: DocumentFacts


@dataclass(frozen=True, slots=True)
class OutboxDepth:
    jobs: int  # waiting for delivery
    oldest: float | None  # when the oldest of them was accepted (epoch seconds)


# --- operators: messages, deliveries, dead letters -------------------------------------------------

@dataclass(frozen=True, slots=True)
class MessageSummary(Record):
    message_id: str
    direction: str
    partner: str
    received_at: str
    document_type: str
    invoice_number: str
    payable_amount: str
    currency: str
    status: str


@dataclass(frozen=True, slots=True)
class DeliveryRow(Record):
    destination: str
    state: str
    attempts: int
    next_attempt_at: str | None
    last_error: str | None
    delivered_at: str | None
    claimed_by: str | None
    updated_at: str | None


@dataclass(frozen=True, slots=True)
class HistoryEntry(Record):
    at: str
    actor: str
    action: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class AccountSeen(Record):
    """A payee account beside a quarantined invoice: the seller's history, and whether this invoice names it."""

    account: str
    state: str
    first_seen: str
    first_message_id: str
    this_invoice: bool


@dataclass(frozen=True, slots=True)
class QuarantineEntry(Record):
    message_id: str
    partner: str
    state: str
    reasons: tuple[str, ...]
    held_at: str
    decided_at: str | None
    decided_by: str | None
    note: str | None
    invoice_number: str
    issue_date: str
    payable_amount: str
    currency: str
    document_type: str
    accounts: tuple[AccountSeen, ...] | None = None  # only for one entry looked up on its own

    def as_json(self) -> dict[str, Any]:
        out = Record.as_json(self)
        if self.accounts is None:
            del out["accounts"]
        return out


@dataclass(frozen=True, slots=True)
class MessageDetail(Record):
    """Everything an operator may see about one message (never its content): facts, deliveries, history."""

    message_id: str
    direction: str
    partner: str
    sha256: str
    received_at: str
    document_type: str
    invoice_number: str
    issue_date: str
    payable_amount: str
    currency: str
    supplier_ids: tuple[str, ...] | None
    customer_ids: tuple[str, ...] | None
    customization_id: str
    profile_id: str
    size: int
    media_type: str
    key_id: str
    signature: Mapping[str, Any] | None
    rules: Mapping[str, Any] | None
    route: str
    deliveries: tuple[DeliveryRow, ...]
    quarantine: QuarantineEntry | None
    status: str
    history: tuple[HistoryEntry, ...]


@dataclass(frozen=True, slots=True)
class DeadLetter(Record):
    message_id: str
    destination: str
    partner: str
    direction: str
    invoice_number: str
    attempts: int
    error: str | None
    dead_at: str | None
    received_at: str


@dataclass(frozen=True, slots=True)
class Decision(Record):
    """A quarantine decision, as recorded."""

    message_id: str
    partner: str
    state: str
    decided_by: str
    decided_at: str


@dataclass(frozen=True, slots=True)
class SellerAccount(Record):
    account: str
    state: str  # known | pending | rejected
    first_seen: str
    message_id: str


@dataclass(frozen=True, slots=True)
class DeadLetterCount:
    destination: str
    error: str
    count: int


@dataclass(frozen=True, slots=True)
class Dashboard:
    received: Mapping[str, int]  # "hour", "day"
    delivered: Mapping[str, int]
    outbox_depth: int
    oldest_age_s: float | None
    dead_letters: tuple[DeadLetterCount, ...]
    dead_total: int
    held: int


# --- the audit log ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class AuditRecord(Record):
    """A record exactly as stored: ``detail`` is its JSON text (what the chain hashes)."""

    seq: int
    at: str
    actor: str
    action: str
    partner: str | None
    message_id: str | None
    detail: str
    prev: str
    hash: str

    def as_chain(self) -> dict[str, Any]:
        """The form the chain checks read (gateway/operations/audit.py)."""
        return Record.as_json(self)


# --- sealed objects and keys -----------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SealedObject:
    message_id: str
    sha256: str
    sealed: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class Resealed:
    """A sealed object moved to another key: swapped only if it still holds ``old``."""

    message_id: str
    old: bytes = field(repr=False)
    new: bytes = field(repr=False)
    key_id: str


# --- the console's accounts, sessions and approvals ------------------------------------------------

@dataclass(frozen=True, slots=True)
class User:
    name: str
    roles: tuple[str, ...]
    content: bool  # may view invoice content
    state: str
    must_change: bool
    totp_secret: str | None = field(repr=False)
    totp_last_step: int
    failed_logins: int  # failed attempts still counted against it (over every source; none is a lock)
    created_at: str
    created_by: str
    user_handle: str
    password_hash: str = field(repr=False)

    @property
    def enrolled(self) -> bool:
        return self.totp_secret is not None


# The source under which an account's failed logins from sources it has not logged in from are also
# counted (gateway/console/throttle.py); every other source is an address or a known browser.
SHARED_SOURCE = "*"


@dataclass(frozen=True, slots=True)
class Failures:
    """Failed logins of one account from one source, counted since its last login from there."""

    count: int
    last_at: float  # epoch seconds of the latest


@dataclass(frozen=True, slots=True)
class Session:
    id_hash: str
    user: str
    stage: str  # mfa | enroll | full
    csrf: str = field(repr=False)
    created_at: float
    seen_at: float
    auth_at: float
    address: str
    agent: str
    pending: Mapping[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class Passkey:
    credential_id: str
    label: str
    created_at: str
    last_used_at: str | None


@dataclass(frozen=True, slots=True)
class StoredPasskey:
    user: str
    public_key: bytes = field(repr=False)
    sign_count: int


@dataclass(frozen=True, slots=True)
class Approval:
    """A four-eyes request."""

    id: int
    kind: str
    target: str
    params: Mapping[str, Any]
    reason: str
    requested_by: str
    requested_at: str
    state: str
    decided_by: str | None
    decided_at: str | None
    outcome: str | None


# --- notices: mail the gateway sends about a submission (the SMTP listener's replies) -------------

@dataclass(frozen=True, slots=True)
class Notice:
    """A reply to be sent through the outbox: sealed like an invoice (its details may quote one)."""

    id: str
    partner: str
    message_id: str | None  # the invoice it answers, when one was stored
    to: str  # the address the reply goes to
    in_reply_to: str  # the Message-ID it answers
    outcome: str  # accepted | rejected
    certificate: bytes | None = field(repr=False)  # DER of the certificate to encrypt to (None: signed only)
    cipher: str
    sealed: bytes = field(repr=False)
    sha256: str
    key_id: str


@dataclass(frozen=True, slots=True)
class NoticeJob:
    """A claimed (or due) notice: what the reply sender needs besides the sealed body."""

    message_id: str  # the notice's id (its sealed body is opened under it)
    destination: str
    attempts: int
    created_at: float
    partner: str
    sha256: str
    to: str
    in_reply_to: str
    outcome: str
    certificate: bytes | None = field(repr=False)
    cipher: str


Job = DeliveryJob | NoticeJob
