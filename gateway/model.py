"""Frozen value types passed between the stages of the pipeline."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from .errors import Detail, UnsupportedDocument

UBL_INVOICE_NS = "urn:oasis:names:specification:ubl:schema:xsd:Invoice-2"
UBL_CREDIT_NOTE_NS = "urn:oasis:names:specification:ubl:schema:xsd:CreditNote-2"
CII_NS = "urn:un:unece:uncefact:data:standard:CrossIndustryInvoice:100"
UBL_CAC_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2"
UBL_CBC_NS = "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2"
CII_RAM_NS = "urn:un:unece:uncefact:data:standard:ReusableAggregateBusinessInformationEntity:100"
# Where business content lives: never inside a UBL extension slot (gateway/stages/ubl.py, check_extensions).
BUSINESS_NAMESPACES = frozenset({UBL_INVOICE_NS, UBL_CREDIT_NOTE_NS, UBL_CAC_NS, CII_NS, CII_RAM_NS,
                                 "urn:un:unece:uncefact:data:standard:QualifiedDataType:100",
                                 "urn:un:unece:uncefact:data:standard:UnqualifiedDataType:100"})
STAMP = "%Y-%m-%dT%H:%M:%S.%fZ"  # RFC 3339 in UTC with microseconds: how times are stored, sorted and compared as text


def stamp(at: datetime | float | None = None) -> str:
    """``at`` (a UTC datetime or epoch seconds; default now) in the STAMP form."""
    when = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC) if isinstance(at, int | float) else at
    return when.strftime(STAMP)


class Syntax(enum.Enum):
    UBL = "ubl"
    CII = "cii"


class DocumentType(enum.Enum):
    """Document types the gateway takes, keyed by the root element's expanded name.

    Fails closed: an unknown root is a typed rejection, never a ``KeyError``.
    """

    UBL_INVOICE = ("Invoice", UBL_INVOICE_NS)
    UBL_CREDIT_NOTE = ("CreditNote", UBL_CREDIT_NOTE_NS)
    CII_INVOICE = ("CrossIndustryInvoice", CII_NS)  # UN/CEFACT CII D16B, as EN 16931 uses it

    @property
    def syntax(self) -> Syntax:
        return Syntax.CII if self is DocumentType.CII_INVOICE else Syntax.UBL

    @property
    def root(self) -> str:
        return self.value[0]

    @property
    def namespace(self) -> str:
        return self.value[1]

    @property
    def label(self) -> str:
        return {"UBL_INVOICE": "ubl:Invoice", "UBL_CREDIT_NOTE": "ubl:CreditNote", "CII_INVOICE": "cii:CrossIndustryInvoice"}[self.name]

    @classmethod
    def from_root(cls, namespace: str | None, local: str) -> DocumentType:
        for member in cls:
            if member.namespace == namespace and member.root == local:
                return member
        # The message is fixed (it is logged); what the sender sent goes into a detail.
        shown = f"{{{namespace}}}{local}" if namespace else local
        raise UnsupportedDocument(
            "the root element is not a document type this gateway accepts; send a UBL 2.1 Invoice or CreditNote, "
            "or a UN/CEFACT CrossIndustryInvoice",
            [Detail(f"found root element {shown[:200]}", path="/*")],
            code="UNSUPPORTED_DOCUMENT_TYPE",
        )


class PartnerStatus(enum.Enum):
    ACTIVE = "active"
    SUSPENDED = "suspended"
    PENDING = "pending"  # registered, not yet activated: its certificate fingerprints are not confirmed out of band


@dataclass(frozen=True, slots=True)
class CertWindow:
    """When a registered certificate is accepted, for a rollover: from ``start`` (the new certificate)
    until ``end`` (the old one); either open.  Certificates without a window are accepted while registered."""

    purpose: str  # "client", "signing" or "smime": a window is the certificate's in that role only
    path: str
    spki_sha256: str
    start: datetime | None = None
    end: datetime | None = None

    def refusal(self, at: datetime) -> str | None:
        """Why the certificate is not accepted at ``at`` (None: it is)."""
        if self.start is not None and at < self.start:
            return f"is registered from {self.start:%Y-%m-%dT%H:%M:%SZ} on (a certificate rollover) and is not accepted yet"
        if self.end is not None and at >= self.end:
            return f"was retired at {self.end:%Y-%m-%dT%H:%M:%SZ} (a certificate rollover); use the newer certificate"
        return None


class SignaturePolicy(enum.Enum):
    """Per partner: what an XML signature on the invoice document must be."""

    REQUIRED = "required"  # the invoice must carry a valid signature by a registered signing certificate
    IF_PRESENT = "if-present"  # a signature that is there must verify (the default)
    IGNORE = "ignore"  # signatures are not checked at all


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    """Who is on the other end, as proven by the transport (mutual TLS)."""

    spki_sha256: str  # hex SHA-256 of the client certificate's (or, by e-mail, the S/MIME signer's) SubjectPublicKeyInfo
    subject: str  # for logs only; never used to decide anything
    transport: str  # "https" or "smtp"


@dataclass(frozen=True, slots=True)
class Partner:
    """One allowlisted trading partner."""

    name: str
    status: PartnerStatus
    verified_by: str
    verified_at: str
    client_spki: frozenset[str]  # hex SHA-256 of each registered client certificate's SPKI
    client_certs: tuple[str, ...]  # paths of the registered certificates (PEM)
    party_ids: frozenset[str]  # "scheme:value", or a bare value, as registered (compared by identifiers.party_key)
    emails: tuple[str, ...] = ()
    signature_policy: SignaturePolicy = SignaturePolicy.IF_PRESENT
    signing_certs: tuple[str, ...] = ()  # paths of the registered document-signing certificates (PEM)
    signing_spki: frozenset[str] = frozenset()
    rules: tuple[str, ...] | None = None  # rule packs; None: the configured default; (): none (warned at start)
    amount_ceilings: tuple[tuple[str, Decimal], ...] = ()  # (currency, ceiling): above it, or in another currency, held
    endpoint: str = ""  # where invoices for this partner go: https:// (mutual TLS) or mailto: (S/MIME); "": nowhere
    sign_outbound: bool = False  # invoices sent to this partner carry the gateway's XML signature
    smime_certs: tuple[str, ...] = ()  # paths of the partner's S/MIME certificates (PEM): it signs with them, we encrypt to them
    smime_spki: frozenset[str] = frozenset()
    smime_signed_only: bool = False  # accept signed e-mail that is not encrypted (default: sign-then-encrypt required)
    windows: tuple[CertWindow, ...] = ()  # acceptance windows of certificates in a rollover

    def refusal(self, spki: str, at: datetime, purpose: str) -> str | None:
        """Why the certificate with this key is not accepted for ``purpose`` at ``at`` (None: it is, as
        far as its window goes)."""
        return next((w.refusal(at) for w in self.windows if w.spki_sha256 == spki and w.purpose == purpose), None)

    def window(self, purpose: str, path: str) -> CertWindow | None:
        return next((w for w in self.windows if w.purpose == purpose and w.path == path), None)


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """Bytes plus the authenticated peer, as a transport hands them to the pipeline."""

    body: bytes = field(repr=False)
    peer: PeerIdentity
    partner: Partner
    received_at: str  # RFC 3339, UTC
    media_type: str = "application/xml"  # or application/pdf: a Factur-X / ZUGFeRD PDF with the XML inside


@dataclass(frozen=True, slots=True)
class InvoiceFacts:
    """What the gateway reads out of a schema-valid document (only through string(), never .text)."""

    document_type: DocumentType
    invoice_number: str
    ubl_version: str
    supplier_ids: tuple[str, ...]  # as written ("scheme:value" or bare); compared by identifiers.party_key
    customer_ids: tuple[str, ...]
    customization_id: str
    profile_id: str
    issue_date: str
    payee_accounts: tuple[str, ...] = ()  # BT-84: accounts (IBAN or other) the invoice asks to be paid to
    payable_amount: str = ""  # BT-115, as written
    currency: str = ""  # of the payable amount
    credit_note: bool = False  # numbered in the seller's credit-note series, not the invoice series
    # (party, identifier) of the parties that act for the seller — "payee" (BG-10), "tax representative"
    # (BG-11), "seller" (UBL cac:SellerSupplierParty), "invoicer" (CII ram:InvoicerTradeParty): never bound
    # to the partner, but none may be another partner's (gateway/partners/directory.py, authorize).
    agent_ids: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        """The numbering series, for the business-duplicate key (seller, kind, number, issue date)."""
        return "credit-note" if self.credit_note else "invoice"


@dataclass(frozen=True, slots=True)
class AcceptedInvoice:
    """An authorized invoice, sealed, ready for the durable write."""

    message_id: str
    partner: str
    sha256: str
    received_at: str
    size: int
    facts: InvoiceFacts
    sealed: bytes = field(repr=False)
    key_id: str
    signature: dict[str, object] | None = None  # what the verified XML signature proved, if one was checked
    media_type: str = "application/xml"  # of the stored original (a Factur-X PDF is kept as the PDF)
    rules: dict[str, object] | None = None  # packs that ran and the warnings they gave; None: no rules
    accounts: tuple[str, ...] = ()  # payee accounts, normalised, checked against the seller's history in the store
    holds: tuple[str, ...] = ()  # reasons to hold for review that need no history (amount ceiling)
    destinations: tuple[str, ...] = ()  # where routing sends it; () with a hold reason when nothing matched
    route: str = ""  # which routing rule decided (routes[N], routing.default, outbound)
    direction: str = "in"  # "in": from a partner; "out": submitted by the ERP, partner is the recipient
    source_sha256: str = ""  # of the bytes as submitted, when the stored document differs (signed outbound)


@dataclass(frozen=True, slots=True)
class Receipt:
    """What the sender is told once the invoice is durable (or was already)."""

    message_id: str
    status: str
    sha256: str
    received_at: str
    duplicate: bool = False
    rules: dict[str, object] | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "message_id": self.message_id,
            "status": self.status,
            "sha256": self.sha256,
            "received_at": self.received_at,
            "duplicate": self.duplicate,
        }
        if self.status == "held":  # deliberately no reason: it would tell a fraudster what tripped
            out["message"] = "accepted and held for review before delivery"
        if self.rules is not None:
            out["rules"] = self.rules
        return out
