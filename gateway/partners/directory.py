"""The partner directory: who a peer is, and what the partner it is may send.

``gate`` identifies a peer by its certificate's key (cheap, before any body byte is read);
``authorize`` binds the supplier named inside an invoice to the partner that sent it;
``signers_for`` gives the document-signing certificates a partner's XML signatures must use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import ConfigError, Detail, Forbidden
from ..model import InvoiceFacts, Partner, PartnerStatus, PeerIdentity, Syntax
from ..stages.signature import TrustedSigner
from ..tls import CertInfo


@dataclass(frozen=True, slots=True)
class PartnerDirectory:
    """An immutable snapshot of the allowlist, with the two lookups the pipeline needs."""

    partners: tuple[Partner, ...]
    by_spki: dict[str, Partner]
    owner_of_id: dict[str, str]
    certificates: dict[str, CertInfo]
    signers: dict[str, list[TrustedSigner]]  # partner name → its registered document-signing certificates
    by_smime_spki: dict[str, Partner]  # S/MIME signer key → partner (the identity of e-mail)

    @classmethod
    def build(cls, partners: list[Partner], certificates: dict[str, CertInfo]) -> PartnerDirectory:
        by_spki: dict[str, Partner] = {}
        by_smime: dict[str, Partner] = {}
        owner: dict[str, str] = {}
        signing_owner: dict[str, str] = {}
        for i, p in enumerate(partners):
            for spki in p.signing_spki:
                if signing_owner.setdefault(spki, p.name) != p.name:
                    raise ConfigError(
                        f"partners[{i}].signing_certs: a signing key is also registered for partner {signing_owner[spki]!r}")
            for spki in p.client_spki:
                if spki in by_spki:
                    raise ConfigError(
                        f"partners[{i}].client_certs: a certificate key is also registered for partner {by_spki[spki].name!r}")
                by_spki[spki] = p
            for spki in p.smime_spki:
                if spki in by_smime:
                    raise ConfigError(
                        f"partners[{i}].smime_certs: an S/MIME key is also registered for partner {by_smime[spki].name!r}")
                by_smime[spki] = p
            for pid in p.party_ids:
                if pid in owner:
                    raise ConfigError(f"partners[{i}].party_ids: {pid!r} is already registered for partner {owner[pid]!r}")
                owner[pid] = p.name
        signers = {p.name: [TrustedSigner.of(certificates[s].cert, s) for s in sorted(p.signing_spki) if s in certificates]
                   for p in partners}
        return cls(tuple(partners), by_spki, owner, certificates, signers, by_smime)

    def get(self, name: str) -> Partner | None:
        return next((p for p in self.partners if p.name == name), None)

    def gate(self, peer: PeerIdentity, at: datetime | None = None) -> Partner:
        """The cheap allowlist check, before any body byte is read."""
        partner = self.by_spki.get(peer.spki_sha256)
        if partner is None:
            raise Forbidden(
                "your client certificate is not registered for any trading partner of this gateway "
                f"(certificate key SHA-256 {peer.spki_sha256}); ask the operator to register it",
                code="PARTNER_UNKNOWN",
            )
        admit(partner, peer.spki_sha256, at or datetime.now(UTC), "client")
        return partner

    def signers_for(self, name: str, at: datetime | None = None) -> list[TrustedSigner]:
        """The partner's document-signing certificates accepted now (a retired or future one is left out)."""
        partner, when = self.get(name), at or datetime.now(UTC)
        return [s for s in self.signers.get(name, []) if partner is not None and partner.refusal(s.spki, when, "signing") is None]

    def authorize(self, partner: Partner, facts: InvoiceFacts) -> None:
        """The supplier inside the invoice must be the authenticated partner (SECURITY-TESTS.md I-01)."""
        ids = facts.supplier_ids
        cii = facts.document_type.syntax is Syntax.CII
        if not ids:
            raise Forbidden(
                "the invoice names no seller identifier (ram:SellerTradeParty: ram:ID, ram:GlobalID, "
                "ram:SpecifiedLegalOrganization/ram:ID, ram:URIUniversalCommunication/ram:URIID or "
                "ram:SpecifiedTaxRegistration/ram:ID)" if cii else
                "the invoice names no supplier identifier (cac:AccountingSupplierParty/cac:Party: cbc:EndpointID, "
                "cac:PartyIdentification/cbc:ID, cac:PartyTaxScheme/cbc:CompanyID or cac:PartyLegalEntity/cbc:CompanyID)",
                code="SUPPLIER_NOT_IDENTIFIED",
            )
        foreign = [i for i in ids if self.owner_of_id.get(i, partner.name) != partner.name]
        if foreign:
            raise Forbidden(
                "the invoice's supplier identifiers belong to another trading partner",
                [Detail(f"supplier identifier {i!r} is registered to another partner") for i in foreign],
                code="SUPPLIER_NOT_AUTHORIZED",
            )
        if not any(i in partner.party_ids for i in ids):
            raise Forbidden(
                f"none of the supplier identifiers in the invoice is registered for partner {partner.name!r}",
                [Detail(f"found {i!r}", path="/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/"
                        "ram:ApplicableHeaderTradeAgreement/ram:SellerTradeParty" if cii else
                        "/*/cac:AccountingSupplierParty/cac:Party") for i in ids]
                + [Detail(f"registered: {', '.join(sorted(partner.party_ids))}")],
                code="SUPPLIER_NOT_AUTHORIZED",
            )


def admit(partner: Partner, spki: str, at: datetime, purpose: str) -> None:
    """An identified partner may send only while active, and only with a certificate in its window."""
    if partner.status is PartnerStatus.PENDING:
        raise Forbidden(f"trading partner {partner.name!r} is registered but not activated yet (its certificate "
                        "fingerprint is being confirmed); contact the operator", code="PARTNER_PENDING")
    if partner.status is not PartnerStatus.ACTIVE:
        raise Forbidden(f"trading partner {partner.name!r} is suspended; contact the operator", code="PARTNER_SUSPENDED")
    why = partner.refusal(spki, at, purpose)
    if why is not None:
        raise Forbidden(f"the certificate (key SHA-256 {spki}) of trading partner {partner.name!r} {why}",
                        code="CERTIFICATE_NOT_ACTIVE")
