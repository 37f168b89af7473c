"""The image's health check: GET /readyz on the admin listener named in the configuration; exit 0 when ready.

Runs inside the container with the gateway's own Python and only the standard library (no curl in the
image).  The admin listener is [admin] listen_host/listen_port (default 127.0.0.1:8445); a wildcard
address is probed on loopback.  With admin.token_file the probe sends the bearer token; on an address
other than loopback the listener speaks HTTPS with the [https] certificate, and the probe trusts exactly
that certificate (it connects by address, so no host name check).  Exit 1, with the reason on stdout
(``podman healthcheck run`` shows it).
"""

from __future__ import annotations

import http.client
import json
import os
import ssl
import sys
import tomllib
from pathlib import Path

TIMEOUT_S = 4.0  # below the HEALTHCHECK --timeout of the Containerfile
DEFAULT_CONFIG = "/etc/einvoice-gateway/config.toml"
LOOPBACK = ("127.0.0.1", "::1", "localhost")  # as gateway/config/model.py AdminConfig.loopback


def probe(config_path: Path) -> str | None:
    """None when the gateway is ready, else why not."""
    config = tomllib.loads(config_path.read_text(encoding="utf-8"))
    admin = config.get("admin", {})
    host, port = admin.get("listen_host", "127.0.0.1"), admin.get("listen_port", 8445)
    if not port:
        return "the admin listener is off (admin.listen_port = 0): nothing to probe"
    # The gateway serves the admin listener over HTTPS exactly when it is not on loopback (AdminConfig.loopback).
    tls = host not in LOOPBACK
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host).strip("[]")  # noqa: S104 (a wildcard is probed on loopback)
    base = config_path.parent
    headers = {}
    if "token_file" in admin:
        headers["Authorization"] = "Bearer " + (base / admin["token_file"]).read_text(encoding="utf-8").strip()
    if tls:
        context = ssl.create_default_context(cafile=str(base / config.get("https", {}).get("certificate", "")))
        context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # the certificate itself is the trust anchor,
        context.check_hostname = False  # whatever its issuer and the names in it
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(host, port, timeout=TIMEOUT_S, context=context)
    else:
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT_S)
    try:
        conn.request("GET", "/readyz", headers=headers)
        reply = conn.getresponse()
        body = reply.read(4096)
    except OSError as exc:
        return f"no answer from the admin listener at {host}:{port} ({exc})"
    finally:
        conn.close()
    if reply.status == 200:
        return None
    try:
        reason = json.loads(body).get("reason", "")
    except ValueError:
        reason = ""
    return f"/readyz answered {reply.status}" + (f": {reason}" if reason else "")


def main() -> int:
    config = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EINVOICE_GATEWAY_CONFIG", DEFAULT_CONFIG))
    try:
        reason = probe(config)
    except (OSError, ValueError) as exc:  # an unreadable or broken configuration: not ready, and say why
        reason = f"cannot read {config}: {exc}"
    print("ready" if reason is None else f"not ready: {reason}")
    return 0 if reason is None else 1


if __name__ == "__main__":
    sys.exit(main())
