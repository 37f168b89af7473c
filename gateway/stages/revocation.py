"""Revocation of partner client certificates, checked against CRL files the operator keeps current.

The gateway fetches nothing: a cron job or the CA's own tooling drops CRL files (PEM or DER) where
``revocation.crls`` points, and :meth:`Revocation.refresh` picks up a replaced file.  Every CRL is
checked once, when it is read: it must be issued *and* signed by one of the partner CAs (the CA's
subject equals the CRL issuer and the CA's key verifies the signature), not with SHA-1 or MD5, be
complete (no delta CRL, no scope-limited issuing distribution point) and carry a nextUpdate.  A file
that fails is refused with a :class:`ConfigError`; on a refresh the CRLs already loaded stay in use.

:meth:`Revocation.check` fails closed by default: no CRL for the certificate's issuer, or a stale
one, raises :class:`RevocationUnknown`.  ``soft_fail`` (which :meth:`Revocation.warnings` reports
as a weakening) turns that into the return value ``"unknown"``, for the caller to log.  A listed
serial always raises :class:`CertificateRevoked`, even from a stale CRL.

A self-signed certificate passed without an issuer is reported as ``"pinned"`` and needs no CRL:
nobody but its holder can revoke it, so the caller must accept such a certificate only because its
key is pinned in the partner registry, and withdraw it there.  Without CRL files, checking is off.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.x509.oid import ExtensionOID

from ..errors import ConfigError, Forbidden, Transient

Status = Literal["good", "unknown", "pinned", "off"]

MAX_CRL_BYTES = 64 * 1024 * 1024  # a CRL of a million entries is ~40 MB; anything bigger is not a CRL we want in memory
_WEAK_HASHES = frozenset({"sha1", "md5"})
_CRYPTO_ERRORS = (ValueError, TypeError, UnsupportedAlgorithm, InvalidSignature,
                  x509.InvalidVersion, x509.DuplicateExtension, x509.UnsupportedGeneralNameType)


class CertificateRevoked(Forbidden):
    """The peer certificate's serial is on its issuer's CRL."""

    code = "CERT_REVOKED"


class RevocationUnknown(Transient):
    """The peer certificate's revocation status cannot be established (no CRL, or a stale one): the
    operator must refresh a CRL, so the partner is told to retry (503), and nothing is stored.

    ``reason`` is for the operator's log; the message the partner sees names no file or path.
    """

    code = "REVOCATION_UNKNOWN"

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RevocationPolicy:
    """The ``[revocation]`` settings."""

    crl_files: tuple[Path, ...]
    """CRL files, PEM or DER, one issuer each; an empty tuple turns revocation checking off."""
    soft_fail: bool = False
    """Accept a certificate whose status is unknown (no CRL for its issuer, stale CRL) instead of refusing it.
    A weakening: reported by :meth:`Revocation.warnings`.  A revoked certificate is refused either way."""
    max_age_s: float | None = None
    """Also treat a CRL as stale once this many seconds have passed since its thisUpdate (``None``: only nextUpdate counts)."""

    def __post_init__(self) -> None:
        if self.max_age_s is not None and not (math.isfinite(self.max_age_s) and self.max_age_s > 0):
            raise ConfigError(f"revocation.max_age_s: must be a positive number of seconds, not {self.max_age_s!r}")


@dataclass(frozen=True, slots=True)
class _Loaded:
    index: int
    path: Path
    stamp: tuple[int, int, int]  # (inode, size, mtime_ns) of the file read
    crl: x509.CertificateRevocationList
    signers: frozenset[x509.Certificate]  # the partner CAs whose key verifies this CRL
    serials: frozenset[int]  # cryptography's lookup by serial is a linear scan (4 ms at 100 000 entries)

    @property
    def where(self) -> str:
        return f"revocation.crls[{self.index}]"


def find_issuer(cert: x509.Certificate, cas: list[x509.Certificate]) -> x509.Certificate | None:
    """The CA in ``cas`` that issued ``cert``: its subject is cert's issuer and its key verifies cert's signature."""
    for ca in cas:
        if ca.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except _CRYPTO_ERRORS:
            continue
        return ca
    return None


def _self_signed(cert: x509.Certificate) -> bool:
    return cert.issuer == cert.subject and find_issuer(cert, [cert]) is not None


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    return now if now.tzinfo is not None else now.replace(tzinfo=UTC)


def _idp(crl: x509.CertificateRevocationList) -> x509.IssuingDistributionPoint | None:
    for ext in crl.extensions:
        if isinstance(ext.value, x509.IssuingDistributionPoint):
            return ext.value
    return None


class Revocation:
    """The CRLs of the partner CAs, loaded and verified; answers whether a peer certificate is revoked.

    Safe to share between tasks: :meth:`refresh` swaps the whole state in one assignment.
    """

    def __init__(self, policy: RevocationPolicy, cas: list[x509.Certificate]) -> None:
        self.policy = policy
        self._cas = tuple(cas)
        self._state = self._index(tuple(self._load(i, p) for i, p in enumerate(policy.crl_files)))

    # -- loading ------------------------------------------------------------------------------------

    def _load(self, index: int, path: Path, previous: _Loaded | None = None) -> _Loaded:
        where = f"revocation.crls[{index}]"
        try:
            with path.open("rb") as fh:
                st = os.fstat(fh.fileno())
                data = fh.read(MAX_CRL_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_CRL_BYTES:
            raise ConfigError(f"{where}: {path} is larger than {MAX_CRL_BYTES} bytes; refusing it as a CRL")
        try:
            pem = data.lstrip().startswith(b"-----BEGIN")
            crl = x509.load_pem_x509_crl(data) if pem else x509.load_der_x509_crl(data)
            signers = self._verify(crl, where, path)
            this_update = crl.last_update_utc
            serials = frozenset(r.serial_number for r in crl)
        except ConfigError:
            raise
        except Exception as exc:  # whatever a hostile file makes the parser raise (fuzzed), it is a refused file
            raise ConfigError(f"{where}: {path} is not a readable CRL (PEM or DER): {exc}") from None
        if previous is not None and this_update < previous.crl.last_update_utc:
            raise ConfigError(f"{where}: {path} has thisUpdate {this_update.isoformat()}, older than the CRL "
                              f"already loaded ({previous.crl.last_update_utc.isoformat()}); refusing the rollback")
        return _Loaded(index, path, (st.st_ino, st.st_size, st.st_mtime_ns), crl, signers, serials)

    def _verify(self, crl: x509.CertificateRevocationList, where: str, path: Path) -> frozenset[x509.Certificate]:
        def refuse(why: str) -> ConfigError:
            return ConfigError(f"{where}: {path} {why}")

        algorithm = crl.signature_hash_algorithm
        if algorithm is not None and algorithm.name in _WEAK_HASHES:
            raise refuse(f"is signed with {algorithm.name.upper()}, which is refused; ask the CA for a CRL signed with SHA-256 or better")
        if crl.next_update_utc is None:
            raise refuse("has no nextUpdate, so when it goes stale cannot be told")
        if any(ext.oid == ExtensionOID.DELTA_CRL_INDICATOR for ext in crl.extensions):
            raise refuse("is a delta CRL; give the CA's complete CRL")
        idp = _idp(crl)
        if idp is not None and (idp.only_contains_ca_certs or idp.only_contains_attribute_certs or idp.indirect_crl
                                or idp.only_some_reasons is not None or idp.relative_name is not None):
            raise refuse("covers only part of its CA's certificates (issuing distribution point); give the complete CRL")
        issuer = crl.issuer.rfc4514_string()
        named = [ca for ca in self._cas if ca.subject == crl.issuer]
        if not named:
            raise refuse(f"is issued by {issuer!r}, which is not one of the partner CAs")
        signers: set[x509.Certificate] = set()
        for ca in named:
            try:
                usage = ca.extensions.get_extension_for_class(x509.KeyUsage).value
            except x509.ExtensionNotFound:
                usage = None
            if usage is not None and not usage.crl_sign:
                continue
            try:
                # The stubs type the key as "issuer key types"; a CA with an X25519/X448 key raises TypeError here.
                if crl.is_signature_valid(cast(Any, ca.public_key())):
                    signers.add(ca)
            except _CRYPTO_ERRORS:
                continue
        if not signers:
            raise refuse(f"is not signed by the partner CA {issuer!r} (the signature does not verify with its key, "
                         "or the CA's key usage does not allow signing CRLs)")
        return frozenset(signers)

    @staticmethod
    def _index(files: tuple[_Loaded, ...]) -> tuple[tuple[_Loaded, ...], dict[bytes, _Loaded]]:
        by_issuer: dict[bytes, _Loaded] = {}
        for entry in files:  # two files for one issuer: the newer CRL is used
            key = entry.crl.issuer.public_bytes()
            if key not in by_issuer or entry.crl.last_update_utc > by_issuer[key].crl.last_update_utc:
                by_issuer[key] = entry
        return files, by_issuer

    def refresh(self) -> bool:
        """Re-read the files whose inode, size or mtime changed; True if any CRL changed.

        Raises :class:`ConfigError` for a file that cannot be read or is refused; the CRLs in use then
        stay as they were (and the next refresh tries the file again).
        """
        files, _ = self._state
        new: list[_Loaded] = []
        changed = restamped = False
        for old in files:
            try:
                st = old.path.stat()
            except OSError as exc:
                raise ConfigError(f"{old.where}: cannot read {old.path}: {exc.strerror or exc}") from None
            if (st.st_ino, st.st_size, st.st_mtime_ns) == old.stamp:
                new.append(old)
                continue
            loaded = self._load(old.index, old.path, previous=old)
            changed = changed or loaded.crl != old.crl
            restamped = True
            new.append(loaded)
        if restamped:
            self._state = self._index(tuple(new))
        return changed

    # -- checking -----------------------------------------------------------------------------------

    def check_peer(self, cert: x509.Certificate, now: datetime | None = None) -> Status:
        """:meth:`check` for a partner's TLS certificate: a self-signed one is pinned by the partner
        allowlist (which the caller has already checked); any other is checked against its issuer's CRL."""
        return self.check(cert, None if _self_signed(cert) else find_issuer(cert, list(self._cas)), now)

    def check(self, cert: x509.Certificate, issuer: x509.Certificate | None, now: datetime | None = None) -> Status:
        """Whether ``cert`` (a peer certificate issued by ``issuer``, see :func:`find_issuer`) may be used.

        Returns ``"good"``; ``"off"`` when no CRL files are configured; ``"pinned"`` for a self-signed
        certificate passed with ``issuer=None`` (the caller vouches that it is pinned); ``"unknown"``
        (soft fail only) when its status cannot be established.  Raises :class:`CertificateRevoked`,
        or :class:`RevocationUnknown` when failing closed.
        """
        if not self.policy.crl_files:
            return "off"
        if issuer is None and _self_signed(cert):
            return "pinned"
        now = _utc(now)
        _, by_issuer = self._state
        entry = by_issuer.get(cert.issuer.public_bytes())
        if entry is None or issuer is None or issuer not in entry.signers:
            return self._unknown(cert, f"no CRL from a partner CA for issuer {cert.issuer.rfc4514_string()!r}")
        if cert.serial_number in entry.serials:
            revoked = entry.crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            when = f" on {revoked.revocation_date_utc.date().isoformat()}" if revoked is not None else ""
            raise CertificateRevoked(
                f"The client certificate with serial {cert.serial_number:#x} was revoked by its issuing CA{when}. "
                "Obtain a new certificate from your CA and register it with the gateway operator before sending again."
            )
        idp = _idp(entry.crl)
        if idp is not None and idp.full_name is not None and not self._in_scope(cert, idp.full_name):
            return self._unknown(cert, f"{entry.where}: the CRL's distribution point does not cover this certificate")
        left = self._seconds_left(entry.crl, now)
        if left < 0:
            return self._unknown(cert, f"{entry.where}: the CRL went stale {-left:.0f} s ago")
        return "good"

    @staticmethod
    def _in_scope(cert: x509.Certificate, idp_names: list[x509.GeneralName]) -> bool:
        try:
            points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        except (x509.ExtensionNotFound, *_CRYPTO_ERRORS):
            return False
        return any(p.full_name is not None and any(n in idp_names for n in p.full_name) for p in points)

    def _unknown(self, cert: x509.Certificate, reason: str) -> Status:
        if self.policy.soft_fail:
            return "unknown"
        raise RevocationUnknown(
            f"The revocation status of the client certificate with serial {cert.serial_number:#x} cannot be established "
            "now: the gateway has no current revocation list from its issuing CA. Retry later; if this persists, "
            "ask the gateway operator to update the CA's revocation list.",
            reason=reason,
        )

    def _seconds_left(self, crl: x509.CertificateRevocationList, now: datetime) -> float:
        if crl.next_update_utc is None:  # refused at load; kept for the type checker
            return -math.inf
        left = (crl.next_update_utc - now).total_seconds()
        if self.policy.max_age_s is not None:
            left = min(left, self.policy.max_age_s - (now - crl.last_update_utc).total_seconds())
        return left

    # -- reporting ----------------------------------------------------------------------------------

    def status(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """One entry per CRL file, for metrics and ``partners check``; ``in_use`` is False for an older
        CRL of an issuer that another file also covers."""
        now = _utc(now)
        files, by_issuer = self._state
        out: list[dict[str, Any]] = []
        for entry in files:
            crl = entry.crl
            out.append({
                "file": str(entry.path),
                "issuer": crl.issuer.rfc4514_string(),
                "this_update": crl.last_update_utc.isoformat(),
                "next_update": crl.next_update_utc.isoformat() if crl.next_update_utc is not None else None,
                "revoked": len(entry.serials),
                "seconds_until_stale": round(self._seconds_left(crl, now), 1),
                "in_use": by_issuer.get(crl.issuer.public_bytes()) is entry,
            })
        return out

    def warnings(self) -> list[str]:
        """Weakenings to log at start-up (like the gateway's other ``gateway.weakened`` reasons)."""
        if self.policy.crl_files and self.policy.soft_fail:
            return ["revocation.soft_fail is on: a partner certificate whose revocation status is unknown "
                    "(no CRL for its CA, or a stale CRL) is accepted"]
        return []
