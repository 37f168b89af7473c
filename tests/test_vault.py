"""The AES-256-GCM envelope (gateway.vault) and the permission checks on key files."""

from __future__ import annotations

import hashlib
import os
import uuid

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.config import load as config_mod
from gateway.errors import ConfigError, VaultError
from gateway.vault import KEY_BYTES, MAGIC, NONCE_BYTES, MasterKey, Vault, read_key_file, write_key_file

CANARY = b"CANARY-vault-7d1f0c2e9b"
PLAIN = b"<Invoice>" + CANARY + b"</Invoice>" * 8
SHA = hashlib.sha256(PLAIN).hexdigest()
MID = "0b6f3c1e-5a4d-4c1b-9a0e-2f7d8e9c1a2b"


def key(kid: str) -> MasterKey:
    return MasterKey(kid, "2026-01-01T00:00:00Z", os.urandom(KEY_BYTES))


def layout(sealed: bytes) -> dict[str, tuple[int, int]]:
    """Byte ranges [start, end) of each field of the documented layout."""
    kid_end = 5 + sealed[4]
    wrap_end = kid_end + NONCE_BYTES
    wrapped_end = wrap_end + KEY_BYTES + 16
    nonce_end = wrapped_end + NONCE_BYTES
    return {"magic": (0, 4), "kid_len": (4, 5), "kid": (5, kid_end), "wrap_nonce": (kid_end, wrap_end),
            "wrapped_dek": (wrap_end, wrapped_end), "nonce": (wrapped_end, nonce_end),
            "ciphertext": (nonce_end, len(sealed) - 16), "tag": (len(sealed) - 16, len(sealed))}


@pytest.fixture
def vault() -> Vault:
    return Vault([key("k-test-1")])


def test_round_trip(vault):
    sealed, kid = vault.seal(PLAIN, MID, SHA)
    assert kid == "k-test-1" and vault.key_id_of(sealed) == "k-test-1"
    assert sealed.startswith(MAGIC)
    assert vault.open(sealed, MID, SHA) == PLAIN
    assert vault.open(vault.seal(b"", MID, SHA)[0], MID, SHA) == b""


def test_sealed_blob_is_not_plaintext(vault):
    sealed, _ = vault.seal(PLAIN, MID, SHA)
    assert CANARY not in sealed and b"Invoice" not in sealed


def test_wrong_message_id_or_sha256_fails(vault):
    sealed, _ = vault.seal(PLAIN, MID, SHA)
    with pytest.raises(VaultError):
        vault.open(sealed, str(uuid.uuid4()), SHA)
    with pytest.raises(VaultError):
        vault.open(sealed, MID, hashlib.sha256(b"other").hexdigest())


def test_flipping_any_byte_fails(vault):
    sealed, _ = vault.seal(PLAIN, MID, SHA)
    fields = layout(sealed)
    assert fields["ciphertext"][1] - fields["ciphertext"][0] == len(PLAIN)
    name_of = {pos: name for name, (start, end) in fields.items() for pos in range(start, end)}
    assert sorted(name_of) == list(range(len(sealed)))
    for pos in range(len(sealed)):
        for bit in (0x01, 0x80, 0xFF):
            tampered = bytearray(sealed)
            tampered[pos] ^= bit
            try:
                vault.open(bytes(tampered), MID, SHA)
            except VaultError:
                continue
            pytest.fail(f"flipping byte {pos} ({name_of[pos]}) with {bit:#04x} was not detected")


def test_truncation_and_extension_fail(vault):
    sealed, _ = vault.seal(PLAIN, MID, SHA)
    for n in range(len(sealed)):
        with pytest.raises(VaultError):
            vault.open(sealed[:n], MID, SHA)
    with pytest.raises(VaultError):
        vault.open(sealed + b"\0", MID, SHA)


def test_unknown_key_id_fails(vault):
    sealed, _ = vault.seal(PLAIN, MID, SHA)
    with pytest.raises(VaultError):
        Vault([key("k-other")]).open(sealed, MID, SHA)
    # Same secret under another id: the id in the header is bound, not just used for lookup.
    same_secret = Vault([MasterKey("k-renamed", "", vault._keys["k-test-1"].secret)])
    with pytest.raises(VaultError):
        same_secret.open(sealed, MID, SHA)


def test_key_rotation():
    old, new = key("k-old"), key("k-new")
    before = Vault([old])
    sealed_old, kid = before.seal(PLAIN, MID, SHA)
    assert kid == "k-old"

    after = Vault([old, new])
    assert after.current == "k-new" and after.key_ids == ["k-old", "k-new"]
    assert after.open(sealed_old, MID, SHA) == PLAIN
    sealed_new, kid = after.seal(PLAIN, MID, SHA)
    assert kid == "k-new" and after.key_id_of(sealed_new) == "k-new"
    assert after.open(sealed_new, MID, SHA) == PLAIN
    with pytest.raises(VaultError):
        before.open(sealed_new, MID, SHA)

    pinned = Vault([old, new], current="k-old")
    assert pinned.seal(PLAIN, MID, SHA)[1] == "k-old"
    with pytest.raises(ConfigError, match="vault.current"):
        Vault([old], current="k-missing")
    with pytest.raises(ConfigError, match="vault.keys"):
        Vault([old, MasterKey("k-old", "", os.urandom(KEY_BYTES))])


def test_nonces_and_data_keys_never_repeat():
    master = key("k-nonce")
    vault = Vault([master])
    wrap_nonces, nonces, deks = set(), set(), set()
    n = 10_000
    for _ in range(n):
        sealed, _ = vault.seal(b"x", MID, SHA)
        f = layout(sealed)
        header = sealed[: f["kid"][1]]
        wrap_nonce = sealed[slice(*f["wrap_nonce"])]
        wrap_nonces.add(wrap_nonce)
        nonces.add(sealed[slice(*f["nonce"])])
        aad = b"|".join((header, b"dek", MID.encode(), SHA.encode()))
        deks.add(AESGCM(master.secret).decrypt(wrap_nonce, sealed[slice(*f["wrapped_dek"])], aad))
    assert len(wrap_nonces) == len(nonces) == len(deks) == n
    assert all(len(d) == KEY_BYTES for d in deks)


def test_write_key_file_is_private_and_reads_back(tmp_path):
    old_umask = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        path = tmp_path / "master.key"
        written = write_key_file(path)
    finally:
        os.umask(old_umask)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_key_file(path, "vault.keys[0]") == written
    with pytest.raises(FileExistsError):
        write_key_file(path)  # never overwrites a key


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_config_refuses_readable_master_key(inst, mode):
    config_mod.load(inst.config)  # fine as made
    inst.master_key.chmod(mode)
    with pytest.raises(ConfigError) as err:
        config_mod.load(inst.config)
    msg = err.value.message
    assert msg.startswith("vault.keys[0]:")
    assert f"chmod 600 {inst.master_key}" in msg


def test_config_accepts_read_only_master_key(inst):
    inst.master_key.chmod(0o400)
    assert config_mod.load(inst.config).vault.keys == (inst.master_key,)


def test_config_refuses_readable_server_key(inst):
    inst.server.key.chmod(0o644)
    with pytest.raises(ConfigError) as err:
        config_mod.load(inst.config)
    assert err.value.message.startswith("https.private_key:")
    assert f"chmod 600 {inst.server.key}" in err.value.message
