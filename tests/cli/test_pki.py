"""gateway/cli/pki.py: ``einvoice-gateway pki issue-partner``, test partners from the development CA.

On an ``init`` instance the command issues a client certificate (and with ``--email`` an S/MIME one)
from the instance's development CA into ``pki/clients/``, keys of mode 0600, and prints the
``partners add`` command that registers them.  The proof is a real peer: ``openssl verify`` against the
CA for each purpose, and the partner's mutual-TLS request to the running gateway, turned away before
that command is run and accepted after.  Refused (exit 2, nothing written): a configuration whose
``https.client_ca`` is not a development CA (one made by openssl, as an operator's would be), a
development CA without its key or with another key beside it, files that exist (unless ``--force``).
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import stat
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from gateway import devpki
from gateway.operations.instance import Instance
from gateway.tls import client_context
from tests.helpers import FOREIGN, FOREIGN_IDS, post, rewrite_config, run_command, run_command_aside, serving

OPENSSL = shutil.which("openssl")
# openssl is the independent verifier of what is issued: required under CI=true, where its absence fails the tests
pytestmark = pytest.mark.skipif(OPENSSL is None and os.environ.get("CI") != "true", reason="openssl is not installed")


def issue(capsys: pytest.CaptureFixture[str], inst: Instance, *args: str) -> tuple[int, str, str]:
    return run_command(capsys, "pki", "issue-partner", *args, "-c", str(inst.config))


def issued(capsys: pytest.CaptureFixture[str], inst: Instance, *args: str) -> dict[str, Any]:
    code, out, err = issue(capsys, inst, "--json", *args)
    assert code == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


def openssl_verify(ca: Path, cert: str, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([OPENSSL or "openssl", "verify", "-CAfile", str(ca), "-purpose", purpose, cert],
                          capture_output=True, text=True, timeout=30)


def mode(path: str) -> int:
    return stat.S_IMODE(Path(path).stat().st_mode)


async def test_an_issued_partner_is_let_in_once_the_printed_command_registered_it(
        inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    ids = [a for i in FOREIGN_IDS for a in ("--party-id", i)]
    code, out, err = await run_command_aside(capsys, "pki", "issue-partner", "acme", *ids, "--json", "-c", str(inst.config))
    assert code == 0, err
    result = json.loads(out)
    clients = inst.root / "pki" / "clients"
    assert (result["client_certificate"], result["client_key"]) == (str(clients / "acme.crt"), str(clients / "acme.key"))
    assert mode(result["client_key"]) == 0o600
    done = openssl_verify(inst.ca.cert, result["client_certificate"], "sslclient")
    assert done.returncode == 0 and done.stdout.strip().endswith(": OK"), done
    words = shlex.split(result["register_command"])
    assert words[:4] == ["einvoice-gateway", "partners", "add", "acme"] and "--smime-cert" not in words
    assert words[-2:] == ["-c", str(inst.config)] and "SCHEME:VALUE" not in words
    ctx = client_context(inst.ca.cert, Path(result["client_certificate"]), Path(result["client_key"]))

    async def send(url: str) -> tuple[int, str]:
        async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(ssl=ctx)) as s:
            answer = await post(s, FOREIGN)
            return answer.status, answer.json.get("error", "") if answer.json else ""

    async with serving(inst, "warning", io.StringIO()) as running:
        assert await send(running.url) == (403, "PARTNER_UNKNOWN")  # issued, not registered: not let in
        code, _, err = await run_command_aside(capsys, *words[1:])  # the printed command, as printed
        assert code == 0, err
        assert running.gw.parts.partners.refresh()
        assert (await send(running.url))[0] == 202


def test_the_smime_certificate_carries_the_email(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = issue(capsys, inst, "mailer", "--email", "AP@Mailer.example")
    assert code == 0, err
    smime = inst.root / "pki" / "clients" / "mailer-smime.crt"
    assert f"S/MIME certificate   {smime}" in out
    assert f"--smime-cert {smime} --email ap@mailer.example --party-id SCHEME:VALUE" in out  # to be filled in: said
    assert "replace SCHEME:VALUE" in out
    cert = x509.load_pem_x509_certificate(smime.read_bytes())
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.RFC822Name) == ["ap@mailer.example"]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.EMAIL_PROTECTION]
    assert openssl_verify(inst.ca.cert, str(smime), "smimesign").returncode == 0
    shown = subprocess.run([OPENSSL or "openssl", "x509", "-in", str(smime), "-noout", "-ext", "subjectAltName"],
                           capture_output=True, text=True, timeout=30)
    assert "email:ap@mailer.example" in shown.stdout, shown
    assert mode(str(smime.with_suffix(".key"))) == 0o600


def test_existing_files_are_not_written_over_without_force(inst: Instance, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "issued"
    first = issued(capsys, inst, "acme", "--out", str(out))
    before = Path(first["client_certificate"]).read_bytes(), Path(first["client_key"]).read_bytes()
    code, stdout, err = issue(capsys, inst, "acme", "--out", str(out))
    assert (code, stdout) == (2, "")
    assert f"refused: pki issue-partner: {out / 'acme.crt'} exists" in err and "--force" in err, err
    assert (Path(first["client_certificate"]).read_bytes(), Path(first["client_key"]).read_bytes()) == before
    code, _, err = issue(capsys, inst, "acme", "--out", str(out), "--email", "ap@acme.example")  # the S/MIME files are new,
    assert code == 2 and "acme.crt exists" in err  # the client's are not
    assert not (out / "acme-smime.crt").exists() and not (out / "acme-smime.key").exists()
    again = issued(capsys, inst, "acme", "--out", str(out), "--force")
    assert Path(again["client_certificate"]).read_bytes() != before[0] and mode(again["client_key"]) == 0o600


def test_a_registered_partner_gets_the_rollover_command(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = issue(capsys, inst, "demo-supplier", "--out", str(inst.root / "rollover"))
    assert code == 0, err
    assert "is registered already" in out
    assert f"einvoice-gateway partners edit demo-supplier --client-cert {inst.root / 'rollover' / 'demo-supplier.crt'} -c" in out


def operators_ca(folder: Path) -> Path:
    """A CA made with openssl, as an operator's production CA would be; its key beside it."""
    folder.mkdir(parents=True)
    subprocess.run([OPENSSL or "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                    "-subj", "/O=Example Corp/CN=Example Partner CA", "-keyout", str(folder / "ca.key"),
                    "-out", str(folder / "ca.crt"), "-days", "30", "-addext", "basicConstraints=critical,CA:TRUE"],
                   check=True, capture_output=True, timeout=30)
    return folder / "ca.crt"


def test_refused_when_the_trusted_ca_is_not_the_development_one(inst: Instance, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    production = operators_ca(tmp_path / "prod")

    def trust(c: dict[str, Any]) -> None:
        c["https"]["client_ca"] = [str(production)]

    rewrite_config(inst.config, trust)
    code, out, err = issue(capsys, inst, "acme")
    assert (code, out) == (2, "")
    assert err.startswith(f"einvoice-gateway: refused: pki issue-partner: https.client_ca trusts {production} "
                          "(CN=Example Partner CA,O=Example Corp); none is a development CA"), err
    assert "never issues from a production CA" in err
    assert not list((inst.root / "pki" / "clients").glob("acme*")) and not list(production.parent.glob("*acme*"))


def test_refused_without_the_development_cas_key(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    inst.ca.key.unlink()
    code, _, err = issue(capsys, inst, "acme")
    assert code == 2
    assert f"refused: pki issue-partner: the development CA {inst.ca.cert} has no key beside it ({inst.ca.key} is absent)" \
        in err, err


def test_refused_with_another_key_beside_the_development_ca(inst: Instance, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    other = devpki.make_ca(tmp_path / "other", "ca")
    inst.ca.key.write_bytes(other.key.read_bytes())
    code, _, err = issue(capsys, inst, "acme")
    assert code == 2 and f"refused: pki issue-partner: {inst.ca.key} is not the key of the development CA" in err, err
    assert not (inst.root / "pki" / "clients" / "acme.crt").exists()


def test_smime_refused_when_mail_does_not_trust_the_development_ca(inst: Instance, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    production = operators_ca(tmp_path / "prod")
    rewrite_config(inst.config, lambda c: c["smtp"].update(partner_ca=[str(production)]))
    code, _, err = issue(capsys, inst, "acme", "--email", "ap@acme.example")
    assert code == 2 and "refused: pki issue-partner: --email: smtp.partner_ca does not trust" in err, err
    assert issue(capsys, inst, "acme")[0] == 0  # a client certificate alone is still fine


def test_issuing_is_recorded_with_who_asked(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    result = issued(capsys, inst, "acme", "--email", "ap@acme.example", "--by", "alice")
    code, out, err = run_command(capsys, "audit", "list", "--json", "-c", str(inst.config))
    assert code == 0, err
    [entry] = [r for r in json.loads(out) if r["action"] == "pki.partner_issued"]
    assert entry["partner"] == "acme" and entry["actor"].endswith("--by alice)"), entry
    assert entry["detail"]["ca"] == str(inst.ca.cert) and entry["detail"]["emails"] == ["ap@acme.example"]
    assert [(c["purpose"], c["file"]) for c in entry["detail"]["certificates"]] == [
        ("client", result["client_certificate"]), ("smime", result["smime_certificate"])]


@pytest.mark.parametrize("args,said", [(["--", "-bad"], "is not a partner name"), (["a/b"], "is not a partner name"),
                                       (["acme", "--email", "not-an-address"], "--email[0]"),
                                       (["acme", "--party-id", ""], "--party-id[0]")], ids=["dash", "slash", "email", "id"])
def test_what_cannot_be_issued_is_a_usage_error(inst: Instance, args: list[str], said: str,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "pki", "issue-partner", "-c", str(inst.config), *args)
    assert code == 2 and "usage error: " in err and said in err, err
    assert not list((inst.root / "pki" / "clients").glob("*bad*"))
