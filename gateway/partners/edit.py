"""Changing partners: registering one, certificates and their rollover windows, activation, status.

What the ``partners`` commands and the console's partner pages do to the partners file, each under
its lock (``book.editing``), storing the certificates they are given beside it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from ..errors import ConfigError
from ..files import atomic_write
from ..model import CertWindow, Partner, PartnerStatus, SignaturePolicy
from ..tls import CertInfo, cert_sha256, inspect_certificate, inspect_smime_certificate
from .book import PURPOSES, editing, instant_text

OPTION = {"client": "--client-cert", "signing": "--signing-cert", "smime": "--smime-cert"}  # purpose → CLI option


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


def store_certificate(partners_file: Path, name: str, cert: Path | bytes, option: str = "--client-cert") -> tuple[Path, bool]:
    """Copy a partner certificate next to the partners file, named by partner, purpose and key hash.
    Returns the path and whether the file is new."""
    info = inspect_as("smime" if option == OPTION["smime"] else "client", cert, option)
    folder = partners_file.parent / "partner-certs"
    folder.mkdir(mode=0o755, exist_ok=True)
    kind = {"--signing-cert": "-signing", "--smime-cert": "-smime"}.get(option, "")
    stored = folder / f"{name}{kind}-{info.spki_sha256[:16]}.crt"
    if stored.exists() and stored.read_bytes() != info.pem:  # another certificate on the same key (a renewal):
        stored = stored.with_name(f"{stored.stem}-{cert_sha256(info.cert)[:8]}.crt")  # never overwrite the registered one
    if stored.exists():
        return stored, False
    atomic_write(stored, info.pem, mode=0o644)
    return stored, True


def register_partner(partners_file: Path, name: str, certs: Sequence[Path | bytes], party_ids: list[str], emails: list[str],
                     verified_by: str, signing_certs: Sequence[Path | bytes] | None = None,
                     policy: SignaturePolicy = SignaturePolicy.IF_PRESENT, *, rules: tuple[str, ...] | None = None,
                     ceilings: tuple[tuple[str, Decimal], ...] = (), endpoint: str = "", sign_outbound: bool = False,
                     smime_certs: Sequence[Path | bytes] | None = None, smime_signed_only: bool = False,
                     pending: bool = False) -> None:
    """The `partners add` command: store the certificates and add the partner, atomically.  A
    ``pending`` partner (added in the console) sends nothing until it is activated."""
    def add(partners: list[Partner], store: Callable[[Path | bytes, str], str]) -> None:
        if any(p.name == name for p in partners):
            raise ConfigError(f"partners: a partner named {name!r} exists already (use a new name, or remove it first)")
        partner = new_partner(name, [store(c, "--client-cert") for c in certs], party_ids, emails, verified_by,
                              [store(c, "--signing-cert") for c in signing_certs or []], policy)
        partners.append(dataclasses.replace(partner, rules=rules, amount_ceilings=ceilings, endpoint=endpoint,
                                            sign_outbound=sign_outbound, smime_signed_only=smime_signed_only,
                                            smime_certs=tuple(store(c, "--smime-cert") for c in smime_certs or [])))
        if pending:
            partners[-1] = dataclasses.replace(partners[-1], status=PartnerStatus.PENDING, verified_by="", verified_at="")

    edit_partners(partners_file, name, add)


def edit_partners(partners_file: Path, name: str,
                  change: Callable[[list[Partner], Callable[[Path | bytes, str], str]], None]) -> None:
    """Apply `change` to the partner list under the file lock; `change` stores certificates through the
    callable it is given, and a refused edit leaves no stray certificate behind."""
    created: list[Path] = []

    def store(cert: Path | bytes, option: str) -> str:
        target, new = store_certificate(partners_file, name, cert, option)
        if new:
            created.append(target)
        return str(target)

    try:
        with editing(partners_file) as partners:
            change(partners, store)
    except BaseException:
        for path in created:
            path.unlink(missing_ok=True)
        raise
