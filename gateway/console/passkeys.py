"""Passkeys (WebAuthn) for the admin console: the two ceremonies, with no I/O.

This module is a thin, strict wrapper around py_webauthn (the ``webauthn`` package).  The web layer
keeps the state (the pending challenge in the pre-login or login session, the stored credentials in
the user store); this module only builds the options the browser needs and verifies what comes back.

Design decisions, each one enforced here rather than left to the caller:

* **User verification is required** in both ceremonies: the options ask for it
  (``userVerification: "required"``) and the verification refuses a response whose authenticator
  data lacks the UV flag (``require_user_verification=True``), then checks the library's
  ``user_verified`` result once more.  A passkey is then a second factor *and* a PIN/biometric,
  so it can stand in for the TOTP step.
* **Attestation "none"**: the console does not trust or keep attestation certificates; it only
  keeps the credential id, the COSE public key, the sign count and the AAGUID (for display).
* **Algorithms ES256 (-7) and RS256 (-257) only**, both offered and enforced at registration.
  The stored key therefore never has another algorithm when it is used to verify an assertion.
* **Resident key preferred**, so the same passkey can later be offered without a user name.
* **Existing credentials are excluded** at registration (``excludeCredentials``), so one
  authenticator is not enrolled twice for an account.
* **Challenges are 32 random bytes** from :mod:`secrets`, returned to the caller to keep
  server-side; a challenge is meant to be used once (the caller drops it after one verification).
* **60 s timeout** in the options.
* **Cloned authenticators**: a sign count that does not increase (when the stored or the new one
  is non-zero) is refused.  py_webauthn refuses it already; the check is repeated here so the rule
  does not silently depend on a library default.
* **One exception type**: every failure of ``verify_*`` and :func:`credential_id_of`, whatever the
  input string (bad JSON, bad base64url, bad CBOR, unknown key types, library exceptions), surfaces
  as :class:`PasskeyError`, whose message is short, printable and safe to show to the user.  The
  original exception stays available as ``__cause__`` for the logs.

The JSON exchanged with the browser is the library's own: ``options_to_json`` output (binary
fields base64url-encoded) and the credential JSON shape that ``parse_registration_credential_json``
/ ``parse_authentication_credential_json`` accept (``id``, ``rawId``, ``type``, ``response`` with
base64url fields).  ``static/passkey.js`` produces exactly that shape.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from webauthn import (
    generate_authentication_options,
    generate_registration_options,
    options_to_json,
    verify_authentication_response,
    verify_registration_response,
)
from webauthn.helpers import bytes_to_base64url, parse_authentication_credential_json
from webauthn.helpers.cose import COSEAlgorithmIdentifier
from webauthn.helpers.exceptions import WebAuthnException
from webauthn.helpers.structs import (
    AttestationConveyancePreference,
    AuthenticatorSelectionCriteria,
    PublicKeyCredentialDescriptor,
    ResidentKeyRequirement,
    UserVerificationRequirement,
)

CHALLENGE_BYTES = 32
TIMEOUT_MS = 60_000
ALGORITHMS: tuple[COSEAlgorithmIdentifier, ...] = (
    COSEAlgorithmIdentifier.ECDSA_SHA_256,  # -7, ES256
    COSEAlgorithmIdentifier.RSASSA_PKCS1_v1_5_SHA_256,  # -257, RS256
)
MAX_RESPONSE_CHARS = 64 * 1024  # a "none" attestation or an assertion is a few hundred bytes
MAX_CREDENTIAL_ID_BYTES = 1023  # WebAuthn Level 2 §7.1 step 22 / Level 3: ids longer than this are refused
MAX_USER_HANDLE_BYTES = 64  # WebAuthn: user.id is at most 64 bytes
_MESSAGE_CHARS = 200
_PREFIX = "the passkey response did not verify"


class PasskeyError(Exception):
    """A passkey ceremony failed.  The message is safe to show to the user."""


@dataclass(frozen=True, slots=True)
class NewPasskey:
    """A verified registration: what to store for the account."""

    credential_id: bytes
    public_key: bytes = field(repr=False)  # COSE public key as returned by the library
    sign_count: int
    aaguid: str


def _challenge() -> bytes:
    return secrets.token_bytes(CHALLENGE_BYTES)


def _safe(text: str) -> str:
    """Printable, single-line and bounded: library messages may quote attacker-chosen values."""
    cleaned = "".join(ch if ch.isprintable() else "?" for ch in text)
    if len(cleaned) > _MESSAGE_CHARS:
        cleaned = cleaned[: _MESSAGE_CHARS - 1] + "…"
    return cleaned


def _failure(exc: Exception) -> PasskeyError:
    if isinstance(exc, WebAuthnException):
        detail = str(exc).replace(". See __cause__ for more info", "").strip()
        if detail:
            return PasskeyError(f"{_PREFIX}: {_safe(detail)}")
    # json / base64 / CBOR / key-decoding errors outside the library's own exception family
    return PasskeyError(f"{_PREFIX}: the response is malformed")


def _check_size(response_json: str) -> None:
    if not isinstance(response_json, str):
        raise PasskeyError(f"{_PREFIX}: the response is not text")
    if len(response_json) > MAX_RESPONSE_CHARS:
        raise PasskeyError(f"{_PREFIX}: the response is too large")


def _descriptors(credential_ids: list[bytes]) -> list[PublicKeyCredentialDescriptor]:
    return [PublicKeyCredentialDescriptor(id=bytes(cid)) for cid in credential_ids]


def registration_options(rp_id: str, rp_name: str, user_name: str, user_handle: bytes, existing: list[bytes]) -> tuple[str, bytes]:
    """JSON text for navigator.credentials.create (options_to_json), and the challenge to keep server-side.

    ``user_handle`` is the account's opaque WebAuthn user id (1 to 64 bytes, not the user name);
    ``existing`` are the credential ids already registered for the account (excluded).
    Raises ``ValueError`` on an empty rp id, rp name, user name or a bad user handle (caller bugs).
    """
    if not isinstance(user_handle, bytes) or not 1 <= len(user_handle) <= MAX_USER_HANDLE_BYTES:
        # the library would silently substitute a random handle for an empty one
        raise ValueError(f"user_handle must be 1 to {MAX_USER_HANDLE_BYTES} bytes")
    challenge = _challenge()
    options = generate_registration_options(
        rp_id=rp_id,
        rp_name=rp_name,
        user_name=user_name,
        user_id=user_handle,
        user_display_name=user_name,
        challenge=challenge,
        timeout=TIMEOUT_MS,
        attestation=AttestationConveyancePreference.NONE,
        authenticator_selection=AuthenticatorSelectionCriteria(
            resident_key=ResidentKeyRequirement.PREFERRED,
            require_resident_key=False,
            user_verification=UserVerificationRequirement.REQUIRED,
        ),
        exclude_credentials=_descriptors(existing),
        supported_pub_key_algs=list(ALGORITHMS),
    )
    return options_to_json(options), challenge


def verify_registration(response_json: str, challenge: bytes, rp_id: str, origin: str) -> NewPasskey:
    """Verify the browser's answer to navigator.credentials.create; PasskeyError on any failure."""
    _check_size(response_json)
    try:
        verified = verify_registration_response(
            credential=response_json,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origin,
            require_user_presence=True,
            require_user_verification=True,
            supported_pub_key_algs=list(ALGORITHMS),
        )
    except Exception as exc:  # every failure, library or not, becomes the one safe error
        raise _failure(exc) from exc
    if not verified.user_verified:
        raise PasskeyError(f"{_PREFIX}: the authenticator did not verify the user")
    if not 1 <= len(verified.credential_id) <= MAX_CREDENTIAL_ID_BYTES:
        raise PasskeyError(f"{_PREFIX}: the credential id is too long")
    return NewPasskey(
        credential_id=bytes(verified.credential_id),
        public_key=bytes(verified.credential_public_key),
        sign_count=int(verified.sign_count),
        aaguid=verified.aaguid,
    )


def authentication_options(rp_id: str, credential_ids: list[bytes]) -> tuple[str, bytes]:
    """JSON text for navigator.credentials.get (options_to_json), and the challenge to keep server-side.

    ``credential_ids`` are the account's registered credentials (``allowCredentials``); an empty
    list asks the browser for a discoverable credential.
    """
    challenge = _challenge()
    options = generate_authentication_options(
        rp_id=rp_id,
        challenge=challenge,
        timeout=TIMEOUT_MS,
        allow_credentials=_descriptors(credential_ids),
        user_verification=UserVerificationRequirement.REQUIRED,
    )
    return options_to_json(options), challenge


def credential_id_of(response_json: str) -> bytes:
    """The raw credential id of an authentication response (to look up the stored key).

    Only parses; nothing is verified yet.  PasskeyError if the response is malformed.
    """
    _check_size(response_json)
    try:
        credential = parse_authentication_credential_json(response_json)
        raw_id = bytes(credential.raw_id)
        consistent = bytes_to_base64url(raw_id) == credential.id
    except Exception as exc:
        raise _failure(exc) from exc
    if not consistent:
        raise PasskeyError(f"{_PREFIX}: id and rawId differ")
    if not 1 <= len(raw_id) <= MAX_CREDENTIAL_ID_BYTES:
        raise PasskeyError(f"{_PREFIX}: the credential id has a bad length")
    return raw_id


def verify_authentication(response_json: str, challenge: bytes, rp_id: str, origin: str, public_key: bytes, sign_count: int) -> int:
    """Verify the browser's answer to navigator.credentials.get against the stored key; the new sign count.

    ``public_key`` and ``sign_count`` are the stored values for the credential named by
    :func:`credential_id_of`.  PasskeyError on any failure, including a sign count that did not
    increase (a possibly cloned authenticator).
    """
    _check_size(response_json)
    try:
        verified = verify_authentication_response(
            credential=response_json,
            expected_challenge=challenge,
            expected_rp_id=rp_id,
            expected_origin=origin,
            credential_public_key=public_key,
            credential_current_sign_count=sign_count,
            require_user_verification=True,
        )
    except Exception as exc:  # every failure, library or not, becomes the one safe error
        raise _failure(exc) from exc
    if not verified.user_verified:
        raise PasskeyError(f"{_PREFIX}: the authenticator did not verify the user")
    new_count = int(verified.new_sign_count)
    if (new_count or sign_count) and new_count <= sign_count:
        raise PasskeyError(f"{_PREFIX}: the sign count did not increase (possibly a cloned authenticator)")
    return new_count
