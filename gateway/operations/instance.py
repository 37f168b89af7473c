"""`init`: a complete, working instance in one folder, with a development PKI and a demo partner."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from .. import devpki
from ..errors import ConfigError
from ..files import atomic_write
from ..partners.edit import register_partner
from ..vault import write_key_file

DEMO_PARTNER = "demo-supplier"
# The supplier identifiers of the bundled sample invoice (gateway/samples/invoice.xml).
DEMO_PARTY_IDS = ("0088:4000001000006", "DE123456789")
DEMO_EMAIL = "billing@demo-supplier.example"
MAIL_HOST = "gateway.localhost"  # init's e-mail domain: the gateway receives at invoices@gateway.localhost


@dataclass(frozen=True, slots=True)
class Instance:
    root: Path
    config: Path
    partners: Path
    https_url: str
    ca: devpki.Issued
    server: devpki.Issued
    demo_client: devpki.Issued
    signing: devpki.Issued
    master_key: Path
    key_id: str
    delivery_folder: Path
    state_dir: Path
    smime: devpki.Issued  # the gateway's S/MIME certificate and key
    demo_smime: devpki.Issued  # the demo partner's
    smtp_host: str
    smtp_port: int
    admin_port: int = 0

    def as_json(self) -> dict[str, object]:
        return {
            "config_file": str(self.config),
            "partners_file": str(self.partners),
            "https_url": self.https_url,
            "ca_certificate": str(self.ca.cert),
            "ca_key": str(self.ca.key),
            "server_certificate": str(self.server.cert),
            "server_key": str(self.server.key),
            "signing_certificate": str(self.signing.cert),
            "signing_key": str(self.signing.key),
            "master_key_file": str(self.master_key),
            "master_key_id": self.key_id,
            "demo_partner_name": DEMO_PARTNER,
            "demo_partner_client_certificate": str(self.demo_client.cert),
            "demo_partner_client_key": str(self.demo_client.key),
            "demo_partner_party_ids": list(DEMO_PARTY_IDS),
            "delivery_folder": str(self.delivery_folder),
            "state_dir": str(self.state_dir),
            "smtp_host": self.smtp_host,
            "smtp_port": self.smtp_port,
            "smtp_address": f"invoices@{MAIL_HOST}",
            "smime_certificate": str(self.smime.cert),
            "smime_key": str(self.smime.key),
            "demo_partner_email": DEMO_EMAIL,
            "demo_partner_smime_certificate": str(self.demo_smime.cert),
            "demo_partner_smime_key": str(self.demo_smime.key),
            "console_url": self.console_url,
            "console_user": "admin",
            "console_password_file": str(self.state_dir / "console-bootstrap-password"),  # written at the first visit
        }

    @property
    def console_url(self) -> str:
        host = self.https_url.split("://", 1)[1].rsplit(":", 1)[0]
        return f"http://{'localhost' if host in ('127.0.0.1', '[::1]') else host}:{self.admin_port}/console/" \
            if self.admin_port else ""


def render_config(host: str, port: int, key_file: str, key_id: str, *, state_dir: str = "state", outbox: str = "outbox",
                  label: str = "made by einvoice-gateway init", config_name: str = "config.toml",
                  smtp_port: int | None = None, mail_host: str = MAIL_HOST) -> str:
    template = files("gateway.operations").joinpath("templates/config.toml").read_text(encoding="utf-8")
    return template.format(label=label, config_name=config_name, host=host, port=port, key_file=key_file,
                           admin_port=port + 2 if port else 0, smtp_port=smtp_port if smtp_port is not None else
                           (port + 3 if port else 0), mail_host=mail_host,
                           key_id=key_id, state_dir=state_dir, outbox=outbox)


# The production example in config/ is this template rendered with these values (a test keeps them equal).
PRODUCTION_EXAMPLE = dict(host="0.0.0.0",  # noqa: S104 (a server listens for partners)
                          port=8443, key_file="keys", key_id="k20261120-0a1b2c3d",
                          state_dir="/var/lib/einvoice-gateway/state", outbox="/var/spool/einvoice-gateway/inbox",
                          label="example for /etc/einvoice-gateway/config.toml",
                          config_name="/etc/einvoice-gateway/config.toml", smtp_port=2525, mail_host="gateway.example.com")


def init(root: Path, *, host: str = "127.0.0.1", port: int = 8443) -> Instance:
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"init: {root} exists and is not empty; choose a new folder")
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    pki = root / "pki"
    ca = devpki.make_ca(pki, "ca")
    server = devpki.issue(ca, pki, "server", role="server", cn="localhost", sans=("localhost", "127.0.0.1", "::1"))
    client = devpki.issue(ca, pki / "clients", DEMO_PARTNER, role="client", cn=f"{DEMO_PARTNER} (demo partner)")
    signing = devpki.issue(ca, pki, "signing", role="signing", cn="einvoice-gateway document signing")
    smime = devpki.issue(ca, pki, "smime", role="smime", cn="einvoice-gateway e-mail", emails=(f"invoices@{MAIL_HOST}",),
                         key_kind="rsa2048")
    demo_smime = devpki.issue(ca, pki / "clients", f"{DEMO_PARTNER}-smime", role="smime", cn=f"{DEMO_PARTNER} (demo partner)",
                              emails=(DEMO_EMAIL,), key_kind="rsa2048")
    keys = root / "keys"
    keys.mkdir(mode=0o700)
    master = write_key_file(keys / "master-1.key")
    for sub in ("state", "outbox"):
        (root / sub).mkdir(mode=0o700)
    config = root / "config.toml"
    atomic_write(config, render_config(host, port, "keys", master.key_id).encode())
    partners = root / "partners.toml"
    atomic_write(partners, b"# Trading partners of this gateway; edit with `einvoice-gateway partners ...`.\n")
    register_partner(partners, DEMO_PARTNER, [client.cert], list(DEMO_PARTY_IDS), [DEMO_EMAIL],
                     verified_by="einvoice-gateway init (demo)", smime_certs=[demo_smime.cert])
    shown_host = f"[{host}]" if ":" in host else host
    return Instance(root, config, partners, f"https://{shown_host}:{port}", ca, server, client, signing,
                    keys / "master-1.key", master.key_id, root / "outbox", root / "state", smime, demo_smime,
                    host, port + 3 if port else 0, port + 2 if port else 0)


def remove(root: Path) -> None:
    if root.exists():
        shutil.rmtree(root)
