"""gateway/cli/documents.py: ``sign`` and ``verify``, the gateway's XML signature on an invoice file by hand.

Signed with the instance's [signing] key or a --cert/--key pair (RSA keys under 3072 bits refused),
verified against a pinned certificate: another key, or a changed IBAN, is INVALID (exit 1, nothing on
stdout).  ``Pki`` and its signers are in tests/helpers/signatures.py; the corpus's signed documents are
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
    code, stdout, _ = run_command(capsys, "verify", str(rsa_out), "--cert", str(pki.rsa.cert_path))
    assert code == 0 and json.loads(stdout)["method"] == "RSA_SHA256"
    rsa2048 = devpki.issue(pki.ca, tmp_path, "rsa2048", role="signing", key_kind="rsa2048")
    code, _, err = run_command(capsys, "sign", str(src), str(tmp_path / "x.xml"), "--cert", str(rsa2048.cert), "--key", str(rsa2048.key))
    assert code == 2 and "at least 3072 bits" in err, err

