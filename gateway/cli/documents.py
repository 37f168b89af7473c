"""``einvoice-gateway sign`` and ``verify``: the gateway's XML signature on an invoice file, by hand."""

from __future__ import annotations

import argparse
import base64
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from lxml import etree

from ..config.load import load
from ..config.model import DEFAULT_XML_LIMITS
from ..config.reader import check_secret_file
from ..errors import ConfigError, GatewayError, Rejected
from ..files import atomic_write
from ..stages.signature import NS, SigningKey, find_signatures, sign, trusted, verify
from ..stages.xmlparse import XmlParser
from ..tls import inspect_certificate
from .common import with_config, with_json
from .errors import Refused, UsageError, said_as
from .output import record


def add_parsers(sub: Any) -> None:
    sg = with_config(sub.add_parser("sign", help="add the gateway's XAdES-BES signature to an invoice"))
    sg.add_argument("input", help="the invoice to sign (UBL or CII XML; refused if it is signed already)")
    sg.add_argument("output", help="where to write the signed invoice (refused if it exists, unless --force)")
    sg.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    sg.add_argument("--cert", help="signing certificate (default: [signing] of the configuration)")
    sg.add_argument("--key", help="signing key (default: [signing] of the configuration)")
    vf = sub.add_parser("verify", help="verify the XML signature of an invoice")
    vf.add_argument("file", help="the signed invoice")
    vf.add_argument("--cert", action="append", default=[],
                    help="trusted signing certificate (PEM); without one, only integrity is checked against the embedded certificate")
    with_json(vf, "the result")


def run(args: argparse.Namespace) -> int:
    return _sign(args) if args.command == "sign" else _verify(args)


def _sign(args: argparse.Namespace) -> int:
    if bool(args.cert) != bool(args.key):
        raise UsageError("--cert and --key go together (or give neither: the configuration's [signing] key signs)")
    if args.cert and args.key:
        cert_path, key_path = Path(args.cert), Path(args.key)
        with said_as(UsageError):
            check_secret_file(key_path, "--key")
    else:
        cfg = load(args.config)
        if cfg.signing is None:
            raise ConfigError("signing: the configuration has no [signing] section (or give --cert and --key)")
        cert_path, key_path = cfg.signing.certificate, cfg.signing.private_key
    try:
        signer = SigningKey.load(cert_path.read_bytes(), key_path.read_bytes())
    except (OSError, ValueError) as exc:
        if args.cert and args.key:
            raise UsageError(f"--cert/--key: {exc}") from None
        raise ConfigError(f"signing: {exc}") from None
    output = Path(args.output)
    if output.exists() and not args.force:
        raise Refused(f"{output} exists; give another OUTPUT, or --force to replace it")
    try:
        document = Path(args.input).read_bytes()
    except OSError as exc:
        raise UsageError(f"{args.input}: cannot read it ({exc.strerror})") from None
    try:
        root = XmlParser(DEFAULT_XML_LIMITS).parse(document).root
    except Rejected as exc:
        raise Refused(f"{args.input}: {exc.message}") from None
    if find_signatures(root):  # a document with two would fail verify(): exactly one ds:Signature is allowed
        raise Refused(f"{args.input} is signed already; sign the unsigned original "
                      f"(einvoice-gateway verify {args.input} checks the signature it has)")
    sign(root, signer)
    atomic_write(output, etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8"), 0o644)
    print(f"signed {args.input} → {args.output} ({signer.method.name}, signer {signer.cert.subject.rfc4514_string()})")
    return 0


def _verify(args: argparse.Namespace) -> int:
    try:
        root = XmlParser(DEFAULT_XML_LIMITS).parse(Path(args.file).read_bytes()).root
        if args.cert:
            signers = trusted(inspect_certificate(Path(c), f"--cert[{i}]").cert for i, c in enumerate(args.cert))
        else:
            found = root.xpath("//ds:Signature/ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NS)
            if not found:
                print(f"{args.file}: INVALID: no ds:X509Certificate to check against; give --cert", file=sys.stderr)
                return 1
            signers = trusted([x509.load_der_x509_certificate(base64.b64decode("".join("".join(found[0].itertext()).split())))])
        info = verify(root, signers, valid_now=False)  # an archived document: validity at its signing time
    except GatewayError as exc:
        print(f"{args.file}: INVALID: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"{args.file}: INVALID: {exc}", file=sys.stderr)
        return 1
    record({"file": args.file, "valid": True, "signer_pinned": bool(args.cert), **info.as_json()}, args.json)
    if not args.cert:
        print("note: integrity only; the signer was taken from the document itself, not pinned (use --cert)", file=sys.stderr)
    return 0
