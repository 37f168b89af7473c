"""Invoices made from the sample for the fraud checks (payee accounts, amounts, currencies), sent and followed."""

from __future__ import annotations

import io
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
from lxml import etree
from pypdf import PdfWriter

from gateway.cli.demo import SAMPLE
from gateway.config import load as config_mod
from gateway.operations import instance
from tests.helpers import post

NS = {
    "cbc": "urn:oasis:names:specification:ubl:schema:xsd:CommonBasicComponents-2",
    "cac": "urn:oasis:names:specification:ubl:schema:xsd:CommonAggregateComponents-2",
}


IBAN_A = "DE89370400440532013000"  # the sample's own payee account


IBAN_B = "GB82WEST12345698765432"


IBAN_C = "NL91ABNA0417164300"


DEMO = instance.DEMO_PARTNER


def invoice(number: str, *, iban: str = IBAN_A, issue_date: str | None = None, note: str | None = None,
            scale: str | None = None, currency: str | None = None, doc: bytes = SAMPLE) -> bytes:
    """The sample invoice with another number (and payment id), payee account, issue date, note,
    amounts or currency, edited with lxml so that it stays schema- and EN 16931-valid: every amount
    is multiplied by ``scale`` (quantities are unchanged, so line and document totals still add up)."""
    root = etree.fromstring(doc)

    def one(path: str) -> Any:
        [el] = root.xpath(path, namespaces=NS)
        return el

    one("/*/cbc:ID").text = number
    one("/*/cac:PaymentMeans/cbc:PaymentID").text = number
    one("/*/cac:PaymentMeans/cac:PayeeFinancialAccount/cbc:ID").text = iban
    if issue_date is not None:
        one("/*/cbc:IssueDate").text = issue_date
    if note is not None:
        one("/*/cbc:Note").text = note
    amounts = root.xpath("//*[@currencyID]")
    assert amounts, "the sample has no amounts"
    if scale is not None:
        for el in amounts:
            el.text = str((Decimal(el.text) * Decimal(scale)).quantize(Decimal("0.01")))
    if currency is not None:
        one("/*/cbc:DocumentCurrencyCode").text = currency
        for el in amounts:
            el.set("currencyID", currency)
    return etree.tostring(root.getroottree(), xml_declaration=True, encoding="UTF-8")


async def accepted(s: aiohttp.ClientSession, body: bytes, status: str = "accepted") -> str:
    code, reply = await post(s, body)
    assert (code, reply.get("status"), reply.get("duplicate")) == (202, status, False), reply
    return str(reply["message_id"])


def outbox(inst: instance.Instance) -> Path:
    """The folder of the directory destination, as the instance's configuration names it."""
    [dest] = config_mod.load(inst.config).destinations
    return dest.path


def delivered(inst: instance.Instance, message_id: str) -> bool:
    return (outbox(inst) / f"{message_id}.xml").exists()


def pdf_with(*attachments: tuple[str, bytes]) -> bytes:
    """A one-page PDF written by pypdf with these embedded files (stored uncompressed), as (name, data)."""
    writer = PdfWriter()
    writer.add_blank_page(width=595, height=842)
    for name, data in attachments:
        writer.add_attachment(name, data)
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


PDF_PAGES = b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>"  # objects 2 and 3 of a hand-written one-page PDF
PDF_PAGE = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] >>"


def pdf_of(*objects: bytes) -> bytes:
    """A PDF written byte by byte from the bodies of its objects, numbered from 1 (the first is the catalog):
    what pypdf's writer cannot make (compressed or oddly referenced attachments)."""
    out, offsets = bytearray(b"%PDF-1.7\n"), []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)

