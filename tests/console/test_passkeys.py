"""Passkey ceremonies against a software authenticator built here (no browser).

The authenticator holds a real EC P-256 (or RSA-2048 / Ed25519) key, builds the authenticator data
(rp id hash, flags, sign count, attested credential data with a COSE key) and a CBOR attestation
object with fmt "none", and signs assertions exactly as WebAuthn §6.3.3 says: over
authenticatorData || SHA-256(clientDataJSON).  It reads the options JSON that the module produces,
so the round trip covers the options as well as the verification.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.console import passkeys
from gateway.console.passkeys import NewPasskey, PasskeyError

RP_ID = "console.example.test"
ORIGIN = "https://console.example.test:8443"
AAGUID = bytes.fromhex("6028b017b1d44c02b4b3afcdafc96bb2")

UP, UV, AT = 0x01, 0x04, 0x40


def b64u(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64u(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class SoftAuthenticator:
    """A minimal platform authenticator with one credential."""

    kind: str = "ec"  # "ec" (ES256), "rsa" (RS256) or "ed25519" (EdDSA, not allowed by the console)
    credential_id: bytes = field(default_factory=lambda: os.urandom(32))
    counter: int = 0
    key: Any = None

    def __post_init__(self) -> None:
        if self.kind == "ec":
            self.key = ec.generate_private_key(ec.SECP256R1())
        elif self.kind == "rsa":
            self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            self.key = ed25519.Ed25519PrivateKey.generate()

    def cose_key(self) -> bytes:
        if self.kind == "ec":
            numbers = self.key.public_key().public_numbers()
            return cbor2.dumps({1: 2, 3: -7, -1: 1, -2: numbers.x.to_bytes(32, "big"), -3: numbers.y.to_bytes(32, "big")})
        if self.kind == "rsa":
            numbers = self.key.public_key().public_numbers()
            n = numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")
            e = numbers.e.to_bytes((numbers.e.bit_length() + 7) // 8, "big")
            return cbor2.dumps({1: 3, 3: -257, -1: n, -2: e})
        raw = self.key.public_key().public_bytes_raw()
        return cbor2.dumps({1: 1, 3: -8, -1: 6, -2: raw})

    def sign(self, data: bytes) -> bytes:
        if self.kind == "ec":
            return bytes(self.key.sign(data, ec.ECDSA(hashes.SHA256())))
        if self.kind == "rsa":
            return bytes(self.key.sign(data, padding.PKCS1v15(), hashes.SHA256()))
        return bytes(self.key.sign(data))

    @staticmethod
    def client_data(kind: str, challenge_b64: str, origin: str) -> bytes:
        return json.dumps({"type": kind, "challenge": challenge_b64, "origin": origin, "crossOrigin": False}).encode()

    def create(self, options_json: str, *, origin: str = ORIGIN, rp_id: str | None = None, flags: int = UP | UV | AT) -> str:
        """navigator.credentials.create: returns the credential JSON the browser script posts."""
        options = json.loads(options_json)
        rp = options["rp"]["id"] if rp_id is None else rp_id
        auth_data = (
            hashlib.sha256(rp.encode()).digest()
            + bytes([flags])
            + struct.pack(">I", self.counter)
            + AAGUID
            + struct.pack(">H", len(self.credential_id))
            + self.credential_id
            + self.cose_key()
        )
        attestation = cbor2.dumps({"fmt": "none", "attStmt": {}, "authData": auth_data})
        client_data = self.client_data("webauthn.create", options["challenge"], origin)
        return json.dumps(
            {
                "id": b64u(self.credential_id),
                "rawId": b64u(self.credential_id),
                "type": "public-key",
                "response": {
                    "clientDataJSON": b64u(client_data),
                    "attestationObject": b64u(attestation),
                    "transports": ["internal", "hybrid"],
                },
                "authenticatorAttachment": "platform",
                "clientExtensionResults": {},
            }
        )

    def get(
        self,
        options_json: str,
        *,
        origin: str = ORIGIN,
        rp_id: str | None = None,
        flags: int = UP | UV,
        bump: int = 1,
        user_handle: bytes | None = b"user-handle-1",
    ) -> str:
        """navigator.credentials.get: increments the counter by ``bump`` and signs."""
        options = json.loads(options_json)
        allowed = [unb64u(item["id"]) for item in options.get("allowCredentials", [])]
        assert not allowed or self.credential_id in allowed
        self.counter += bump
        rp = options["rpId"] if rp_id is None else rp_id
        auth_data = hashlib.sha256(rp.encode()).digest() + bytes([flags]) + struct.pack(">I", self.counter)
        client_data = self.client_data("webauthn.get", options["challenge"], origin)
        signature = self.sign(auth_data + hashlib.sha256(client_data).digest())
        response: dict[str, Any] = {
            "clientDataJSON": b64u(client_data),
            "authenticatorData": b64u(auth_data),
            "signature": b64u(signature),
        }
        if user_handle is not None:
            response["userHandle"] = b64u(user_handle)
        return json.dumps(
            {
                "id": b64u(self.credential_id),
                "rawId": b64u(self.credential_id),
                "type": "public-key",
                "response": response,
                "authenticatorAttachment": "platform",
                "clientExtensionResults": {},
            }
        )


def register(authenticator: SoftAuthenticator) -> NewPasskey:
    options, challenge = passkeys.registration_options(RP_ID, "e-invoice gateway", "alice", b"user-handle-1", [])
    return passkeys.verify_registration(authenticator.create(options), challenge, RP_ID, ORIGIN)


def login_options(passkey: NewPasskey) -> tuple[str, bytes]:
    return passkeys.authentication_options(RP_ID, [passkey.credential_id])


def edit_response(response_json: str, **fields: str) -> str:
    data = json.loads(response_json)
    data["response"].update(fields)
    return json.dumps(data)


# --- options ---------------------------------------------------------------------------------------


def test_registration_options_carry_the_policy() -> None:
    existing = [b"\x01" * 16, b"\x02" * 64]
    options_json, challenge = passkeys.registration_options(RP_ID, "e-invoice gateway", "alice", b"\xaa" * 32, existing)
    options = json.loads(options_json)
    assert len(challenge) == 32
    assert unb64u(options["challenge"]) == challenge
    assert options["rp"] == {"id": RP_ID, "name": "e-invoice gateway"}
    assert options["user"] == {"id": b64u(b"\xaa" * 32), "name": "alice", "displayName": "alice"}
    assert [p["alg"] for p in options["pubKeyCredParams"]] == [-7, -257]
    assert all(p["type"] == "public-key" for p in options["pubKeyCredParams"])
    assert options["timeout"] == 60000
    assert options["attestation"] == "none"
    assert options["authenticatorSelection"]["userVerification"] == "required"
    assert options["authenticatorSelection"]["residentKey"] == "preferred"
    assert options["authenticatorSelection"]["requireResidentKey"] is False
    assert [unb64u(c["id"]) for c in options["excludeCredentials"]] == existing


def test_authentication_options_carry_the_policy() -> None:
    ids = [b"\x07" * 20, b"\x08" * 48]
    options_json, challenge = passkeys.authentication_options(RP_ID, ids)
    options = json.loads(options_json)
    assert len(challenge) == 32
    assert unb64u(options["challenge"]) == challenge
    assert options["rpId"] == RP_ID
    assert options["timeout"] == 60000
    assert options["userVerification"] == "required"
    assert [unb64u(c["id"]) for c in options["allowCredentials"]] == ids


def test_challenges_are_fresh() -> None:
    challenges = {passkeys.authentication_options(RP_ID, [])[1] for _ in range(50)}
    challenges |= {passkeys.registration_options(RP_ID, "gw", "bob", b"h", [])[1] for _ in range(50)}
    assert len(challenges) == 100


@pytest.mark.parametrize("handle", [b"", b"x" * 65])
def test_registration_options_refuse_a_bad_user_handle(handle: bytes) -> None:
    with pytest.raises(ValueError, match="user_handle"):
        passkeys.registration_options(RP_ID, "gw", "alice", handle, [])


# --- the happy path --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ec", "rsa"])
def test_register_then_log_in_twice(kind: str) -> None:
    authenticator = SoftAuthenticator(kind=kind, counter=3)
    passkey = register(authenticator)
    assert passkey.credential_id == authenticator.credential_id
    assert passkey.sign_count == 3
    assert passkey.aaguid == "6028b017-b1d4-4c02-b4b3-afcdafc96bb2"
    assert cbor2.loads(passkey.public_key)[3] == (-7 if kind == "ec" else -257)
    assert "public_key" not in repr(passkey)

    options, challenge = login_options(passkey)
    response = authenticator.get(options)
    assert passkeys.credential_id_of(response) == passkey.credential_id
    count = passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)
    assert count == 4

    options, challenge = login_options(passkey)
    response = authenticator.get(options, bump=10)
    assert passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, count) == 14


def test_authenticator_without_a_counter_is_accepted() -> None:
    """Many passkey providers always report 0; 0 after 0 is not a clone signal (WebAuthn §6.1.1)."""
    authenticator = SoftAuthenticator()
    passkey = register(authenticator)
    assert passkey.sign_count == 0
    for _ in range(2):
        options, challenge = login_options(passkey)
        response = authenticator.get(options, bump=0)
        assert passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, 0) == 0


def test_discoverable_login_without_allow_list() -> None:
    authenticator = SoftAuthenticator()
    passkey = register(authenticator)
    options, challenge = passkeys.authentication_options(RP_ID, [])
    assert json.loads(options)["allowCredentials"] == []
    response = authenticator.get(options)
    assert passkeys.credential_id_of(response) == passkey.credential_id
    assert passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, 0) == 1


# --- registration refused ----------------------------------------------------------------------------


def test_registration_without_user_verification_is_refused() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator().create(options, flags=UP | AT)
    with pytest.raises(PasskeyError, match="^the passkey response did not verify: .*[Uu]ser verification"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_without_user_presence_is_refused() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator().create(options, flags=UV | AT)
    with pytest.raises(PasskeyError, match="[Pp]resence"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_from_another_origin_is_refused() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator().create(options, origin="https://console.example.test.evil.example")
    with pytest.raises(PasskeyError, match="origin"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_for_another_rp_id_is_refused() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator().create(options, rp_id="example.test")
    with pytest.raises(PasskeyError, match="RP ID"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_with_another_challenge_is_refused() -> None:
    options, _ = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    _, other_challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator().create(options)
    with pytest.raises(PasskeyError, match="challenge"):
        passkeys.verify_registration(response, other_challenge, RP_ID, ORIGIN)


def test_registration_with_an_assertion_is_refused() -> None:
    """A webauthn.get client data (an assertion) is not a registration."""
    authenticator = SoftAuthenticator()
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    good = json.loads(authenticator.create(options))
    client_data = SoftAuthenticator.client_data("webauthn.get", json.loads(options)["challenge"], ORIGIN)
    response = edit_response(json.dumps(good), clientDataJSON=b64u(client_data))
    with pytest.raises(PasskeyError, match="client data type"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_with_an_eddsa_key_is_refused() -> None:
    """Only ES256 and RS256 are offered, and only those are accepted."""
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = SoftAuthenticator(kind="ed25519").create(options)
    with pytest.raises(PasskeyError, match="alg"):
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)


def test_registration_with_mismatched_id_and_raw_id_is_refused() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    data = json.loads(SoftAuthenticator().create(options))
    data["id"] = b64u(b"another id")
    with pytest.raises(PasskeyError, match="id and raw_id"):
        passkeys.verify_registration(json.dumps(data), challenge, RP_ID, ORIGIN)


# --- authentication refused --------------------------------------------------------------------------


@pytest.fixture
def enrolled() -> tuple[SoftAuthenticator, NewPasskey]:
    authenticator = SoftAuthenticator(counter=5)
    return authenticator, register(authenticator)


def test_login_without_user_verification_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = authenticator.get(options, flags=UP)
    with pytest.raises(PasskeyError, match="[Uu]ser verification"):
        passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_login_from_another_origin_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = authenticator.get(options, origin="http://console.example.test:8443")
    with pytest.raises(PasskeyError, match="origin"):
        passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_login_for_another_rp_id_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = authenticator.get(options, rp_id="evil.example")
    with pytest.raises(PasskeyError, match="RP ID"):
        passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_login_with_another_challenge_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, _ = login_options(passkey)
    _, other_challenge = login_options(passkey)
    response = authenticator.get(options)
    with pytest.raises(PasskeyError, match="challenge"):
        passkeys.verify_authentication(response, other_challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_replayed_assertion_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = authenticator.get(options)
    count = passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)
    assert count == 6
    # even if the caller kept the challenge by mistake, the stored count now refuses the same assertion
    with pytest.raises(PasskeyError, match="sign count"):
        passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, count)


@pytest.mark.parametrize(("bump", "stored"), [(0, 5), (-2, 5), (-5, 5), (1, 100)])
def test_non_increasing_sign_count_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey], bump: int, stored: int) -> None:
    """A counter that stays, goes back or drops to 0 looks like a cloned authenticator."""
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = authenticator.get(options, bump=bump)
    with pytest.raises(PasskeyError, match="sign count"):
        passkeys.verify_authentication(response, challenge, RP_ID, ORIGIN, passkey.public_key, stored)


def test_tampered_signature_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = json.loads(authenticator.get(options))
    signature = bytearray(unb64u(response["response"]["signature"]))
    signature[-1] ^= 0x01
    tampered = edit_response(json.dumps(response), signature=b64u(bytes(signature)))
    with pytest.raises(PasskeyError, match="signature"):
        passkeys.verify_authentication(tampered, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_tampered_authenticator_data_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    """Raising the counter after signing (to get past the clone check) breaks the signature."""
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = json.loads(authenticator.get(options))
    auth_data = bytearray(unb64u(response["response"]["authenticatorData"]))
    auth_data[33:37] = struct.pack(">I", 1000)
    tampered = edit_response(json.dumps(response), authenticatorData=b64u(bytes(auth_data)))
    with pytest.raises(PasskeyError, match="signature"):
        passkeys.verify_authentication(tampered, challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_signature_by_another_key_is_refused(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    impostor = SoftAuthenticator(credential_id=authenticator.credential_id, counter=50)
    options, challenge = login_options(passkey)
    with pytest.raises(PasskeyError, match="signature"):
        passkeys.verify_authentication(impostor.get(options), challenge, RP_ID, ORIGIN, passkey.public_key, passkey.sign_count)


def test_registration_response_is_not_an_assertion(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    with pytest.raises(PasskeyError):
        passkeys.verify_authentication(authenticator.create(options), challenge, RP_ID, ORIGIN, passkey.public_key, 0)


def test_garbage_stored_public_key_is_a_passkey_error(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    for key in (b"", b"\x00", b"\x04" + b"\x01" * 64, cbor2.dumps({1: 9, 3: -7}), cbor2.dumps({1: 2, 3: -7})):
        options, challenge = login_options(passkey)
        with pytest.raises(PasskeyError):
            passkeys.verify_authentication(authenticator.get(options), challenge, RP_ID, ORIGIN, key, passkey.sign_count)


# --- credential_id_of --------------------------------------------------------------------------------


def test_credential_id_of_refuses_mismatched_ids(enrolled: tuple[SoftAuthenticator, NewPasskey]) -> None:
    authenticator, passkey = enrolled
    options, _ = login_options(passkey)
    data = json.loads(authenticator.get(options))
    data["id"] = b64u(b"someone else")
    with pytest.raises(PasskeyError, match="id and rawId differ"):
        passkeys.credential_id_of(json.dumps(data))


@pytest.mark.parametrize(
    "text",
    [
        "",
        "null",
        "[]",
        "{}",
        '{"id": "", "rawId": "", "type": "public-key", "response": {}}',
        '{"id": "AAAA", "rawId": "AAAA", "type": "password", "response": {"clientDataJSON": "", "authenticatorData": "", "signature": ""}}',
        '{"id": "é", "rawId": "é", "type": "public-key", "response": {"clientDataJSON": "", "authenticatorData": "", "signature": ""}}',
        '{"id": "AAAA", "rawId": "A", "type": "public-key", "response": {"clientDataJSON": "", "authenticatorData": "", "signature": ""}}',
        '{"id": "AAAA", "rawId": "AAAA", "type": "public-key", "response": {"clientDataJSON": "", "authenticatorData": "", '
        '"signature": "", "userHandle": 7}}',
        "[" * 50_000,
        "x" * (passkeys.MAX_RESPONSE_CHARS + 1),
    ],
)
def test_malformed_responses_are_passkey_errors(text: str) -> None:
    challenge = os.urandom(32)
    key = SoftAuthenticator().cose_key()
    for call in (
        lambda: passkeys.credential_id_of(text),
        lambda: passkeys.verify_registration(text, challenge, RP_ID, ORIGIN),
        lambda: passkeys.verify_authentication(text, challenge, RP_ID, ORIGIN, key, 0),
    ):
        with pytest.raises(PasskeyError, match="^the passkey response did not verify: "):
            call()


def test_error_messages_are_printable_and_bounded() -> None:
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    hostile_origin = "https://x\x1b[2J\r\n\u202e" + "A" * 5000
    response = SoftAuthenticator().create(options, origin=hostile_origin)
    with pytest.raises(PasskeyError) as info:
        passkeys.verify_registration(response, challenge, RP_ID, ORIGIN)
    message = str(info.value)
    assert message.startswith("the passkey response did not verify: ")
    assert message.isprintable()
    assert len(message) <= 250
    assert "__cause__" not in message
    assert info.value.__cause__ is not None


# --- fuzzing -------------------------------------------------------------------------------------------

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
_STATIC_KEY = SoftAuthenticator().cose_key()
_b64ish = st.one_of(st.text(max_size=80), st.binary(max_size=80).map(b64u))
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _b64ish)
_response_dicts = st.fixed_dictionaries(
    {
        "id": _b64ish,
        "rawId": _b64ish,
        "type": st.sampled_from(["public-key", "x"]),
        "response": st.dictionaries(
            st.sampled_from(["clientDataJSON", "attestationObject", "authenticatorData", "signature", "userHandle", "transports"]),
            st.one_of(_json_scalars, st.binary(max_size=120).map(b64u), st.lists(_json_scalars, max_size=3)),
        ),
    },
    optional={"authenticatorAttachment": st.one_of(_json_scalars, st.sampled_from(["platform", "cross-platform"]))},
)


def _only_passkey_errors(text: str) -> None:
    challenge = b"\x00" * 32
    for call in (
        lambda: passkeys.credential_id_of(text),
        lambda: passkeys.verify_registration(text, challenge, RP_ID, ORIGIN),
        lambda: passkeys.verify_authentication(text, challenge, RP_ID, ORIGIN, _STATIC_KEY, 0),
    ):
        try:
            call()
        except PasskeyError as exc:
            assert str(exc).startswith("the passkey response did not verify: ")
            assert str(exc).isprintable()


@FUZZ
@given(st.text(max_size=400))
def test_random_text_raises_only_passkey_error(text: str) -> None:
    _only_passkey_errors(text)


@FUZZ
@given(_response_dicts)
def test_random_credential_shapes_raise_only_passkey_error(data: dict[str, Any]) -> None:
    _only_passkey_errors(json.dumps(data))


@FUZZ
@given(
    field_name=st.sampled_from(["clientDataJSON", "authenticatorData", "signature"]),
    position=st.integers(0, 10_000),
    flip=st.integers(1, 255),
)
def test_any_flipped_byte_in_an_assertion_is_refused(
    enrolled: tuple[SoftAuthenticator, NewPasskey], field_name: str, position: int, flip: int
) -> None:
    authenticator, passkey = enrolled
    options, challenge = login_options(passkey)
    response = json.loads(authenticator.get(options))
    raw = bytearray(unb64u(response["response"][field_name]))
    raw[position % len(raw)] ^= flip
    tampered = edit_response(json.dumps(response), **{field_name: b64u(bytes(raw))})
    with pytest.raises(PasskeyError):
        passkeys.verify_authentication(tampered, challenge, RP_ID, ORIGIN, passkey.public_key, 0)


@FUZZ
@given(position=st.integers(0, 10_000), flip=st.integers(1, 255), cut=st.booleans())
def test_mangled_attestation_object_verifies_or_raises_passkey_error(position: int, flip: int, cut: bool) -> None:
    """A "none" attestation is unsigned, so some edits (inside the credential id) still verify; nothing else escapes."""
    options, challenge = passkeys.registration_options(RP_ID, "gw", "alice", b"h", [])
    response = json.loads(SoftAuthenticator().create(options))
    raw = bytearray(unb64u(response["response"]["attestationObject"]))
    if cut:
        del raw[position % len(raw) :]
    else:
        raw[position % len(raw)] ^= flip
    mangled = edit_response(json.dumps(response), attestationObject=b64u(bytes(raw)))
    try:
        result = passkeys.verify_registration(mangled, challenge, RP_ID, ORIGIN)
    except PasskeyError:
        return
    assert isinstance(result, NewPasskey)
    assert result.aaguid and result.public_key
