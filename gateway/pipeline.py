"""accept(): the stages in order, cheapest first.  No I/O here but the store's.

    gate(peer) → duplicate? → [PDF: extract] → parse → document type → XSD → signature → facts
      → authorize → IBAN check → business rules → hold reasons → seal → durable put (business
        duplicate, payee-account history and quarantine are decided inside the store's transaction)

The transport has already run ``gate`` (before reading the body); everything from hashing to
sealing is synchronous work run on a stage thread, so the event loop never blocks on it (the
business rules run in a rules process; the stage thread waits for it without holding the GIL).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass

from lxml import etree

from . import cii, fraud, pdf, signature, ubl
from .errors import Rejected
from .model import AcceptedInvoice, DocumentType, InboundMessage, Partner, Receipt, SignaturePolicy, Syntax
from .partners import PartnerBook
from .rules import RuleEngine, RulesUnavailable
from .schema import SchemaRegistry
from .store import Store
from .vault import Vault
from .xmlparse import XmlParser

PDF = "application/pdf"
FRAUD_CODES = ("INVALID_IBAN", "DUPLICATE_CONFLICT")


@dataclass(frozen=True, slots=True)
class Outcome:
    receipt: Receipt
    accepted: AcceptedInvoice | None  # None for a duplicate


class Pipeline:
    def __init__(self, parser: XmlParser, schemas: SchemaRegistry, rules: RuleEngine, default_rules: tuple[str, ...],
                 partners: PartnerBook, vault: Vault, store: Store, destinations: list[str], executor: Executor,
                 max_xml_bytes: int, hold_invalid_iban: bool = False):
        self.parser = parser
        self.schemas = schemas
        self.rules = rules
        self.default_rules = default_rules
        self.partners = partners
        self.vault = vault
        self.store = store
        self.destinations = destinations
        self.executor = executor
        self.max_xml_bytes = max_xml_bytes  # of an invoice embedded in a PDF, once extracted
        self.hold_invalid_iban = hold_invalid_iban  # fraud.invalid_iban = "hold"

    def check(self, msg: InboundMessage) -> AcceptedInvoice | Receipt:
        """Every synchronous stage; returns the sealed invoice, or the receipt of an earlier identical one."""
        sha256 = hashlib.sha256(msg.body).hexdigest()
        earlier = self.store.find_accepted(msg.partner.name, sha256)
        if earlier is not None:
            return earlier
        xml = pdf.embedded_invoice(msg.body, self.max_xml_bytes) if msg.media_type == PDF else msg.body
        root = self.parser.parse(xml).root
        doc_type = DocumentType.from_root(etree.QName(root).namespace, etree.QName(root).localname)
        version = self.schemas.validate(root, doc_type)
        verified = self.verify_signature(root, msg.partner)
        facts = (cii if doc_type.syntax is Syntax.CII else ubl).read_facts(root, doc_type, version)
        self.partners.current.authorize(msg.partner, facts)
        accounts, holds = fraud.check_accounts(facts, hold_invalid=self.hold_invalid_iban)
        report = self.rules.evaluate(root, doc_type.syntax, self.rule_packs(msg.partner))
        message_id = str(uuid.uuid4())
        sealed, key_id = self.vault.seal(msg.body, message_id, sha256)
        return AcceptedInvoice(message_id, msg.partner.name, sha256, msg.received_at, len(msg.body), facts, sealed, key_id,
                               verified, msg.media_type, report.as_json() if report.packs else None, accounts,
                               tuple(holds + fraud.hold_reasons(msg.partner, facts)))

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
        return signature.verify(root, self.partners.current.signers.get(partner.name, []), found=found).as_json()

    async def accept(self, msg: InboundMessage) -> Outcome:
        """Run the stages and return only after the invoice is durable (or was already)."""
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self.executor, self.check, msg)
            if isinstance(result, Receipt):
                return Outcome(result, None)
            receipt = await asyncio.wrap_future(self.store.put(result, self.destinations))
        except Rejected as exc:
            if exc.code in FRAUD_CODES:  # the attempt itself is worth an audit record
                await asyncio.wrap_future(self.store.audit("gateway", f"fraud.{exc.code.lower()}", msg.partner.name, None,
                                                           {"transport": msg.peer.transport}))
            raise
        return Outcome(receipt, None if receipt.duplicate else result)
