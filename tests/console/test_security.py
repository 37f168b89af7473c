"""Credentials (``gateway/console/security.py``): the password policy, argon2id hashing, TOTP checked
against pyotp (an independent RFC 6238 implementation), recovery codes, tokens, the per-address rate
limiter."""

from __future__ import annotations

import time

import pyotp
import pytest

from gateway.console import security
from tests.helpers.console import password_hash

# --- passwords ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("password, user, rule", [
    ("short pass", "alice", "at least 12 characters"),
    ("qazwsxedcrfv", "alice", "commonly used"),  # on the list as it is
    ("QAZWSXEDCRFV", "alice", "commonly used"),  # case does not matter
    ("iloveyou2024!!", "alice", "commonly used"),  # a common one with digits and "!" appended
    ("Password123456", "alice", "commonly used"),
    ("ｑａｚｗｓｘｅｄｃｒｆｖ", "alice", "commonly used"),  # full-width: the same after NFKC
    ("alice's own passphrase", "alice", "user name"),
    ("my ALICE passphrase", "alice", "user name"),
    ("my favourite einvoice words", "alice", "product's name"),
    ("that gateway is grand", "alice", "product's name"),
    ("abababababababab", "alice", "too few different characters"),
    ("x" * 100 + "y" * 100 + "z" * 56 + "w", "alice", "at most 256"),
])
def test_password_policy_refuses(password, user, rule):
    with pytest.raises(security.PolicyError, match=rule):
        security.check_policy(password, user)


@pytest.mark.parametrize("password", ["purple elephant dances", "Tr0ub4dor & three more words", "abcd" * 64])
def test_password_policy_accepts_a_good_passphrase(password):
    security.check_policy(password, "alice")  # no exception


def test_policy_counts_characters_after_nfkc():
    # "ﬁ" (one ligature) is "fi" (two letters) after NFKC: 11 typed characters, 12 after normalising.
    typed = "ﬁne  oranges"[:11]
    assert len(typed) == 11 and len(security.normalise(typed)) == 12
    security.check_policy(typed, "alice")
    with pytest.raises(security.PolicyError, match="at least 12"):
        security.check_policy("fine orange", "alice")


def test_hash_and_verify_roundtrip():
    digest = security.hash_password("purple elephant dances")
    assert digest.startswith("$argon2id$")
    assert "purple" not in digest
    assert security.verify_password(digest, "purple elephant dances")
    assert not security.verify_password(digest, "purple elephant dance")
    assert not security.verify_password(digest, "Purple elephant dances")
    assert not security.verify_password("not a hash", "purple elephant dances")
    assert not security.needs_rehash(digest)
    # NFKC: the same passphrase typed on another keyboard (full-width letters) is the same password.
    assert security.verify_password(digest, "ｐｕｒｐｌｅ elephant dances")


def test_missing_user_costs_a_hash_too():
    real = password_hash()
    t0 = time.perf_counter()
    assert not security.verify_password(real, "wrong horse battery staple")
    t_real = time.perf_counter() - t0
    t0 = time.perf_counter()
    assert security.verify_password(None, "wrong horse battery staple") is False
    t_none = time.perf_counter() - t0
    assert t_none > t_real / 10, (t_none, t_real)
    # and no password "matches" the missing user, whatever it is
    assert security.verify_password(None, "") is False


def test_only_max_password_chars_are_hashed():
    long = ("abcdefgh" * 40)[:security.MAX_PASSWORD_CHARS] + "tail beyond the bound"
    digest = security.hash_password(long)
    assert security.verify_password(digest, long)
    assert security.verify_password(digest, long[:security.MAX_PASSWORD_CHARS])  # what is hashed is bounded
    assert not security.verify_password(digest, long[:security.MAX_PASSWORD_CHARS - 1])
    with pytest.raises(security.PolicyError, match=f"at most {security.MAX_PASSWORD_CHARS}"):
        security.check_policy(long, "alice")


# --- TOTP, recovery codes, tokens --------------------------------------------------------------------------


RFC6238_SECRET = "GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ"  # ASCII "12345678901234567890", the RFC's SHA-1 key


@pytest.mark.parametrize("t, expected", [(59, "287082"), (1111111109, "081804"), (1111111111, "050471"),
                                         (1234567890, "005924"), (2000000000, "279037"), (20000000000, "353130")])
def test_totp_matches_rfc6238_vectors_and_pyotp(t, expected):
    # RFC 6238 appendix B lists 8-digit values; authenticator apps show their last six digits.
    assert security.totp_code(RFC6238_SECRET, t // 30) == expected == pyotp.TOTP(RFC6238_SECRET).at(t)


def test_totp_against_pyotp_at_many_times():
    secret = security.new_totp_secret()
    assert len(secret) == 32 and len(pyotp.TOTP(secret).byte_secret()) == 20
    otp = pyotp.TOTP(secret)
    for t in (0, 29, 30, 1_700_000_000, 1_700_000_029.9, time.time(), 4_102_444_800):
        code = otp.at(t)
        assert security.totp_code(secret, int(t // 30)) == code
        if t >= 30:  # (the window of step 0 would reach before 1970)
            assert security.totp_step(secret, code, now=t) == int(t // 30)


def test_totp_window_is_one_step_either_side():
    secret = security.new_totp_secret()
    otp = pyotp.TOTP(secret)
    now = 1_800_000_015.0
    step = int(now // 30)
    assert security.totp_step(secret, otp.at(now - 30), now=now) == step - 1
    assert security.totp_step(secret, otp.at(now + 30), now=now) == step + 1
    assert security.totp_step(secret, otp.at(now - 60), now=now) is None
    assert security.totp_step(secret, otp.at(now + 60), now=now) is None
    # typed with a space in the middle, or around: the same code
    code = otp.at(now)
    assert security.totp_step(secret, f" {code[:3]} {code[3:]} ", now=now) == step


def test_totp_refuses_wrong_and_malformed_codes():
    secret = security.new_totp_secret()
    now = 1_800_000_015.0
    good = pyotp.TOTP(secret).at(now)
    valid = {pyotp.TOTP(secret).at(now + d) for d in (-30, 0, 30)}
    wrong = next(c for c in (f"{(int(good) + k) % 10**6:06d}" for k in range(1, 10)) if c not in valid)
    assert security.totp_step(secret, wrong, now=now) is None
    for bad in ("", "12345", "1234567", good + "0", "12a456", "-12345", "+12345", "12.456", "1e5000"):
        assert security.totp_step(secret, bad, now=now) is None, bad


@pytest.mark.parametrize("code", ["１２３４５６", "١٢٣٤٥٦"])
def test_totp_refuses_non_ascii_digits(code):
    assert security.totp_step(security.new_totp_secret(), code) is None


def test_otpauth_uri_is_what_apps_read():
    secret = security.new_totp_secret()
    parsed = pyotp.parse_uri(security.otpauth_uri(secret, "alice", "einvoice-gateway"))
    assert (parsed.secret, parsed.name, parsed.issuer, parsed.digits, parsed.interval) == \
        (secret, "alice", "einvoice-gateway", 6, 30)


def test_recovery_codes_and_their_hashes():
    codes = security.new_recovery_codes()
    assert len(codes) == security.RECOVERY_CODES == len(set(codes))
    for c in codes:
        assert len(c) == 11 and c[5] == "-" and c.replace("-", "").isalnum() and c == c.lower()
    code = codes[0]
    h = security.recovery_hash(code)
    assert h != code and len(h) == 64
    for typed in (code.upper(), code.replace("-", ""), f"  {code.upper().replace('-', ' ')} ", code[:5] + "-" + code[5:]):
        assert security.recovery_hash(typed) == h, typed
    assert security.recovery_hash(codes[1]) != h


def test_tokens_are_random_and_stored_hashed():
    a, b = security.new_token(), security.new_token()
    assert a != b and len(a) >= 43
    assert security.token_hash(a) != a and len(security.token_hash(a)) == 64
    assert security.same(a, a) and not security.same(a, b)
