"""The partner directory: who a peer is, and what the partner it is may send.

``gate`` identifies a peer by its certificate's key (cheap, before any body byte is read);
``authorize`` binds the supplier named inside an invoice to the partner that sent it;
``signers_for`` gives the document-signing certificates a partner's XML signatures must use.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from ..errors import ConfigError, Detail, Forbidden
from ..identifiers import Owners, keys_of, party_key
from ..model import InvoiceFacts, Partner, PartnerStatus, PeerIdentity, Syntax
from ..stages.signature import TrustedSigner
from ..tls import CertInfo

MAX_REPORTED = 10  # identifiers of other partners named in one refusal
_CII_TRADE = "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction"
# Where each party that authorize reads is, for the details of a refusal.
PARTIES = {
    Syntax.UBL: {"supplier": "/*/cac:AccountingSupplierParty/cac:Party", "payee": "/*/cac:PayeeParty",
                 "tax representative": "/*/cac:TaxRepresentativeParty", "seller": "/*/cac:SellerSupplierParty/cac:Party"},
    Syntax.CII: {"supplier": f"{_CII_TRADE}/ram:ApplicableHeaderTradeAgreement/ram:SellerTradeParty",
                 "payee": f"{_CII_TRADE}/ram:ApplicableHeaderTradeSettlement/ram:PayeeTradeParty",
                 "tax representative": f"{_CII_TRADE}/ram:ApplicableHeaderTradeAgreement/ram:SellerTaxRepresentativeTradeParty",
                 "invoicer": f"{_CII_TRADE}/ram:ApplicableHeaderTradeSettlement/ram:InvoicerTradeParty"},
}


@dataclass(frozen=True, slots=True)
class PartnerDirectory:
    """An immutable snapshot of the allowlist, with the two lookups the pipeline needs."""

    partners: tuple[Partner, ...]
    by_spki: dict[str, Partner]
    owners: Owners  # who registered which party identifier, compared by their keys (gateway/identifiers.py)
    certificates: dict[str, CertInfo]
    signers: dict[str, list[TrustedSigner]]  # partner name → its registered document-signing certificates
    by_smime_spki: dict[str, Partner]  # S/MIME signer key → partner (the identity of e-mail)
    own_keys: dict[str, frozenset[str]]  # partner name → the comparison keys of its party identifiers

    @classmethod
    def build(cls, partners: list[Partner], certificates: dict[str, CertInfo]) -> PartnerDirectory:
        by_spki: dict[str, Partner] = {}
        by_smime: dict[str, Partner] = {}
        owners = Owners()
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
            for pid in sorted(p.party_ids):  # the same identifier in another form is the same identifier
                other = next(((o, w) for o, w in owners.clashing(pid) if o != p.name), None)
                if other is not None:
                    raise ConfigError(f"partners[{i}].party_ids: {pid!r} is already registered for partner {other[0]!r}"
                                      + (f" (as {other[1]!r})" if other[1] != pid else ""))
            for pid in sorted(p.party_ids):
                owners.add(pid, p.name)
        signers = {p.name: [TrustedSigner.of(certificates[s].cert, s) for s in sorted(p.signing_spki) if s in certificates]
                   for p in partners}
        return cls(tuple(partners), by_spki, owners, certificates, signers, by_smime,
                   {p.name: keys_of(p.party_ids) for p in partners})

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
        """The supplier inside the invoice must be the authenticated partner (SECURITY-TESTS.md I-01).

        Identifiers compare by their keys (gateway/identifiers.py): whatever its spacing, punctuation,
        invisible characters, digit widths or scheme, an identifier of another partner is refused,
        in the supplier party and in every party that acts for the seller (``InvoiceFacts.agent_ids``).
        At least one supplier identifier must be the partner's own; identifiers of no registered
        partner may stand beside it.  The details quote what the invoice wrote, and never name the
        other partner."""
        ids = facts.supplier_ids
        syntax = facts.document_type.syntax
        cii = syntax is Syntax.CII
        if not ids:
            raise Forbidden(
                "the invoice names no seller identifier (ram:SellerTradeParty: ram:ID, ram:GlobalID, "
                "ram:SpecifiedLegalOrganization/ram:ID, ram:URIUniversalCommunication/ram:URIID or "
                "ram:SpecifiedTaxRegistration/ram:ID)" if cii else
                "the invoice names no supplier identifier (cac:AccountingSupplierParty/cac:Party: cbc:EndpointID, "
                "cac:PartyIdentification/cbc:ID, cac:PartyTaxScheme/cbc:CompanyID or cac:PartyLegalEntity/cbc:CompanyID)",
                code="SUPPLIER_NOT_IDENTIFIED",
            )
        named = [("supplier", i) for i in ids] + list(facts.agent_ids)
        foreign = [Detail(_foreign(party, i, self.owners.owner(i) not in (None, partner.name)), path=PARTIES[syntax].get(party))
                   for party, i in named if any(o != partner.name for o, _ in self.owners.clashing(i))]
        if foreign:
            raise Forbidden("the invoice names identifiers that belong to another trading partner", foreign[:MAX_REPORTED],
                            code="SUPPLIER_NOT_AUTHORIZED")
        own = self.own_keys.get(partner.name) or keys_of(partner.party_ids)
        if not any(party_key(i).key in own for i in ids):
            raise Forbidden(
                f"none of the supplier identifiers in the invoice is registered for partner {partner.name!r}",
                [Detail(f"found {i!r}", path=PARTIES[syntax]["supplier"]) for i in ids]
                + [Detail(f"registered: {', '.join(sorted(partner.party_ids))}")],
                code="SUPPLIER_NOT_AUTHORIZED",
            )


def _foreign(party: str, written: str, exact: bool) -> str:
    """What a refusal says of an identifier of another partner: as written, and as compared."""
    key = party_key(written)
    if exact:
        read = f" (compared as {key.key!r})" if key.key != written else ""
        return f"{party} identifier {written!r}{read} is registered to another partner"
    return (f"{party} identifier {written!r} names no scheme this gateway knows, and its value is that of an identifier "
            "registered to another partner; write the identifier's scheme (schemeID), or leave it out")


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
