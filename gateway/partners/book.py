"""The partners file: reading it into a directory, re-reading it when it changes, writing it back.

Partners live in their own TOML file (``[partners] file``), which the ``partners`` commands and the
console edit atomically (under a lock) and the daemon re-reads when it changes, so changes take
effect without a restart.  A file that fails to load keeps the previous allowlist in force (and
says why in the log).
"""

from __future__ import annotations

import fcntl
import re
import tomllib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import tomli_w

from ..config.reader import Reader
from ..errors import ConfigError
from ..files import atomic_write
from ..identifiers import parse_email, parse_party_id
from ..model import CertWindow, Partner, PartnerStatus, SignaturePolicy
from ..tls import CertInfo, encryptable, inspect_certificate, inspect_smime_certificate
from .directory import PartnerDirectory

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
PURPOSES = {"client": "client_certs", "signing": "signing_certs", "smime": "smime_certs"}  # purpose → Partner field
PURPOSE_OF = {field: purpose for purpose, field in PURPOSES.items()}


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


# --- writing it back ---------------------------------------------------------------------------


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
