"""The console's credentials, without I/O: password hashing and policy, TOTP, recovery codes, tokens.

- Passwords are hashed with argon2id (``argon2-cffi``).  Hashing is deliberately slow and memory
  hungry, so callers run it in a dedicated one-thread executor behind a per-address rate limit
  (gateway/console/app.py): a login flood queues there, not in front of invoice intake.
- TOTP is RFC 6238 as every authenticator app implements it (HMAC-SHA-1, 30 s steps, 6 digits).
  HMAC-SHA-1 is not the broken use of SHA-1 (collisions do not matter to an HMAC); apps do not
  support anything else.  ``totp_step`` returns the step a code matched so the caller can refuse
  that step, and every earlier one, afterwards: a code works once.
- Recovery codes are 10 random codes of 50 bits; only their SHA-256 is stored (they are random, so
  a slow hash adds nothing), and each is used once.
- Session and CSRF tokens are 256-bit random strings; the database holds only the SHA-256 of a
  session token, so a copy of the database does not give anyone a session.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import struct
import time
import unicodedata
from importlib.resources import files

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_PASSWORD_CHARS = 12  # NIST SP 800-63B asks for 8 at least; 12 for accounts that release payments
MAX_PASSWORD_CHARS = 256  # a bound on what is hashed (and a passphrase longer than this is a paste error)
TOTP_STEP_S = 30
TOTP_DIGITS = 6
TOTP_WINDOW = 1  # steps either side of now that are accepted (clock drift and typing time)
RECOVERY_CODES = 10

# argon2id: 64 MiB, two passes, one lane (about 60 ms on this project's benchmark machine); one
# lane keeps one hash on one core, so the other core stays free for invoices during a flood.
_HASHER = PasswordHasher(time_cost=2, memory_cost=64 * 1024, parallelism=1)
# Verified instead of a missing user's hash, so an unknown name costs the same time as a known one.
_DUMMY_HASH = _HASHER.hash(secrets.token_hex(16))


class PolicyError(ValueError):
    """A new password that breaks the policy; the message says which rule."""


def _common_passwords() -> frozenset[str]:
    text = files("gateway.console").joinpath("common-passwords.txt").read_text(encoding="utf-8")
    return frozenset(line.strip().lower() for line in text.splitlines() if line.strip() and not line.startswith("#"))


COMMON = _common_passwords()


def normalise(password: str) -> str:
    """NFKC, as NIST SP 800-63B asks, so the same passphrase typed on two keyboards is the same."""
    return unicodedata.normalize("NFKC", password)


def check_policy(password: str, user: str) -> None:
    """Length, a blocklist of common passwords, and not the user name; no composition rules and no
    expiry (both push people to weaker passwords)."""
    pw = normalise(password)
    if len(pw) < MIN_PASSWORD_CHARS:
        raise PolicyError(f"the password must have at least {MIN_PASSWORD_CHARS} characters (a passphrase of a few words works well)")
    if len(pw) > MAX_PASSWORD_CHARS:
        raise PolicyError(f"the password must have at most {MAX_PASSWORD_CHARS} characters")
    folded = pw.lower()
    if folded in COMMON or folded.rstrip("0123456789!.") in COMMON:
        raise PolicyError("this password is on the list of commonly used passwords; choose another")
    if len(set(folded)) < 4:
        raise PolicyError("the password repeats too few different characters; choose another")
    if user and user.lower() in folded:
        raise PolicyError("the password must not contain the user name")
    if "einvoice" in folded or "gateway" in folded:
        raise PolicyError("the password must not contain the product's name")


def hash_password(password: str) -> str:
    return _HASHER.hash(normalise(password)[:MAX_PASSWORD_CHARS])


def verify_password(stored: str | None, password: str) -> bool:
    """Constant work whether or not the user exists (``stored`` None verifies a dummy hash)."""
    try:
        ok = _HASHER.verify(stored or _DUMMY_HASH, normalise(password)[:MAX_PASSWORD_CHARS])
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False
    return ok and stored is not None


def needs_rehash(stored: str) -> bool:
    return _HASHER.check_needs_rehash(stored)


# --- TOTP ------------------------------------------------------------------------------------------


def new_totp_secret() -> str:
    """160 random bits in base32 without padding, as authenticator apps expect."""
    return base64.b32encode(secrets.token_bytes(20)).decode().rstrip("=")


def totp_code(secret: str, step: int) -> str:
    key = base64.b32decode(secret + "=" * (-len(secret) % 8), casefold=True)
    mac = hmac.new(key, struct.pack(">Q", step), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset:offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**TOTP_DIGITS).zfill(TOTP_DIGITS)


def totp_step(secret: str, code: str, now: float | None = None) -> int | None:
    """The time step ``code`` is valid for (within the drift window), or None."""
    code = code.strip().replace(" ", "")
    if len(code) != TOTP_DIGITS or not (code.isascii() and code.isdigit()):
        return None
    current = int((time.time() if now is None else now) // TOTP_STEP_S)
    found = None
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):  # compare every candidate: no early exit
        if hmac.compare_digest(totp_code(secret, step), code):
            found = step
    return found


def otpauth_uri(secret: str, user: str, issuer: str) -> str:
    from urllib.parse import quote

    return (f"otpauth://totp/{quote(issuer)}:{quote(user)}?secret={secret}&issuer={quote(issuer)}"
            f"&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP_S}")


# --- recovery codes and tokens -------------------------------------------------------------------

_CODE_ALPHABET = "23456789abcdefghjkmnpqrstuvwxyz"  # no 0/o, 1/l/i


def new_recovery_codes() -> list[str]:
    def one() -> str:
        raw = "".join(secrets.choice(_CODE_ALPHABET) for _ in range(10))
        return f"{raw[:5]}-{raw[5:]}"

    return [one() for _ in range(RECOVERY_CODES)]


def recovery_hash(code: str) -> str:
    canonical = code.strip().lower().replace("-", "").replace(" ", "")
    return hashlib.sha256(f"einvoice-gateway recovery code {canonical}".encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def new_password() -> str:
    """An initial password for a new account (shown once; the user must change it at first login)."""
    return secrets.token_urlsafe(15)

