"""gateway/cli/documents.py: ``sign`` and ``verify``, the gateway's XML signature on an invoice file by hand.

Signed with the instance's [signing] key or a --cert/--key pair (RSA keys under 3072 bits refused),
verified against a pinned certificate: another key, or a changed IBAN, is INVALID (exit 1, nothing on
stdout); the result is labelled lines, or JSON with --json.  ``sign`` refuses, in one line and never
with a traceback, an existing OUTPUT without --force, a document signed already, one that is not XML, an input it cannot read, and
--cert without --key.  ``Pki`` and its signers are in tests/helpers/signatures.py; the corpus's signed documents are
verified with ``verify`` in tests/stages/test_signature_corpus.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway import devpki
from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from tests.helpers import run_command
from tests.helpers.signatures import DIGEST_MISMATCH, EVIL_IBAN, IBAN, Pki, signing_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return signing_pki(tmp_path_factory.mktemp("sigpki"))


def test_cli_sign_and_verify(inst: instance.Instance, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in.xml", tmp_path / "out.xml"
    src.write_bytes(SAMPLE)
    assert run_command(capsys, "sign", str(src), str(out), "-c", str(inst.config))[0] == 0
    code, stdout, err = run_command(capsys, "verify", str(out), "--cert", str(inst.signing.cert))
    assert code == 0, err
    assert "file:" in stdout and "valid:" in stdout and "yes" in stdout.split("valid:")[1].splitlines()[0], stdout
    code, stdout, err = run_command(capsys, "verify", str(out), "--cert", str(inst.signing.cert), "--json")
    assert code == 0, err
    shown = json.loads(stdout)
    assert (shown["valid"], shown["signer_pinned"], shown["method"], shown["xades"]) == (True, True, "ECDSA_SHA256", True)

    code, _, err = run_command(capsys, "verify", str(out), "--cert", str(inst.demo_client.cert))  # another key
    assert code == 1 and "is not registered" in err, err
    bad = tmp_path / "tampered.xml"
    bad.write_bytes(out.read_bytes().replace(IBAN.encode(), EVIL_IBAN.encode()))
    code, stdout, err = run_command(capsys, "verify", str(bad), "--cert", str(inst.signing.cert))
    assert (code, stdout) == (1, "") and DIGEST_MISMATCH in err, err

    rsa_out = tmp_path / "rsa.xml"
    key = pki.rsa.cert_path.with_suffix(".key")
    assert run_command(capsys, "sign", str(src), str(rsa_out), "--cert", str(pki.rsa.cert_path), "--key", str(key))[0] == 0
    code, stdout, _ = run_command(capsys, "verify", str(rsa_out), "--cert", str(pki.rsa.cert_path), "--json")
    assert code == 0 and json.loads(stdout)["method"] == "RSA_SHA256"
    rsa2048 = devpki.issue(pki.ca, tmp_path, "rsa2048", role="signing", key_kind="rsa2048")
    code, _, err = run_command(capsys, "sign", str(src), str(tmp_path / "x.xml"), "--cert", str(rsa2048.cert), "--key", str(rsa2048.key))
    assert code == 2 and err.startswith("einvoice-gateway: usage error: --cert/--key: ") and "at least 3072 bits" in err, err


def test_sign_refuses_a_signed_document_in_one_line(inst: instance.Instance, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    src, once, twice = tmp_path / "in.xml", tmp_path / "once.xml", tmp_path / "twice.xml"
    src.write_bytes(SAMPLE)
    assert run_command(capsys, "sign", str(src), str(once), "-c", str(inst.config))[0] == 0
    code, out, err = run_command(capsys, "sign", str(once), str(twice), "-c", str(inst.config))
    assert (code, out) == (2, "")
    assert err == (f"einvoice-gateway: refused: {once} is signed already; sign the unsigned original "
                   f"(einvoice-gateway verify {once} checks the signature it has)\n")
    assert not twice.exists()


def test_sign_keeps_an_existing_output_unless_forced(inst: instance.Instance, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    src, out = tmp_path / "in.xml", tmp_path / "out.xml"
    src.write_bytes(SAMPLE)
    out.write_bytes(b"the ERP's own file")
    code, stdout, err = run_command(capsys, "sign", str(src), str(out), "-c", str(inst.config))
    assert (code, stdout) == (2, "")
    assert err == f"einvoice-gateway: refused: {out} exists; give another OUTPUT, or --force to replace it\n"
    assert out.read_bytes() == b"the ERP's own file"
    assert run_command(capsys, "sign", str(src), str(out), "-c", str(inst.config), "--force")[0] == 0
    assert run_command(capsys, "verify", str(out), "--cert", str(inst.signing.cert))[0] == 0
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize(("given", "says"), [
    ("missing", "einvoice-gateway: usage error: {input}: cannot read it (No such file or directory)"),
    ("not-xml", "einvoice-gateway: refused: {input}: the body is not well-formed XML"),
])
def test_sign_refuses_an_input_it_cannot_sign(inst: instance.Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              given: str, says: str) -> None:
    src = tmp_path / f"{given}.xml"
    if given == "not-xml":
        src.write_text("<Invoice")
    code, out, err = run_command(capsys, "sign", str(src), str(tmp_path / "out.xml"), "-c", str(inst.config))
    assert (code, out) == (2, "")
    assert err.startswith(says.format(input=src)) and err.count("\n") == 1, err
    assert not (tmp_path / "out.xml").exists()


@pytest.mark.parametrize("option", ["--cert", "--key"])
def test_sign_takes_cert_and_key_together(inst: instance.Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                          option: str) -> None:
    src = tmp_path / "in.xml"
    src.write_bytes(SAMPLE)
    code, out, err = run_command(capsys, "sign", str(src), str(tmp_path / "out.xml"), option, str(inst.signing.cert),
                                 "-c", str(inst.config))
    assert (code, out) == (2, "")
    assert err.startswith("einvoice-gateway: usage error: --cert and --key go together"), err

