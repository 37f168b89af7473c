"""The one AES-256-GCM envelope recipe for data at rest.

Each object gets a fresh random 256-bit data key (DEK).  The DEK seals the payload; a master key
(KEK), named by its id, wraps the DEK.  Both seals bind, as associated data, the format header
(version and KEK id), the message id and the content's SHA-256, so a blob moved under another
message id, or a header edited to name another key, does not open.

Sealed layout (all lengths in bytes)::

    b"EGV1" | kid_len (1) | kid | wrap_nonce (12) | wrapped DEK (32 + 16 tag) | nonce (12) | ciphertext + tag (16)

Every failure to open is the same opaque ``VaultError``.
"""

from __future__ import annotations

import base64
import os
import secrets
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .errors import ConfigError, VaultError

MAGIC = b"EGV1"
NONCE_BYTES = 12  # NIST SP 800-38D §8.2: 96-bit random nonces, one DEK per object
KEY_BYTES = 32  # AES-256
TAG_BYTES = 16
_WRAPPED_BYTES = KEY_BYTES + TAG_BYTES


@dataclass(frozen=True, slots=True)
class MasterKey:
    key_id: str
    created: str
    secret: bytes = field(repr=False)


def new_key_id() -> str:
    return "k" + datetime.now(UTC).strftime("%Y%m%d") + "-" + secrets.token_hex(4)


def write_key_file(path: Path) -> MasterKey:
    """Create a new master key file with mode 0600 (never readable by anyone else, even briefly)."""
    key = MasterKey(new_key_id(), datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"), os.urandom(KEY_BYTES))
    text = (
        "# einvoice-gateway master key. Secret: keep mode 0600, back it up apart from the data.\n"
        f'id = "{key.key_id}"\ncreated = "{key.created}"\n'
        f'key = "{base64.b64encode(key.secret).decode()}"\n'
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    return key


def read_key_file(path: Path, where: str) -> MasterKey:
    try:
        data = tomllib.loads(path.read_text(encoding="ascii"))
        key_id, created, secret = data["id"], data.get("created", ""), base64.b64decode(data["key"], validate=True)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, ValueError, TypeError):
        raise ConfigError(f"{where}: {path} is not an einvoice-gateway master key file") from None
    if not isinstance(key_id, str) or not key_id.isascii() or not 0 < len(key_id) < 64:
        raise ConfigError(f"{where}: {path} has an invalid key id")
    if len(secret) != KEY_BYTES:
        raise ConfigError(f"{where}: {path} does not hold a 256-bit key")
    return MasterKey(key_id, str(created), secret)


class Vault:
    """Seals and opens objects with the configured master keys."""

    def __init__(self, keys: list[MasterKey], current: str | None = None):
        if not keys:
            raise ConfigError("vault.keys: no master key configured")
        self._keys = {k.key_id: k for k in keys}
        if len(self._keys) != len(keys):
            raise ConfigError("vault.keys: two files hold the same key id")
        # Default: the newest key, so that `keys rotate` (which writes a new key file) takes effect on reload.
        self.current = current or max(enumerate(keys), key=lambda ik: (ik[1].created, ik[0]))[1].key_id
        if self.current not in self._keys:
            raise ConfigError(f"vault.current: no configured key has the id {self.current!r}")

    @classmethod
    def from_files(cls, paths: tuple[Path, ...], current: str | None) -> Vault:
        return cls([read_key_file(p, f"vault.keys[{i}]") for i, p in enumerate(paths)], current)

    @property
    def key_ids(self) -> list[str]:
        return list(self._keys)

    def created(self, key_id: str) -> str:
        return self._keys[key_id].created

    def reseal(self, sealed: bytes, message_id: str, sha256: str) -> tuple[bytes, str]:
        """The same object sealed under the current key (with a new data key): `keys rewrap`."""
        return self.seal(self.open(sealed, message_id, sha256), message_id, sha256)

    @staticmethod
    def _aad(header: bytes, purpose: bytes, message_id: str, sha256: str) -> bytes:
        return b"|".join((header, purpose, message_id.encode(), sha256.encode()))

    def seal(self, plaintext: bytes, message_id: str, sha256: str) -> tuple[bytes, str]:
        kid = self.current.encode()
        header = MAGIC + bytes([len(kid)]) + kid
        dek = AESGCM.generate_key(bit_length=256)
        wrap_nonce, nonce = os.urandom(NONCE_BYTES), os.urandom(NONCE_BYTES)
        wrapped = AESGCM(self._keys[self.current].secret).encrypt(
            wrap_nonce, dek, self._aad(header, b"dek", message_id, sha256)
        )
        body = AESGCM(dek).encrypt(nonce, plaintext, self._aad(header, b"doc", message_id, sha256))
        return b"".join((header, wrap_nonce, wrapped, nonce, body)), self.current

    def key_id_of(self, sealed: bytes) -> str:
        if sealed[:4] != MAGIC or len(sealed) < 5:
            raise VaultError("cannot open sealed object")
        return sealed[5 : 5 + sealed[4]].decode("ascii", "replace")

    def open(self, sealed: bytes, message_id: str, sha256: str) -> bytes:
        try:
            if sealed[:4] != MAGIC:
                raise ValueError
            kid_len = sealed[4]
            header = sealed[: 5 + kid_len]
            key = self._keys[header[5:].decode("ascii")]
            pos = len(header)
            wrap_nonce = sealed[pos : pos + NONCE_BYTES]
            wrapped = sealed[pos + NONCE_BYTES : pos + NONCE_BYTES + _WRAPPED_BYTES]
            pos += NONCE_BYTES + _WRAPPED_BYTES
            nonce, body = sealed[pos : pos + NONCE_BYTES], sealed[pos + NONCE_BYTES :]
            if len(wrapped) != _WRAPPED_BYTES or len(nonce) != NONCE_BYTES or len(body) < TAG_BYTES:
                raise ValueError
            dek = AESGCM(key.secret).decrypt(wrap_nonce, wrapped, self._aad(header, b"dek", message_id, sha256))
            return AESGCM(dek).decrypt(nonce, body, self._aad(header, b"doc", message_id, sha256))
        except (InvalidTag, KeyError, ValueError, IndexError, UnicodeDecodeError):
            raise VaultError("cannot open sealed object") from None
