"""What the rest of the gateway may ask of storage: protocols grouped by who asks.

    Store
      .intake      the pipeline and the transports: duplicates, the durable put, status
      .outbox      delivery: due jobs, claims with leases, outcomes; operators' retry and discard
      .quarantine  held invoices and the decisions on them; payee-account history
      .audit       the hash-chained audit log
      .keys        sealed objects by master key (rotation, rewrap), the key the daemon seals with
      .reports     read-only views for the CLI, the console and the metrics
      .accounts    the console's users, factors and sessions
      .approvals   four-eyes requests
      .retention   deleting invoices delivered long ago (a tombstone keeps refusing duplicates)

Every method is a coroutine; a write returns only after its transaction is durable.  Values come
back as the frozen records of ``records.py``.  ``open_store`` (gateway/storage/factory.py) is the
one place a backend is chosen; the contract tests (tests/storage/test_base_contract.py) hold every
backend to the same behaviour.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from ..errors import GatewayError
from ..model import AcceptedInvoice, Receipt
from .records import (
    Approval,
    AuditRecord,
    Dashboard,
    DeadLetter,
    Decision,
    Failures,
    InvoiceStatus,
    Job,
    MessageDetail,
    MessageSummary,
    Notice,
    OutboxDepth,
    Passkey,
    QuarantineEntry,
    Resealed,
    SealedObject,
    SellerAccount,
    Session,
    StoredPasskey,
    User,
)


class NotHeld(GatewayError):
    """An operator's action on a message that is not in the state it needs (the message says which)."""

    code = "NOT_HELD"


class AccountError(GatewayError):
    """A console or CLI request about accounts that cannot be done as asked (the message says why)."""

    code = "ACCOUNT"


BROWSERS_KEPT = 20  # known browsers remembered per account (``add_browser`` forgets the oldest beyond)


class IntakeStore(Protocol):
    async def find_accepted(self, partner: str | None, sha256: str, direction: str = "in") -> Receipt | None:
        """The earlier acceptance of identical content from this partner (None: any partner), if any."""

    async def put(self, invoice: AcceptedInvoice) -> Receipt:
        """Make the invoice and its delivery jobs durable (gateway/stages/admission.py decides how).

        Returns a duplicate receipt if identical content was accepted meanwhile; raises Conflict
        (same number, other content) or StorageUnavailable (nothing was stored)."""

    async def status(self, message_id: str, partner: str | None, direction: str = "in") -> InvoiceStatus | None:
        """Status for the partner that sent the message (None: any partner); None for anyone else."""


class OutboxStore(Protocol):
    async def due(self, now: float, limit: int) -> list[Job]:
        """Due jobs that nobody holds; a read, for a cheap "anything to do?" before ``claim``."""

    async def claim(self, owner: str, now: float, wanted: Mapping[str, int], lease_s: float) -> list[Job]:
        """Take up to ``wanted[destination]`` due jobs per destination for ``owner`` until now + lease_s
        (destination REPLIES: the notices)."""

    async def enqueue(self, notice: Notice) -> None:
        """A notice to send (an SMTP reply), durable once this returns."""

    async def release(self, owner: str) -> int:
        """Give back every job ``owner`` holds (it stopped, or restarted after a crash)."""

    async def load_sealed(self, message_id: str) -> bytes | None:
        """The sealed content of an invoice, or of a notice still to be sent."""

    async def record(self, job: Job, *, delivered_at: str | None, next_attempt_at: float | None,
                     error: str | None, dead: bool = False, owner: str | None = None) -> None:
        """The outcome of one attempt.  A success always counts; a failure only from the job's
        holder (a node whose lease lapsed must not push back a job another node now delivers)."""

    async def pending_by_destination(self) -> dict[str, int]: ...

    async def depth(self) -> OutboxDepth: ...

    async def retry(self, message_id: str, destination: str | None, actor: str, *, requeue: bool = False,
                    reason: str = "") -> list[str]:
        """Make waiting jobs due now (retry), or put dead-lettered ones back with a fresh horizon
        (requeue); returns the destinations affected; raises NotHeld when there are none."""

    async def discard(self, message_id: str, destination: str, actor: str, reason: str) -> None:
        """Give up on a dead-lettered delivery for good (it is no longer offered for requeue)."""


class QuarantineStore(Protocol):
    async def held(self, state: str | None = "held", partner: str | None = None, limit: int = 1000) -> list[QuarantineEntry]:
        """Quarantined messages in this state (None: any), oldest first."""

    async def held_count(self) -> int: ...

    async def entry(self, message_id: str) -> QuarantineEntry | None:
        """A quarantined message with the seller's whole account history beside it."""

    async def decide(self, message_id: str, release: bool, actor: str, note: str,
                     destinations: tuple[str, ...] = ()) -> Decision:
        """Release a held invoice to delivery, or reject it for good; ``destinations``: where a
        released invoice that no route matched goes.  Raises NotHeld."""

    async def seller_accounts(self, partner: str) -> list[SellerAccount]: ...

    async def set_accounts(self, partner: str, known: Sequence[str], blocked: Sequence[str], actor: str, note: str) -> None:
        """Register payee accounts as the partner's own (not held) and block others (held)."""


class AuditLog(Protocol):
    async def append(self, actor: str, action: str, partner: str | None, message_id: str | None,
                     detail: Mapping[str, Any]) -> None: ...

    async def newest(self, limit: int = 1000) -> list[AuditRecord]: ...

    def records(self, first: int | None = None, last: int | None = None, since: str | None = None,
                until: str | None = None) -> AsyncIterator[AuditRecord]:
        """Records in chain order, exactly as stored, for verify and export (read in pages)."""

    async def page(self, *, actor: str = "", action: str = "", partner: str = "", before: int | None = None,
                   limit: int = 100) -> list[AuditRecord]:
        """Newest first, filtered (``action`` is a prefix), before record ``before``."""

    async def checkpoint(self, sign: Callable[[int, str], dict[str, Any]]) -> int | None:
        """Append a signed checkpoint over the chain's head, unless the head already is one."""


class KeyStore(Protocol):
    async def usage(self) -> dict[str, int]:
        """How many stored objects each master key protects."""

    async def sealed_under(self, key_ids: Sequence[str], limit: int) -> list[SealedObject]: ...

    async def replace_sealed(self, rows: Sequence[Resealed]) -> int:
        """Swap each object that still holds the old bytes (a concurrent change wins); how many were swapped."""

    async def sealing_key(self) -> str | None:
        """The master key the running gateway seals with (``keys rewrap`` checks it)."""

    async def set_sealing_key(self, key_id: str) -> None: ...


class Reports(Protocol):
    async def messages(self, *, direction: str | None = None, partner: str | None = None, status: str | None = None,
                       since: str | None = None, until: str | None = None, limit: int = 100) -> list[MessageSummary]:
        """Newest first; ``status`` is a summary (accepted, held, delivered, dead-letter, rejected) or a
        delivery state (pending, dead: messages with such a delivery)."""

    async def search(self, *, partner: str = "", status: str = "", since: str | None = None, until: str | None = None,
                     number: str = "", amount: str = "", offset: int = 0, limit: int = 50) -> list[MessageSummary]: ...

    async def message(self, message_id: str) -> MessageDetail | None: ...

    async def dead_letters(self, *, partner: str | None = None, destination: str | None = None, since: float | None = None,
                           until: float | None = None, limit: int = 100) -> list[DeadLetter]: ...

    async def dashboard(self, now: datetime) -> Dashboard:
        """Counts for the console's first page: received and delivered in the last hour and day, the outbox, dead letters, held."""

    async def counts(self) -> dict[str, int]:
        """Invoices, and delivery jobs by state (also the readiness probe's read)."""


class AccountStore(Protocol):
    async def user(self, name: str) -> User | None: ...

    async def users(self) -> list[User]: ...

    async def add_user(self, name: str, roles: tuple[str, ...], content: bool, password_hash: str, actor: str) -> None: ...

    async def set_password(self, name: str, password_hash: str, actor: str, *, must_change: bool) -> None: ...

    async def set_state(self, name: str, state: str, actor: str) -> None:
        """Enable or disable; disabling ends the user's sessions."""

    async def set_roles(self, name: str, roles: tuple[str, ...], content: bool, actor: str, detail: Mapping[str, Any]) -> None: ...

    async def reset_mfa(self, name: str, actor: str) -> None:
        """Forget every second factor and end the user's sessions: the next login enrols anew."""

    async def unlock(self, name: str, actor: str) -> None:
        """Forget every failed login counted against the account (there is no lock: this ends its waits)."""

    async def failures(self, name: str, sources: Sequence[str]) -> dict[str, Failures]:
        """The account's counts of failed logins from these sources (a source with none is left out)."""

    async def failed(self, name: str, factor: str, address: str, reason: str, counted: Sequence[str], now: float,
                     forget_before: float) -> dict[str, int]:
        """One failed login (any step), audited with its ``reason``; adds one to the account's count from
        each of ``counted`` (nothing when no such account exists), first forgetting every count with no
        failure since ``forget_before``.  Returns the new counts.  The same work whether or not the
        account exists, so the time taken does not tell."""

    async def succeeded(self, name: str, address: str, method: str, cleared: Sequence[str] = ()) -> None:
        """A completed login (both factors), audited; the account's counts from ``cleared`` start again."""

    async def add_browser(self, name: str, token_hash: str, replaces: str | None = None) -> None:
        """Remember a browser that completed a login as the account's (by its token's SHA-256), now;
        ``replaces``: the token it had before, forgotten."""

    async def browser(self, token_hash: str, since: float) -> str | None:
        """The account a browser completed a login as, at ``since`` or later (None: unknown, or older)."""

    async def spend_totp_step(self, name: str, step: int) -> bool:
        """Mark ``step`` used; False when it (or a later one) was used already: a code works once."""

    async def enroll_totp(self, name: str, secret: str, step: int, recovery_hashes: Sequence[str]) -> None: ...

    async def replace_recovery(self, name: str, hashes: Sequence[str]) -> None: ...

    async def spend_recovery(self, name: str, code_hash: str) -> bool: ...

    async def recovery_left(self, name: str) -> int: ...

    async def passkeys(self, name: str) -> list[Passkey]: ...

    async def passkey(self, credential_id: str) -> StoredPasskey | None: ...

    async def add_passkey(self, name: str, credential_id: str, public_key: bytes, sign_count: int, label: str,
                          aaguid: str) -> None: ...

    async def used_passkey(self, credential_id: str, sign_count: int) -> None: ...

    async def remove_passkey(self, name: str, credential_id: str, actor: str) -> bool: ...

    async def session(self, id_hash: str) -> Session | None: ...

    async def sessions(self, user: str | None = None) -> list[Session]:
        """Logged-in (full) sessions, most recently seen first."""

    async def open_session(self, id_hash: str, user: str, stage: str, csrf: str, address: str, agent: str, auth_at: float,
                           *, replaces: str | None = None) -> None:
        """A new session; ``replaces`` (the pre-login one) ends in the same transaction, so the
        identifier changes at every step of a login (no session fixation)."""

    async def touch(self, id_hash: str, now: float) -> None: ...

    async def update_session(self, id_hash: str, *, auth_at: float | None = None,
                             pending: Mapping[str, Any] | None = None) -> None: ...

    async def end_session(self, id_hash: str, actor: str | None = None, why: str = "logout") -> bool: ...

    async def expire_sessions(self, idle_before: float, created_before: float, pre_login_before: float) -> int: ...


class ApprovalStore(Protocol):
    async def request(self, kind: str, target: str, params: Mapping[str, Any], reason: str, actor: str,
                      partner: str | None = None, message_id: str | None = None,
                      shown: Mapping[str, Any] | None = None) -> int:
        """A four-eyes request; its audit record carries ``params``, or ``shown`` in their place."""

    async def requests(self, state: str | None = "pending", limit: int = 200) -> list[Approval]:
        """Newest first, in this state (None: any)."""

    async def get(self, request_id: int) -> Approval | None: ...

    async def decide(self, request_id: int, actor: str, approve: bool, check: Callable[[Approval], None]) -> Approval:
        """Approve or deny a pending request; the requester cannot decide their own (four eyes).
        ``check`` may refuse (AccountError) for reasons of role.  Approving only marks the request:
        the caller then carries the action out and records it with ``finish``."""

    async def finish(self, request_id: int, outcome: str, failed: bool = False) -> None: ...

    async def withdraw(self, request_id: int, actor: str) -> None: ...


class RetentionStore(Protocol):
    async def expire(self, delivered_before: str, limit: int, actor: str = "retention") -> list[str]:
        """Delete invoices whose every delivery succeeded before this time; keep a tombstone for
        duplicate detection and an audit record.  Returns their ids."""


class Store(Protocol):
    intake: IntakeStore
    outbox: OutboxStore
    quarantine: QuarantineStore
    audit: AuditLog
    keys: KeyStore
    reports: Reports
    accounts: AccountStore
    approvals: ApprovalStore
    retention: RetentionStore

    async def close(self) -> None:
        """Finish what was submitted, then release the database."""


class SnapshotError(Exception):
    """The state could not be read or copied (the message says what the database reported)."""


class Snapshots(Protocol):
    """What a backup needs from a backend (gateway/operations/backup.py keeps the manifest and files)."""

    files: tuple[str, ...]  # what a backup folder holds besides its manifest
    schema_version: int  # the newest state this gateway reads

    def live(self, state_dir: Path) -> Path | None:
        """The live state in ``state_dir``, if there is any."""

    def snapshot(self, state_dir: Path, folder: Path) -> None:
        """A consistent copy of the live state into ``folder`` (whose ``files`` exist, empty, mode 0600),
        made while the daemon runs.  Raises SnapshotError."""

    def inspect(self, folder: Path) -> tuple[list[str], dict[str, Any]]:
        """Problems of a snapshot (integrity), and what its manifest records: schema_version, counts,
        key_ids (invoices per master key), last_audit_seq."""

    def sealed(self, folder: Path) -> Iterator[tuple[str, str, str, bytes | None]]:
        """(message id, sha256, key id, sealed content or None) of every invoice in a snapshot."""
