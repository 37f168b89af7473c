"""The partner allowlist: who may send, with which certificates, for which supplier identifiers.

Partners live in their own TOML file (``[partners] file``), which the ``partners`` commands edit
atomically and the daemon re-reads when it changes, so changes take effect without a restart.
A file that fails to load keeps the previous allowlist in force (and says why in the log).
"""

from __future__ import annotations

import fcntl
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import tomli_w

from ..config.reader import Reader
from ..errors import ConfigError, Detail, Forbidden
from ..files import atomic_write
from ..identifiers import parse_email, parse_party_id
from ..model import CertWindow, InvoiceFacts, Partner, PartnerStatus, PeerIdentity, SignaturePolicy, Syntax
from ..stages.signature import TrustedSigner
from ..tls import CertInfo, cert_sha256, encryptable, inspect_certificate, inspect_smime_certificate

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PURPOSES = {"client": "client_certs", "signing": "signing_certs", "smime": "smime_certs"}  # purpose → Partner field
PURPOSE_OF = {field: purpose for purpose, field in PURPOSES.items()}
OPTION = {"client": "--client-cert", "signing": "--signing-cert", "smime": "--smime-cert"}  # purpose → CLI option


def parse_ceiling(text: str, where: str) -> tuple[str, Decimal]:
    """``EUR:50000``: invoices over this payable amount, or in a currency with no ceiling, are held."""
    currency, _, value = text.partition(":")
    try:
        amount = Decimal(value)
    except InvalidOperation:
        amount = Decimal(-1)
    if not re.fullmatch(r"[A-Z]{3}", currency) or not amount.is_finite() or amount < 0:
        raise ConfigError(f"{where}: {text!r} is not a ceiling; write CURRENCY:AMOUNT, e.g. EUR:50000")
    return currency, amount


def parse_endpoint(url: str, where: str) -> str:
    """Where the partner receives invoices: an https:// URL (another einvoice-gateway: …/v1/invoices),
    or mailto:ADDRESS (S/MIME e-mail, encrypted to the partner's S/MIME certificate)."""
    if url.startswith("mailto:"):
        return "mailto:" + parse_email(url.removeprefix("mailto:"), where)
    if not re.fullmatch(r"https://[^/\s?#@]+(/[^\s#]*)?", url):
        raise ConfigError(f"{where}: {url!r} is neither an https:// URL (e.g. https://gateway.partner.example/v1/invoices) "
                          "nor mailto:ADDRESS")
    return url


def parse_instant(text: str, where: str) -> datetime:
    """A moment in UTC: ``2027-01-31`` (midnight UTC) or ``2027-01-31T12:00:00Z``."""
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            return datetime.fromisoformat(text).replace(tzinfo=UTC)
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?Z", text):
            return datetime.fromisoformat(text.removesuffix("Z")).replace(tzinfo=UTC)
    except ValueError:
        pass
    raise ConfigError(f"{where}: {text!r} is not a date; write 2027-01-31 (midnight UTC) or 2027-01-31T12:00:00Z")


def instant_text(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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


# --- the partners file -------------------------------------------------------------------------


def _cert_files(r: Reader, name: str) -> list[tuple[Path, datetime | None, datetime | None]]:
    """``["a.crt", {file = "b.crt", from = "2027-01-01", until = "2027-02-01"}]``: a path, or a path with
    the window in which the certificate is accepted (a rollover)."""
    out: list[tuple[Path, datetime | None, datetime | None]] = []
    for i, item in enumerate(r.entries(name)):
        if isinstance(item, str):
            out.append((r.file(name, item, i), None, None))
            continue
        path = item.file("file")
        start = parse_instant(item.string("from"), item.key("from")) if item.has("from") else None
        end = parse_instant(item.string("until"), item.key("until")) if item.has("until") else None
        item.done()
        if start is not None and end is not None and end <= start:
            raise ConfigError(f"{item.key('until')}: must be later than {item.key('from')}")
        out.append((path, start, end))
    return out


def _load_partner(r: Reader, certs: dict[str, CertInfo]) -> Partner:
    name = r.string("name", required=True)
    if not NAME.match(name):
        raise ConfigError(f"{r.key('name')}: {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    status_text = r.choice("status", tuple(s.value for s in PartnerStatus), "active")
    windows: list[CertWindow] = []

    def load(key: str, inspect: Callable[[Path, str], CertInfo]) -> list[tuple[str, str]]:
        found = []
        for i, (path, start, end) in enumerate(_cert_files(r, key)):
            info = inspect(path, f"{r.key(key)}[{i}]")
            certs[info.spki_sha256] = info
            found.append((str(path), info.spki_sha256))
            if start is not None or end is not None:
                windows.append(CertWindow(PURPOSE_OF[key], str(path), info.spki_sha256, start, end))
        return found

    client = load("client_certs", inspect_certificate)
    ids = [parse_party_id(v, f"{r.key('party_ids')}[{i}]") for i, v in enumerate(r.str_list("party_ids", required=True))]
    if not ids:
        raise ConfigError(f"{r.key('party_ids')}: a partner needs at least one party identifier")
    signing = load("signing_certs", inspect_certificate)
    policy = r.choice("signature_policy", tuple(s.value for s in SignaturePolicy), SignaturePolicy.IF_PRESENT.value)
    rules = tuple(r.str_list("rules")) if r.has("rules") else None
    ceilings = tuple(parse_ceiling(v, f"{r.key('amount_ceilings')}[{i}]") for i, v in enumerate(r.str_list("amount_ceilings")))
    if policy == SignaturePolicy.REQUIRED.value and not signing:
        raise ConfigError(f"{r.key('signature_policy')}: 'required' needs at least one entry in signing_certs")
    emails = [parse_email(e, f"{r.key('emails')}[{i}]") for i, e in enumerate(r.str_list("emails"))]
    smime = load("smime_certs", inspect_smime_certificate)
    if not client and not smime:
        raise ConfigError(f"{r.key('client_certs')}: a partner needs a client certificate (HTTPS) or an S/MIME certificate "
                          "(smime_certs, e-mail) that identifies it")
    endpoint = parse_endpoint(r.string("endpoint", ""), r.key("endpoint")) if r.has("endpoint") else ""
    if endpoint.startswith("mailto:") and not any(encryptable(certs[s].cert) for _, s in smime):
        raise ConfigError(f"{r.key('endpoint')}: invoices sent by e-mail are encrypted to the partner's S/MIME certificate; "
                          "register one with an RSA key (--smime-cert)")
    partner = Partner(
        name=name,
        status=PartnerStatus(status_text),
        verified_by=r.string("verified_by", required=True),
        verified_at=r.string("verified_at", required=True),
        client_spki=frozenset(s for _, s in client),
        client_certs=tuple(p for p, _ in client),
        party_ids=frozenset(ids),
        emails=tuple(emails),
        signature_policy=SignaturePolicy(policy),
        signing_certs=tuple(p for p, _ in signing),
        signing_spki=frozenset(s for _, s in signing),
        rules=rules,
        amount_ceilings=ceilings,
        endpoint=endpoint,
        sign_outbound=r.boolean("sign_outbound", False),
        smime_certs=tuple(p for p, _ in smime),
        smime_spki=frozenset(s for _, s in smime),
        smime_signed_only=r.boolean("smime_signed_only", False),
        windows=tuple(windows),
    )
    r.done()
    return partner


def load_directory(path: Path) -> PartnerDirectory:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"partners.file: cannot read {path} ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"partners.file: {path} is not valid TOML ({exc})") from None
    top = Reader(raw, "", path.parent)
    certs: dict[str, CertInfo] = {}
    partners = [_load_partner(r, certs) for r in top.tables("partners")]
    top.done()
    names = [p.name for p in partners]
    for i, n in enumerate(names):
        if names.index(n) != i:
            raise ConfigError(f"partners[{i}].name: duplicate partner name {n!r}")
    return PartnerDirectory.build(partners, certs)


class PartnerBook:
    """Holds the current directory and re-reads the file when it changes."""

    def __init__(self, path: Path):
        self.path = path
        self._stamp = self._stat()
        self.current = load_directory(path)

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def refresh(self, force: bool = False) -> bool:
        """Reload if the file changed (or ``force``: certificates it names may have changed).  Returns
        True when a new directory took effect.

        Raises ConfigError (and keeps the old directory) when the new file is invalid.
        """
        try:
            stamp = self._stat()
        except OSError as exc:
            raise ConfigError(f"partners.file: cannot stat {self.path} ({exc})") from None
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp  # (a bad file is reported once, not at every look)
        self.current = load_directory(self.path)
        return True


# --- editing (the `partners` commands) ------------------------------------------------------------


def _as_toml(p: Partner, base: Path) -> dict[str, Any]:
    def rel(x: str, purpose: str) -> Any:
        try:
            shown = str(Path(x).relative_to(base))
        except ValueError:
            shown = x
        w = p.window(purpose, x)
        if w is None:
            return shown
        return {"file": shown, **({"from": instant_text(w.start)} if w.start else {}),
                **({"until": instant_text(w.end)} if w.end else {})}

    return {
        "name": p.name,
        "status": p.status.value,
        "verified_by": p.verified_by,
        "verified_at": p.verified_at,
        "client_certs": [rel(c, "client") for c in p.client_certs],
        "party_ids": sorted(p.party_ids),
        "emails": list(p.emails),
        "signature_policy": p.signature_policy.value,
        "signing_certs": [rel(c, "signing") for c in p.signing_certs],
        **({"rules": list(p.rules)} if p.rules is not None else {}),
        "amount_ceilings": [f"{c}:{v}" for c, v in p.amount_ceilings],
        **({"endpoint": p.endpoint} if p.endpoint else {}),
        **({"sign_outbound": True} if p.sign_outbound else {}),
        **({"smime_certs": [rel(c, "smime") for c in p.smime_certs]} if p.smime_certs else {}),
        **({"smime_signed_only": True} if p.smime_signed_only else {}),
    }


@contextmanager
def editing(path: Path) -> Iterator[list[Partner]]:
    """Lock the partners file, yield its partners for editing, then write it back atomically."""
    lock_path = path.with_name(path.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        partners = list(load_directory(path).partners)
        yield partners
        text = "# Trading partners of this gateway; edit with `einvoice-gateway partners …`.\n"
        text += tomli_w.dumps({"partners": [_as_toml(p, path.parent) for p in partners]})
        check = path.with_name(f".{path.name}.check")
        check.write_text(text, encoding="utf-8")
        try:
            load_directory(check)  # refuse a result the daemon would refuse
        finally:
            check.unlink()
        atomic_write(path, text.encode())


def certificates_of(p: Partner) -> list[tuple[str, str, CertInfo]]:
    """(purpose, path, certificate) of every certificate the partner has registered."""
    out = []
    for purpose, field in PURPOSES.items():
        out += [(purpose, path, inspect_as(purpose, Path(path), field)) for path in getattr(p, field)]
    return out


def inspect_as(purpose: str, source: Path | bytes, where: str) -> CertInfo:
    """A certificate checked for its purpose: an S/MIME one must also be usable for e-mail."""
    return (inspect_smime_certificate if purpose == "smime" else inspect_certificate)(source, where)


def fingerprint_matches(info: CertInfo, given: str) -> bool:
    """Whether ``given`` (read out by the partner over another channel) is this certificate's SHA-256
    fingerprint or its key's SHA-256, in full; colons, spaces and case do not matter."""
    text = re.sub(r"[\s:]", "", given).lower()
    return len(text) == 64 and text in (cert_sha256(info.cert), info.spki_sha256)


def rollover(p: Partner, added: list[tuple[str, str, str]], start: datetime | None = None,
             retire: dict[str, datetime] | None = None, remove: frozenset[str] = frozenset()) -> Partner:
    """The partner with certificates ``added`` ((purpose, stored path, key SHA-256)), accepted from
    ``start``; the certificates whose key is in ``retire`` accepted until the given moment (the overlap
    of a rollover); those in ``remove`` gone at once."""
    retire = retire or {}
    current = certificates_of(p)
    unknown = (set(retire) | remove) - {info.spki_sha256 for _, _, info in current}
    if unknown:
        raise ConfigError(f"partner {p.name!r} has no certificate with key SHA-256 {sorted(unknown)[0]}")
    windows = {(w.purpose, w.path): w for w in p.windows}
    lists: dict[str, list[str]] = {purpose: [] for purpose in PURPOSES}
    for purpose, path, info in current:
        if info.spki_sha256 in remove:
            windows.pop((purpose, path), None)
            continue
        lists[purpose].append(path)
        if info.spki_sha256 in retire:
            old = windows.get((purpose, path))
            end = retire[info.spki_sha256]
            if old is not None and old.start is not None and end <= old.start:
                raise ConfigError(f"the retirement ({instant_text(end)}) must come after the certificate's start "
                                  f"({instant_text(old.start)})")
            windows[purpose, path] = CertWindow(purpose, path, info.spki_sha256, old.start if old else None, end)
    for purpose, path, spki in added:
        if any(info.spki_sha256 == spki for pu, _, info in current if pu == purpose) and path not in lists[purpose]:
            raise ConfigError(f"a {purpose} certificate with this key (SHA-256 {spki}) is registered for {p.name!r} "
                              "already; the gateway identifies partners by key, so a renewal on the same key needs no change")
        if path in lists[purpose]:
            raise ConfigError(f"this {purpose} certificate (key SHA-256 {spki}) is registered for {p.name!r} already")
        lists[purpose].append(path)
        if start is not None:
            windows[purpose, path] = CertWindow(purpose, path, spki, start, None)
    kept = {(purpose, path) for purpose, paths in lists.items() for path in paths}
    return replace(p, client_certs=tuple(lists["client"]), signing_certs=tuple(lists["signing"]),
                   smime_certs=tuple(lists["smime"]), windows=tuple(w for key, w in windows.items() if key in kept))


def unconfirmed(certs: list[CertInfo], fingerprints: list[str]) -> list[str]:
    """What is wrong with the fingerprints confirmed out of band for ``certs``: each given one must be
    one of the certificates', and every certificate must have one.  Empty: all confirmed."""
    problems = [f"{f.strip()!r} is not the fingerprint of any of these certificates"
                for f in fingerprints if f.strip() and not any(fingerprint_matches(c, f) for c in certs)]
    problems += [f"the fingerprint of {c.subject} (key SHA-256 {c.spki_sha256[:16]}…) was not confirmed"
                 for c in certs if not any(fingerprint_matches(c, f) for f in fingerprints)]
    return problems


def activated(p: Partner, fingerprints: list[str], by: str) -> Partner:
    """A pending partner made active, once every certificate's fingerprint is confirmed out of band."""
    if p.status is not PartnerStatus.PENDING:
        raise ConfigError(f"partner {p.name!r} is {p.status.value}, not pending activation")
    problems = unconfirmed([info for _, _, info in certificates_of(p)], fingerprints)
    if problems:
        raise ConfigError("activation refused: " + "; ".join(problems))
    return replace(p, status=PartnerStatus.ACTIVE, verified_by=by, verified_at=instant_text(datetime.now(UTC)))


def new_partner(name: str, cert_paths: list[str], party_ids: list[str], emails: list[str], verified_by: str,
                signing_certs: list[str] | None = None, policy: SignaturePolicy = SignaturePolicy.IF_PRESENT) -> Partner:
    return Partner(
        name=name,
        status=PartnerStatus.ACTIVE,
        verified_by=verified_by,
        verified_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        client_spki=frozenset(),
        client_certs=tuple(cert_paths),
        party_ids=frozenset(party_ids),
        emails=tuple(emails),
        signature_policy=policy,
        signing_certs=tuple(signing_certs or ()),
    )


def with_status(p: Partner, status: PartnerStatus) -> Partner:
    return replace(p, status=status)
