"""einvoice-gateway: a self-hosted, security-first e-invoice gateway."""

__version__ = "0.1.0"
