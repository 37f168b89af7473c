"""The partner directory (gateway/partners/directory.py): who a peer is, and what it may send.

It promises:

* ``build`` refuses an allowlist in which one key (client, signing or S/MIME) or one party
  identifier belongs to two partners, naming the entry and the other partner;
* ``gate`` finds the partner by the SHA-256 of its client certificate's key (never by name), and
  ``admit`` lets it in only while it is active and the certificate is inside its rollover window
  for that role; the refusals say which of these it was;
* e-mail is identified by the S/MIME signer's key (``by_smime_spki``), apart from client keys;
* ``signers_for`` gives a partner's signing certificates accepted at a moment;
* ``authorize`` binds the supplier named inside an invoice to the partner that sent it
  (SECURITY-TESTS.md I-01), with messages that tell the sender which identifiers were wrong;
* identifiers compare by their keys (gateway/identifiers.py, issue 20 item 3): another partner's
  identifier in any disguise (tests/helpers/identities.py), in the supplier party or in a party acting
  for the seller (payee, tax representative, UBL's seller, CII's invoicer), is refused without naming
  that partner; two partners cannot register one identifier in two forms.

Certificates are made at test time with the development PKI (gateway/devpki.py); the directory is
built directly from Partner values, as gateway/partners/book.py builds it from the partners file.
"""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lxml import etree

from gateway import devpki
from gateway.errors import ConfigError, Forbidden
from gateway.identifiers import identifier
from gateway.model import CertWindow, DocumentType, InvoiceFacts, Partner, PartnerStatus, PeerIdentity
from gateway.partners.directory import PARTIES, PartnerDirectory, admit
from gateway.stages import ubl
from gateway.tls import CertInfo, inspect_certificate
from tests.helpers.identities import forms, naming, vat_forms

START = datetime(2027, 1, 1, tzinfo=UTC)
END = datetime(2027, 2, 1, tzinfo=UTC)
SECOND = timedelta(seconds=1)
CERTS = ("acme-client", "acme-client-new", "acme-signing", "acme-signing-old", "acme-smime", "beta-client", "beta-signing")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, CertInfo]:
    folder = tmp_path_factory.mktemp("pki")
    ca = devpki.make_ca(folder)
    role = {"client": "client", "signing": "signing", "smime": "smime"}
    out = {}
    for name in CERTS:
        kind = name.split("-")[1]
        issued = devpki.issue(ca, folder, name, role=role[kind], emails=("billing@acme.example",) if kind == "smime" else ())
        out[name] = inspect_certificate(issued.cert, name)
    assert len({c.spki_sha256 for c in out.values()}) == len(CERTS)  # a key of its own each
    return out


def spki(pki: dict[str, CertInfo], *names: str) -> frozenset[str]:
    return frozenset(pki[n].spki_sha256 for n in names)


def partner(name: str, pki: dict[str, CertInfo], *, client: tuple[str, ...] = (), signing: tuple[str, ...] = (),
            smime: tuple[str, ...] = (), ids: tuple[str, ...] = (), **fields: object) -> Partner:
    values: dict[str, object] = dict(
        name=name, status=PartnerStatus.ACTIVE, verified_by="pytest", verified_at="2026-11-01",
        client_spki=spki(pki, *client), client_certs=tuple(f"{c}.crt" for c in client), party_ids=frozenset(ids),
        signing_certs=tuple(f"{s}.crt" for s in signing), signing_spki=spki(pki, *signing),
        smime_certs=tuple(f"{s}.crt" for s in smime), smime_spki=spki(pki, *smime), emails=("billing@acme.example",))
    return Partner(**{**values, **fields})  # type: ignore[arg-type]


@pytest.fixture
def acme(pki: dict[str, CertInfo]) -> Partner:
    return partner("acme", pki, client=("acme-client", "acme-client-new"), signing=("acme-signing", "acme-signing-old"),
                   smime=("acme-smime",), ids=("0088:4000001000006", "DE123456789"),
                   windows=(CertWindow("client", "acme-client-new.crt", pki["acme-client-new"].spki_sha256, start=START),
                            CertWindow("client", "acme-client.crt", pki["acme-client"].spki_sha256, end=END),
                            CertWindow("signing", "acme-signing-old.crt", pki["acme-signing-old"].spki_sha256, end=START)))


@pytest.fixture
def beta(pki: dict[str, CertInfo]) -> Partner:
    return partner("beta", pki, client=("beta-client",), signing=("beta-signing",), ids=("0088:7300010000001",))


@pytest.fixture
def directory(pki: dict[str, CertInfo], acme: Partner, beta: Partner) -> PartnerDirectory:
    return PartnerDirectory.build([acme, beta], dict((c.spki_sha256, c) for c in pki.values()))


def peer(pki: dict[str, CertInfo], name: str, transport: str = "https") -> PeerIdentity:
    return PeerIdentity(pki[name].spki_sha256, pki[name].subject, transport)


def facts(*supplier_ids: str, doc_type: DocumentType = DocumentType.UBL_INVOICE,
          agents: tuple[tuple[str, str], ...] = ()) -> InvoiceFacts:
    return InvoiceFacts(doc_type, "INV-1", "2.1", tuple(supplier_ids), ("0088:4000002000005",), "", "", "2026-11-02",
                        agent_ids=agents)


# --- identifying a peer ----------------------------------------------------------------------------


def test_a_peer_is_found_by_its_certificate_key(directory: PartnerDirectory, pki: dict[str, CertInfo]):
    assert directory.gate(peer(pki, "acme-client"), START).name == "acme"
    assert directory.gate(peer(pki, "beta-client")).name == "beta"  # without a moment: now
    # The subject is for logs only: beta's key presented under acme's name is still beta.
    disguised = PeerIdentity(pki["beta-client"].spki_sha256, pki["acme-client"].subject, "https")
    assert directory.gate(disguised).name == "beta"
    assert directory.get("acme") is directory.gate(peer(pki, "acme-client"), START)
    assert directory.get("nobody") is None


@pytest.mark.parametrize("name", ["acme-smime", "acme-signing"])
def test_a_key_registered_for_another_role_is_not_a_client(directory: PartnerDirectory, pki: dict[str, CertInfo], name: str):
    with pytest.raises(Forbidden) as caught:
        directory.gate(peer(pki, name))
    exc = caught.value
    assert (exc.code, exc.http_status) == ("PARTNER_UNKNOWN", 403)
    assert exc.message == ("your client certificate is not registered for any trading partner of this gateway "
                           f"(certificate key SHA-256 {pki[name].spki_sha256}); ask the operator to register it")


def test_e_mail_is_identified_by_the_smime_signers_key(directory: PartnerDirectory, pki: dict[str, CertInfo]):
    assert directory.by_smime_spki == {pki["acme-smime"].spki_sha256: directory.get("acme")}
    assert pki["acme-client"].spki_sha256 not in directory.by_smime_spki
    acme = directory.by_smime_spki[pki["acme-smime"].spki_sha256]
    assert acme.emails == ("billing@acme.example",)
    admit(acme, pki["acme-smime"].spki_sha256, START, "smime")  # no window in that role: accepted


@pytest.mark.parametrize(("status", "code", "says"), [
    (PartnerStatus.PENDING, "PARTNER_PENDING", "trading partner 'beta' is registered but not activated yet (its certificate "
                                               "fingerprint is being confirmed); contact the operator"),
    (PartnerStatus.SUSPENDED, "PARTNER_SUSPENDED", "trading partner 'beta' is suspended; contact the operator"),
])
def test_only_an_active_partner_is_admitted(pki: dict[str, CertInfo], beta: Partner, status: PartnerStatus, code: str,
                                           says: str):
    stopped = dataclasses.replace(beta, status=status)
    directory = PartnerDirectory.build([stopped], dict((c.spki_sha256, c) for c in pki.values()))
    for refuse in (lambda: directory.gate(peer(pki, "beta-client")),
                   lambda: admit(stopped, pki["beta-client"].spki_sha256, START, "smime")):
        with pytest.raises(Forbidden) as caught:
            refuse()
        assert (caught.value.code, caught.value.message) == (code, says)


@pytest.mark.parametrize(("cert", "at", "why"), [
    ("acme-client-new", START - SECOND, "is registered from 2027-01-01T00:00:00Z on (a certificate rollover) and is not accepted yet"),
    ("acme-client", END, "was retired at 2027-02-01T00:00:00Z (a certificate rollover); use the newer certificate"),
])
def test_a_client_certificate_outside_its_window_is_refused(directory: PartnerDirectory, pki: dict[str, CertInfo], cert: str,
                                                            at: datetime, why: str):
    with pytest.raises(Forbidden) as caught:
        directory.gate(peer(pki, cert), at)
    assert caught.value.code == "CERTIFICATE_NOT_ACTIVE"
    assert caught.value.message == f"the certificate (key SHA-256 {pki[cert].spki_sha256}) of trading partner 'acme' {why}"


def test_inside_the_window_both_certificates_of_a_rollover_are_accepted(directory: PartnerDirectory, pki: dict[str, CertInfo]):
    for at in (START, END - SECOND):
        assert directory.gate(peer(pki, "acme-client-new"), at).name == "acme"
        assert directory.gate(peer(pki, "acme-client"), at).name == "acme"
    assert directory.gate(peer(pki, "acme-client-new"), END + timedelta(days=365)).name == "acme"  # no end: open


def test_a_window_applies_to_its_own_role_only(pki: dict[str, CertInfo], beta: Partner):
    # The same key registered as client and signing certificate, retired as a signing certificate only.
    key = pki["beta-client"].spki_sha256
    both = dataclasses.replace(beta, signing_spki=frozenset({key}), windows=(CertWindow("signing", "beta-client.crt", key, end=START),))
    directory = PartnerDirectory.build([both], {key: pki["beta-client"]})
    assert directory.gate(peer(pki, "beta-client"), END).name == "beta"
    assert directory.signers_for("beta", END) == []
    assert [s.spki for s in directory.signers_for("beta", START - SECOND)] == [key]


def test_the_signing_certificates_accepted_at_a_moment(directory: PartnerDirectory, pki: dict[str, CertInfo]):
    before, after = START - SECOND, START
    assert {s.spki for s in directory.signers_for("acme", before)} == spki(pki, "acme-signing", "acme-signing-old")
    assert [s.spki for s in directory.signers_for("acme", after)] == [pki["acme-signing"].spki_sha256]
    (signer,) = directory.signers_for("acme", after)
    assert signer.cert == pki["acme-signing"].cert
    assert directory.signers_for("nobody") == []


def test_a_signing_key_without_its_certificate_is_left_out(pki: dict[str, CertInfo], beta: Partner):
    directory = PartnerDirectory.build([beta], {pki["beta-client"].spki_sha256: pki["beta-client"]})
    assert beta.signing_spki and directory.signers_for("beta") == []


# --- the supplier inside the invoice ------------------------------------------------------------------


def test_an_invoice_naming_one_of_the_partners_identifiers_is_authorized(directory: PartnerDirectory):
    acme = directory.get("acme")
    assert acme is not None
    directory.authorize(acme, facts("DE123456789"))
    directory.authorize(acme, facts("9930:unregistered-anywhere", "0088:4000001000006"))  # others may appear beside it
    directory.authorize(acme, facts("DE123456789", doc_type=DocumentType.CII_INVOICE))


def test_an_identifier_of_another_partner_is_refused_even_beside_an_own_one(directory: PartnerDirectory):
    acme = directory.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        directory.authorize(acme, facts("0088:4000001000006", "0088:7300010000001"))
    exc = caught.value
    assert (exc.code, exc.message) == ("SUPPLIER_NOT_AUTHORIZED", "the invoice names identifiers that belong to another trading partner")
    assert [d.as_json() for d in exc.details] == [{"message": "supplier identifier '0088:7300010000001' is registered to "
                                                   "another partner", "path": "/*/cac:AccountingSupplierParty/cac:Party"}]
    assert "beta" not in repr(exc.as_json())  # the other partner is not named to the sender


# beta's identifiers in every form a sender can write them (beta registered "0088:7300010000001" and the
# VAT number "9925:0123456789"); each names beta, so acme may not send an invoice naming it.
BETA_FORMS = ([(f"GLN {n}", identifier(*sv)) for n, sv in forms("0088", "7300010000001").items()]
              + [("GLN under scheme GLN", "GLN:7300010000001"), ("GLN without a scheme", "7300010000001"),
                 ("GLN, unknown scheme", "ZZZ:7300010000001"), ("GLN as a Peppol participant",
                                                               "iso6523-actorid-upis::0088:7300010000001")]
              + [(f"VAT {n}", identifier(*sv)) for n, sv in vat_forms("BE", "0123456789", "9925").items()])


@pytest.fixture
def with_vat(pki: dict[str, CertInfo], acme: Partner) -> PartnerDirectory:
    beta = partner("beta", pki, client=("beta-client",), ids=("0088:7300010000001", "9925:0123456789"))
    return PartnerDirectory.build([acme, beta], {})


@pytest.mark.parametrize(("form", "written"), BETA_FORMS, ids=[f for f, _ in BETA_FORMS])
@pytest.mark.parametrize("party", ["supplier", "payee", "tax representative", "seller"])
def test_another_partners_identifier_in_any_form_and_any_party_is_refused(with_vat: PartnerDirectory, form: str,
                                                                          written: str, party: str):
    acme = with_vat.get("acme")
    assert acme is not None
    invoice = (facts("0088:4000001000006", written) if party == "supplier" else
               facts("0088:4000001000006", agents=((party, written),)))
    with pytest.raises(Forbidden) as caught:
        with_vat.authorize(acme, invoice)
    exc = caught.value
    assert (exc.code, exc.http_status) == ("SUPPLIER_NOT_AUTHORIZED", 403)
    [detail] = exc.details
    assert detail.message.startswith(f"{party} identifier {written!r} ")  # what the sender wrote, as written
    assert detail.path == PARTIES[DocumentType.UBL_INVOICE.syntax][party]
    assert "beta" not in repr(exc.as_json())  # the other partner is never named to the sender


def test_a_refusal_shows_the_form_it_compared(with_vat: PartnerDirectory):
    acme = with_vat.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        with_vat.authorize(acme, facts("0088:4000001000006", "BE 0123.456.789", "0088:730\u00a0001\u200b0000001",
                                       "7300010000001"))
    assert [d.message for d in caught.value.details] == [
        "supplier identifier 'BE 0123.456.789' (compared as 'VAT:BE0123456789') is registered to another partner",
        "supplier identifier '0088:730\\xa0001\\u200b0000001' (compared as '0088:7300010000001') is registered to "
        "another partner",  # invisible characters are shown escaped
        "supplier identifier '7300010000001' names no scheme this gateway knows, and its value is that of an identifier "
        "registered to another partner; write the identifier's scheme (schemeID), or leave it out"]


@pytest.mark.parametrize("own", ["DE123456789", "DE 123 456 789", "9930:123456789", "de123456789", "0088:4000-0010-00006",
                                 "GLN:4000001000006", "０088:４０００００１０００００６"])
def test_the_partners_own_identifier_binds_in_any_form(directory: PartnerDirectory, own: str):
    acme = directory.get("acme")
    assert acme is not None
    directory.authorize(acme, facts(own))


@pytest.mark.parametrize(("supplier", "agents"), [
    (("0088:4000001000006", "0088:9999999999999", "NL999999999B01", "Godkänd för F-skatt"), ()),  # ids of no partner
    (("DE123456789",), (("payee", "0088:9999999999999"), ("tax representative", "FR12345678901"))),  # a factor, a representative
    (("DE123456789",), (("payee", "0088:4000001000006"), ("seller", "DE 123456789"))),  # itself
])
def test_the_supplier_party_may_name_identifiers_of_no_partner_beside_its_own(
        directory: PartnerDirectory, supplier: tuple[str, ...], agents: tuple[tuple[str, str], ...]):
    acme = directory.get("acme")
    assert acme is not None
    directory.authorize(acme, facts(*supplier, agents=agents))


def test_a_payee_alone_does_not_bind(directory: PartnerDirectory):
    """The parties acting for the seller are only checked against other partners: the partner's own
    identifier must be in the supplier party."""
    acme = directory.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        directory.authorize(acme, facts("0088:9999999999999", agents=(("payee", "0088:4000001000006"),)))
    assert caught.value.message == "none of the supplier identifiers in the invoice is registered for partner 'acme'"


def test_cii_parties_are_named_by_their_cii_paths(with_vat: PartnerDirectory):
    acme = with_vat.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        with_vat.authorize(acme, facts("DE123456789", doc_type=DocumentType.CII_INVOICE,
                                       agents=(("payee", "BE0123456789"), ("invoicer", "0088:7300010000001"))))
    assert [d.path for d in caught.value.details] == [
        "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeSettlement/ram:PayeeTradeParty",
        "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeSettlement/ram:InvoicerTradeParty"]


@pytest.mark.parametrize(("doc_type", "path"), [
    (DocumentType.UBL_INVOICE, "/*/cac:AccountingSupplierParty/cac:Party"),
    (DocumentType.CII_INVOICE, "/rsm:CrossIndustryInvoice/rsm:SupplyChainTradeTransaction/ram:ApplicableHeaderTradeAgreement/"
                               "ram:SellerTradeParty"),
])
def test_an_invoice_naming_none_of_the_partners_identifiers(directory: PartnerDirectory, doc_type: DocumentType, path: str):
    acme = directory.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        directory.authorize(acme, facts("0088:1", "NL1", doc_type=doc_type))
    exc = caught.value
    assert (exc.code, exc.message) == ("SUPPLIER_NOT_AUTHORIZED",
                                       "none of the supplier identifiers in the invoice is registered for partner 'acme'")
    assert [d.as_json() for d in exc.details] == [
        {"message": "found '0088:1'", "path": path}, {"message": "found 'NL1'", "path": path},
        {"message": "registered: 0088:4000001000006, DE123456789"}]


@pytest.mark.parametrize(("doc_type", "names"), [
    (DocumentType.UBL_CREDIT_NOTE, "the invoice names no supplier identifier (cac:AccountingSupplierParty/cac:Party: cbc:EndpointID"),
    (DocumentType.CII_INVOICE, "the invoice names no seller identifier (ram:SellerTradeParty: ram:ID, ram:GlobalID"),
])
def test_an_invoice_naming_no_supplier_says_where_to_name_it(directory: PartnerDirectory, doc_type: DocumentType, names: str):
    acme = directory.get("acme")
    assert acme is not None
    with pytest.raises(Forbidden) as caught:
        directory.authorize(acme, facts(doc_type=doc_type))
    assert caught.value.code == "SUPPLIER_NOT_IDENTIFIED"
    assert caught.value.message.startswith(names)


# --- building the directory ---------------------------------------------------------------------------


@pytest.mark.parametrize(("second", "error"), [
    ({"client": ("acme-client",)}, "partners[1].client_certs: a certificate key is also registered for partner 'acme'"),
    ({"signing": ("acme-signing",)}, "partners[1].signing_certs: a signing key is also registered for partner 'acme'"),
    ({"smime": ("acme-smime",)}, "partners[1].smime_certs: an S/MIME key is also registered for partner 'acme'"),
    ({"ids": ("0088:7300010000001", "DE123456789")}, "partners[1].party_ids: 'DE123456789' is already registered for partner 'acme'"),
], ids=["client-key", "signing-key", "smime-key", "party-id"])
def test_one_key_or_identifier_for_two_partners_stops_the_load(pki: dict[str, CertInfo], acme: Partner, second: dict[str, tuple[str, ...]],
                                                                error: str):
    defaults: dict[str, tuple[str, ...]] = {"client": ("beta-client",), "ids": ("0088:7300010000001",)}
    other = partner("beta", pki, **{**defaults, **second})  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as caught:
        PartnerDirectory.build([acme, other], {})
    assert caught.value.message == error


@pytest.mark.parametrize(("again", "as_registered"), [
    ("DE 123 456 789", "DE123456789"), ("9930:123456789", "DE123456789"), ("de123456789", "DE123456789"),
    ("DE:VAT:DE123456789", "DE123456789"), ("GLN:4000001000006", "0088:4000001000006"),
    ("0088:4000.0010.0000\u20116", "0088:4000001000006"),
    ("4000001000006", "0088:4000001000006"),  # without a scheme: the value of acme's GLN
    ("ZZZ:4000001000006", "0088:4000001000006"),
])
def test_one_identifier_in_another_form_for_two_partners_stops_the_load(pki: dict[str, CertInfo], acme: Partner,
                                                                        again: str, as_registered: str):
    other = partner("beta", pki, client=("beta-client",), ids=("0088:7300010000001", again))
    with pytest.raises(ConfigError) as caught:
        PartnerDirectory.build([acme, other], {})
    assert caught.value.message == (f"partners[1].party_ids: {again!r} is already registered for partner 'acme' "
                                    f"(as {as_registered!r})")


def test_one_partner_may_register_one_identifier_in_two_forms(pki: dict[str, CertInfo]):
    both = partner("acme", pki, client=("acme-client",), ids=("DE123456789", "9930:DE 123 456 789", "4000001000006",
                                                              "0088:4000001000006"))
    directory = PartnerDirectory.build([both], {})
    assert directory.owners.owner("de123456789") == "acme"


def test_the_directory_lists_every_partner_and_identifier(directory: PartnerDirectory, pki: dict[str, CertInfo]):
    assert [p.name for p in directory.partners] == ["acme", "beta"]
    assert dict(directory.owners) == {"0088:4000001000006": "acme", "VAT:DE123456789": "acme", "0088:7300010000001": "beta"}
    assert {k: p.name for k, p in directory.by_spki.items()} == {
        pki["acme-client"].spki_sha256: "acme", pki["acme-client-new"].spki_sha256: "acme", pki["beta-client"].spki_sha256: "beta"}


# --- hostile identifiers: only the gateway's own errors come out -------------------------------------------

XML_TEXT = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00\ufffe\uffff",
                                 max_codepoint=0x10FFFF).filter(lambda c: c in "\t\n\r" or ord(c) >= 0x20), max_size=40)
PARTY = st.sampled_from(["payee", "tax representative", "seller", "invoicer"])


def test_hostile_identifiers_raise_only_the_gateways_own_errors(with_vat: PartnerDirectory):
    """Any identifier text, in any party, through the UBL reader and ``authorize``: a pass or a Forbidden,
    never another exception (the fuzz contract, extended to the identifier checks)."""
    acme = with_vat.get("acme")
    assert acme is not None

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(XML_TEXT, max_size=4), st.lists(st.tuples(PARTY, XML_TEXT), max_size=3),
           st.sampled_from(list(DocumentType)))
    def run(ids: list[str], agents: list[tuple[str, str]], doc_type: DocumentType) -> None:
        for invoice in (facts(*ids, doc_type=doc_type, agents=tuple(agents)),
                        ubl.read_facts(etree.fromstring(naming("FUZZ-1", ids[0] if ids else "", agents[0][1] if agents
                                                               else "x", "PartyLegalEntity")), DocumentType.UBL_INVOICE, "2.1")):
            try:
                with_vat.authorize(acme, invoice)
            except Forbidden as exc:
                assert exc.code in ("SUPPLIER_NOT_AUTHORIZED", "SUPPLIER_NOT_IDENTIFIED")
                assert "beta" not in repr(exc.as_json())

    run()
