"""The gateway's own S/MIME identity."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cryptography import x509


@dataclass(frozen=True, slots=True)
class Identity:
    """The gateway's S/MIME certificate and key: partners encrypt to it, the gateway signs with it."""

    certificate: x509.Certificate
    key: Any  # an RSA private key (decryption needs key transport)
    address: str  # the From of the gateway's own mail
