"""The intake path: the stages in order, cheapest first.  No I/O here but the store's.

    gate(peer) → [S/MIME: decrypt, verify, authenticate the signer] → [PDF: extract]
      → parse → document type → XSD → signature → facts → authorize → IBAN check → business rules
      → hold reasons → route → seal → durable put (identical content stored before, business
        duplicate, payee-account history and quarantine are decided inside the store's transaction,
        gateway/stages/admission.py)

Identical content stored before gets its first receipt whatever changed since (a partner or an ERP
that lost a 202 and resends): the put answers with it, and a refusal by the stages is raised only
when the store knows no earlier acceptance.  Looking it up before the stages instead would cost every
new invoice one more round trip to the store, for the rare resend.

``submit()`` is the same for an invoice the ERP sends out (``POST /v1/outbound``): the seller must be
this business, the buyer a registered partner with an endpoint; it is signed when that partner's
policy asks for it, and routed to the partner.

A transport opens an ``attempt`` for each submission and runs its own checks inside it (the HTTPS
listener gates the peer before reading the body); whatever is refused inside is recorded in the
audit log here, once, and nowhere else.  Everything from opening the mail to sealing is synchronous
work run in one hop on a stage thread, so the event loop never blocks on it (the business rules run
in a rules process; the stage thread waits for it without holding the GIL).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from lxml import etree

from .config.model import OutboundConfig
from .errors import Detail, Forbidden, GatewayError, Rejected, Transient, UnsupportedDocument
from .identifiers import keys_of
from .model import (
    AcceptedInvoice,
    DocumentType,
    InboundMessage,
    InvoiceFacts,
    Partner,
    PartnerStatus,
    PeerIdentity,
    Receipt,
    SignaturePolicy,
    Syntax,
)
from .partners.book import PartnerBook
from .smime import unwrap
from .smime.identity import Identity
from .stages import cii, fraud, pdf, signature, ubl
from .stages.revocation import Revocation
from .stages.routing import UNROUTED, Router
from .stages.rules import RuleEngine, RulesUnavailable
from .stages.schema import SchemaRegistry
from .stages.xmlparse import XmlParser
from .storage.base import AuditLog, IntakeStore
from .threads import RenewableThreads
from .tls import spki_sha256
from .vault import Vault

PDF = "application/pdf"
FRAUD_CODES = ("INVALID_IBAN", "DUPLICATE_CONFLICT")


class SigningUnavailable(Transient):
    code = "SIGNING_UNAVAILABLE"


def read_facts(root: etree._Element, doc_type: DocumentType, version: str) -> InvoiceFacts:
    if doc_type.syntax is Syntax.CII:
        return cii.read_facts(root, doc_type, version)
    return ubl.read_facts(root, doc_type, version)


def detached(exc: GatewayError) -> GatewayError:
    """A refusal without the frames that raised it: they hold the document's tree, which can go now."""
    exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


@dataclass(frozen=True, slots=True)
class Outcome:
    receipt: Receipt
    accepted: AcceptedInvoice | None  # None for a duplicate


@dataclass
class Submission:
    """What is known of one submission while it goes through the stages: a refusal is recorded with it.

    The transport fills in what it proves (the peer, the partner); the stages add the rest (the
    S/MIME stage: the signer, the partner and the opened message; every stage: the content's hash)."""

    transport: str  # https, smtp, or erp (an invoice the ERP submits for sending)
    peer: PeerIdentity | None = None
    partner: Partner | None = None
    sha256: str | None = None  # of the content refused: the invoice once known, else what was received
    letter: unwrap.Opened | None = None  # the S/MIME message it came in, once opened and verified


@dataclass(frozen=True, slots=True)
class MailIdentity:
    """What the S/MIME stage needs: the gateway's key (to decrypt) and the CAs partners' certificates chain to."""

    identity: Identity
    roots: Sequence[x509.Certificate]
    revocation: Revocation | None


class Pipeline:
    def __init__(self, parser: XmlParser, schemas: SchemaRegistry, rules: RuleEngine, default_rules: tuple[str, ...],
                 partners: PartnerBook, vault: Vault, intake: IntakeStore, audit: AuditLog, router: Router, executor: Executor,
                 max_xml_bytes: int, hold_invalid_iban: bool = False, outbound: OutboundConfig | None = None,
                 signer: signature.SigningKey | None = None, observe: Callable[[str, float], None] | None = None,
                 mail: MailIdentity | None = None, extension_namespaces: frozenset[str] = frozenset()):
        self.parser = parser
        self.extension_namespaces = extension_namespaces  # allowed in UBL extension slots besides signatures
        self.schemas = schemas
        self.rules = rules
        self.default_rules = default_rules
        self.partners = partners
        self.vault = vault
        self.intake = intake
        self.audit = audit
        self.router = router
        self.outbound = outbound
        self.signer = signer  # the gateway's document-signing key, for partners that want signed invoices
        self.executor = executor
        self.max_xml_bytes = max_xml_bytes  # of an invoice embedded in a PDF, once extracted
        self.hold_invalid_iban = hold_invalid_iban  # fraud.invalid_iban = "hold"
        self.observe = observe or (lambda stage, seconds: None)  # per-stage latency (the metrics histogram)
        self.mail = mail  # the S/MIME stage's keys ([smtp]); None: no mail is taken

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.observe(name, time.perf_counter() - start)

    def validated(self, body: bytes, media_type: str) -> tuple[etree._Element, DocumentType, str]:
        """[PDF: extract] → parse → document type → XSD: the parsed root, its type and UBL version."""
        with self._stage("parse"):
            xml = pdf.embedded_invoice(body, self.max_xml_bytes) if media_type == PDF else body
            root = self.parser.parse(xml).root
            doc_type = DocumentType.from_root(etree.QName(root).namespace, etree.QName(root).localname)
        with self._stage("schema"):
            version = self.schemas.validate(root, doc_type)
            if doc_type.syntax is Syntax.UBL:
                ubl.check_extensions(root, self.extension_namespaces)
            return root, doc_type, version

    def check(self, msg: InboundMessage, sha256: str) -> AcceptedInvoice:
        """Every synchronous stage; returns the sealed invoice."""
        root, doc_type, version = self.validated(msg.body, msg.media_type)
        with self._stage("signature"):
            verified = self.verify_signature(root, msg.partner)
        with self._stage("authorize"):
            facts = read_facts(root, doc_type, version)
            self.partners.current.authorize(msg.partner, facts)
            accounts, holds = fraud.check_accounts(facts, hold_invalid=self.hold_invalid_iban)
        with self._stage("rules"):
            report = self.rules.evaluate(root, doc_type.syntax, self.rule_packs(msg.partner))
        destinations = self.router.route(msg.partner.name, facts)
        if not destinations:
            holds.append(UNROUTED)
        message_id = str(uuid.uuid4())
        with self._stage("seal"):
            sealed, key_id = self.vault.seal(msg.body, message_id, sha256)
        return AcceptedInvoice(message_id, msg.partner.name, sha256, msg.received_at, len(msg.body), facts, sealed, key_id,
                               verified, msg.media_type, report.as_json() if report.packs else None, accounts,
                               tuple(holds + fraud.hold_reasons(msg.partner, facts)), destinations,
                               self.router.explain(msg.partner.name, facts))

    def check_outbound(self, body: bytes, sha256: str, received_at: str, media_type: str) -> AcceptedInvoice:
        """The stages for an invoice this business sends: validated like a received one, then
        addressed to the partner that the buyer identifiers name."""
        assert self.outbound is not None
        root, doc_type, version = self.validated(body, media_type)
        facts = read_facts(root, doc_type, version)
        self._check_seller(facts)
        partner = self._recipient(facts)
        report = self.rules.evaluate(root, doc_type.syntax, self.rule_packs(partner))
        document = body
        signed = None
        if partner.sign_outbound:
            document, signed = self._sign(root, doc_type, media_type, partner)
        message_id = str(uuid.uuid4())
        stored_sha = hashlib.sha256(document).hexdigest()
        sealed, key_id = self.vault.seal(document, message_id, stored_sha)
        return AcceptedInvoice(message_id, partner.name, stored_sha, received_at, len(document), facts, sealed, key_id,
                               signed, media_type, report.as_json() if report.packs else None,
                               destinations=(self.outbound.destination,), route="outbound", direction="out",
                               source_sha256=sha256)

    def _check_seller(self, facts: InvoiceFacts) -> None:
        assert self.outbound is not None
        if not keys_of(facts.supplier_ids) & keys_of(self.outbound.identities):
            raise Forbidden(
                "the seller of this invoice is not this business: none of its seller identifiers is listed in the "
                "gateway's outbound.identities",
                [Detail(f"found {i!r}") for i in facts.supplier_ids]
                + [Detail(f"this business: {', '.join(sorted(self.outbound.identities))}")],
                code="SELLER_NOT_THIS_BUSINESS")

    def _recipient(self, facts: InvoiceFacts) -> Partner:
        directory = self.partners.current
        names = sorted({o for o in map(directory.owners.owner, facts.customer_ids) if o is not None})
        if len(names) != 1:
            found = [Detail(f"buyer identifier {i!r}") for i in facts.customer_ids] or [
                Detail("the invoice names no buyer identifier (cac:AccountingCustomerParty / ram:BuyerTradeParty)")]
            raise Forbidden(
                "no single registered trading partner is the buyer of this invoice" if not names else
                f"the buyer identifiers belong to several partners ({', '.join(names)})",
                found, code="RECIPIENT_UNKNOWN")
        partner = directory.get(names[0])
        assert partner is not None
        if partner.status is not PartnerStatus.ACTIVE:
            raise Forbidden(f"trading partner {partner.name!r} is {partner.status.value}; nothing is sent to it",
                            code="RECIPIENT_SUSPENDED")
        if not partner.endpoint:
            raise Forbidden(f"trading partner {partner.name!r} has no endpoint to send invoices to; register one with "
                            f"`einvoice-gateway partners edit {partner.name} --endpoint URL`", code="RECIPIENT_NO_ENDPOINT")
        return partner

    def _sign(self, root: etree._Element, doc_type: DocumentType, media_type: str,
              partner: Partner) -> tuple[bytes, dict[str, object]]:
        if media_type == PDF or doc_type.syntax is not Syntax.UBL:
            raise UnsupportedDocument(
                f"trading partner {partner.name!r} receives signed invoices only, and this gateway signs UBL XML; "
                "submit the invoice as UBL (application/xml)", code="CANNOT_SIGN")
        if self.signer is None:
            raise SigningUnavailable(f"trading partner {partner.name!r} receives signed invoices only, and the gateway "
                                     "has no [signing] key configured; ask the operator")
        sig = signature.sign(root, self.signer)
        return (etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8"),
                {"signed_by_gateway": True, "signature_id": sig.get("Id"),
                 "signer": self.signer.cert.subject.rfc4514_string()})

    def rule_packs(self, partner: Partner) -> tuple[str, ...]:
        names = self.default_rules if partner.rules is None else partner.rules
        unknown = [n for n in names if n not in self.rules.packs]
        if unknown:  # the partners file names a pack the configuration lost: refuse rather than skip it
            raise RulesUnavailable(
                f"the rule pack(s) {', '.join(unknown)} chosen for you are not configured on this gateway, so your "
                "invoices cannot be checked; ask the operator", code="RULES_UNAVAILABLE")
        return names

    def verify_signature(self, root: etree._Element, partner: Partner) -> dict[str, object] | None:
        """Apply the partner's signature policy.  The signature covers the whole tree that later
        stages read (one reference, URI="" or the root's Id), so the facts come from signed data."""
        policy = partner.signature_policy
        if policy is SignaturePolicy.IGNORE:
            return None
        found = signature.find_signatures(root)
        if not found:
            if policy is SignaturePolicy.REQUIRED:
                raise signature.SignatureRequired(
                    "this gateway requires your invoices to carry an XML signature (enveloped XMLDSig/XAdES in "
                    "ext:UBLExtensions) made with a signing certificate registered for you; this one is unsigned",
                    code="SIGNATURE_REQUIRED",
                )
            return None
        return signature.verify(root, self.partners.current.signers_for(partner.name), found=found).as_json()

    # --- submissions: the stages in one hop, refusals recorded here ------------------------------------

    @contextlib.asynccontextmanager
    async def attempt(self, transport: str) -> AsyncIterator[Submission]:
        """One submission: whatever is refused inside the block (by the transport's checks or the stages)
        is recorded in the audit log once, then raised on to the transport's reply."""
        submission = Submission(transport)
        try:
            yield submission
        except Rejected as exc:
            await self._refused(submission, exc)
            raise

    async def _refused(self, sub: Submission, exc: Rejected) -> None:
        """The audit record of a refusal: its code, and what was refused by its hash (never content), or, when
        nothing was read yet, by the key of the certificate that presented it.  A fraud code by its own name."""
        if sub.transport == "erp":
            await self.audit.append("erp", "invoice.submission_rejected", None, None, {"code": exc.code, "sha256": sub.sha256})
            return
        detail: dict[str, object] = {"transport": sub.transport, "code": exc.code}
        if sub.sha256 is not None:
            detail["sha256"] = sub.sha256
        elif sub.peer is not None:
            detail |= {"peer_spki": sub.peer.spki_sha256, "peer": sub.peer.subject}
        action = f"fraud.{exc.code.lower()}" if exc.code in FRAUD_CODES else "invoice.rejected"
        await self.audit.append("gateway", action, sub.partner.name if sub.partner else None, None, detail)

    async def accept(self, sub: Submission, received: bytes, received_at: str, media_type: str = "application/xml") -> Outcome:
        """Run the stages on a received invoice (or, from the SMTP listener, on the S/MIME message it came
        in) in one hop to a stage thread, and return only after it is durable, or was already."""
        checked = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._stages, sub, received, received_at, media_type)
        self._released()
        assert sub.partner is not None
        try:
            return await self._stored(sub, checked, sub.partner.name, "in")
        finally:
            del checked  # a refusal raised from here must not hold itself (and the body) in a reference cycle

    async def submit(self, sub: Submission, body: bytes, received_at: str, media_type: str) -> Outcome:
        """``POST /v1/outbound``: the stages, then the durable write of the invoice and its delivery job."""
        checked = await asyncio.get_running_loop().run_in_executor(
            self.executor, self._outbound_stages, sub, body, received_at, media_type)
        self._released()
        try:
            return await self._stored(sub, checked, None, "out")
        finally:
            del checked  # no reference cycle through the refusal's traceback

    def _released(self) -> None:
        """After a document's stages, its tree is gone: memory it took goes back (gateway/stages/xmlparse.py)."""
        if self.parser.release() and isinstance(self.executor, RenewableThreads):
            self.executor.renew()

    async def _stored(self, sub: Submission, checked: AcceptedInvoice | GatewayError, partner: str | None,
                      direction: str) -> Outcome:
        """The durable put, or the stages' refusal unless identical content was accepted before."""
        if isinstance(checked, GatewayError):
            assert sub.sha256 is not None
            earlier = await self.intake.find_accepted(partner, sub.sha256, direction)
            if earlier is None:
                try:
                    raise checked
                finally:
                    del checked  # no reference cycle through the refusal's traceback
            return Outcome(earlier, None)
        with self._stage("store"):
            receipt = await self.intake.put(checked)
        return Outcome(receipt, None if receipt.duplicate else checked)

    def _stages(self, sub: Submission, received: bytes, received_at: str, media_type: str) -> AcceptedInvoice | GatewayError:
        body = received
        if sub.transport == "smtp":
            with self._stage("smime"):
                body, media_type = self.open_mail(sub, received)  # nothing to look up yet: its refusals are final
        assert sub.partner is not None and sub.peer is not None
        sub.sha256 = hashlib.sha256(body).hexdigest()
        try:
            return self.check(InboundMessage(body, sub.peer, sub.partner, received_at, media_type), sub.sha256)
        except GatewayError as exc:
            return detached(exc)

    def _outbound_stages(self, sub: Submission, body: bytes, received_at: str, media_type: str) -> AcceptedInvoice | GatewayError:
        sub.sha256 = hashlib.sha256(body).hexdigest()
        try:
            return self.check_outbound(body, sub.sha256, received_at, media_type)
        except GatewayError as exc:
            return detached(exc)

    def open_mail(self, sub: Submission, raw: bytes) -> tuple[bytes, str]:
        """The S/MIME stage: decrypt, verify and unpack the message, and authenticate its signer as a
        partner; the invoice inside and its media type."""
        if self.mail is None:
            raise Transient("this gateway takes no e-mail ([smtp] is not configured)")
        sub.letter = unwrap.open_message(raw, self.mail.identity, self.max_xml_bytes)
        sub.partner = unwrap.authenticate(sub.letter, self.partners.current, self.mail.roots, self.mail.revocation)
        signer = sub.letter.verified.signer
        sub.peer = PeerIdentity(spki_sha256(signer), signer.subject.rfc4514_string(), "smtp")
        return sub.letter.invoice, sub.letter.media_type
