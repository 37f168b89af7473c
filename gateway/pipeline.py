"""accept(): the stages in order, cheapest first.  No I/O here but the store's.

    gate(peer) → duplicate? → parse → document type → XSD → signature → facts → authorize → seal → durable put

The transport has already run ``gate`` (before reading the body); everything from hashing to
sealing is synchronous CPU work run on a worker thread, so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from concurrent.futures import Executor
from dataclasses import dataclass

from lxml import etree

from . import signature
from .model import AcceptedInvoice, DocumentType, InboundMessage, Partner, Receipt, SignaturePolicy
from .partners import PartnerBook
from .schema import SchemaRegistry
from .store import Store
from .ubl import read_facts
from .vault import Vault
from .xmlparse import XmlParser


@dataclass(frozen=True, slots=True)
class Outcome:
    receipt: Receipt
    accepted: AcceptedInvoice | None  # None for a duplicate


class Pipeline:
    def __init__(self, parser: XmlParser, schemas: SchemaRegistry, partners: PartnerBook, vault: Vault,
                 store: Store, destinations: list[str], executor: Executor):
        self.parser = parser
        self.schemas = schemas
        self.partners = partners
        self.vault = vault
        self.store = store
        self.destinations = destinations
        self.executor = executor

    def check(self, msg: InboundMessage) -> AcceptedInvoice | Receipt:
        """Every synchronous stage; returns the sealed invoice, or the receipt of an earlier identical one."""
        sha256 = hashlib.sha256(msg.body).hexdigest()
        earlier = self.store.find_accepted(msg.partner.name, sha256)
        if earlier is not None:
            return earlier
        root = self.parser.parse(msg.body).root
        doc_type = DocumentType.from_root(etree.QName(root).namespace, etree.QName(root).localname)
        version = self.schemas.validate(root, doc_type)
        verified = self.verify_signature(root, msg.partner)
        facts = read_facts(root, doc_type, version)
        self.partners.current.authorize(msg.partner, facts)
        message_id = str(uuid.uuid4())
        sealed, key_id = self.vault.seal(msg.body, message_id, sha256)
        return AcceptedInvoice(message_id, msg.partner.name, sha256, msg.received_at, len(msg.body), facts, sealed, key_id,
                               verified)

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
        result = await loop.run_in_executor(self.executor, self.check, msg)
        if isinstance(result, Receipt):
            return Outcome(result, None)
        receipt = await asyncio.wrap_future(self.store.put(result, self.destinations))
        return Outcome(receipt, None if receipt.duplicate else result)

