"""Routing: the pure Router (first matching rule wins, else routing.default, else held), then the
whole path through a running gateway with two ERP folders and the `quarantine release --to` command."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import pytest

from gateway.cli.common import actor
from gateway.config.model import Route
from gateway.model import DocumentType, InvoiceFacts
from gateway.operations import instance
from gateway.stages.routing import UNROUTED, Router, matches
from tests.helpers import numbered, post, run_command_aside, serving, stop_delivery_loop, table_rows

FACTS = InvoiceFacts(DocumentType.UBL_INVOICE, "INV-1", "2.1", ("0088:4000001000006",),
                     ("0088:4000002000005", "NL123456789B01"), "urn:cust:1", "urn:prof:1", "2026-11-02")


# --- the Router ------------------------------------------------------------------------------------------


def test_first_matching_rule_wins() -> None:
    router = Router((Route(("first",), partner="globex"), Route(("second", "third"), partner="acme"),
                     Route(("fourth",), partner="acme")), ("default",))
    assert router.route("acme", FACTS) == ("second", "third")
    assert router.explain("acme", FACTS) == "routes[1]"
    assert router.route("globex", FACTS) == ("first",)
    assert router.explain("globex", FACTS) == "routes[0]"


def test_a_rule_without_criteria_matches_everything() -> None:
    router = Router((Route(("catch-all",)), Route(("never",), partner="acme")), ())
    assert router.route("anyone", FACTS) == ("catch-all",)
    assert router.explain("anyone", FACTS) == "routes[0]"


@pytest.mark.parametrize(("criterion", "good", "bad"), [
    ("receiver", "0088:4000002000005", "0088:4000002000006"),
    ("receiver", "NL123456789B01", "NL123456789B02"),  # any of the buyer's identifiers
    ("receiver", "0088:4000002000005", "4000002000005"),  # the scheme is part of the identifier
    ("receiver", "NL123456789B01", "0088:4000001000006"),  # the seller's identifier is not the receiver
    ("partner", "acme", "globex"),
    ("partner", "acme", "ACME"),
    ("document_type", "ubl:Invoice", "ubl:CreditNote"),
    ("document_type", "ubl:Invoice", "cii:CrossIndustryInvoice"),
    ("customization", "urn:cust:1", "urn:cust:2"),
    ("customization", "urn:cust:1", "urn:cust:1 "),
    ("profile", "urn:prof:1", "urn:prof:2"),
])
def test_each_criterion_matches_and_mismatches(criterion: str, good: str, bad: str) -> None:
    hit, miss = Route(("hit",), **{criterion: good}), Route(("hit",), **{criterion: bad})
    assert matches(hit, "acme", FACTS) is True
    assert matches(miss, "acme", FACTS) is False
    assert Router((hit,), ("default",)).route("acme", FACTS) == ("hit",)
    assert Router((miss,), ("default",)).route("acme", FACTS) == ("default",)


@pytest.mark.parametrize("receiver", ["nl123456789b01", "NL 1234.56789.B01", "9944:123456789B01", "VAT:NL123456789B01",
                                      "GLN:4000002000005", "0088:4000 0020 00005", "iso6523-actorid-upis::0088:4000002000005"])
def test_the_receiver_matches_in_any_form(receiver: str) -> None:
    """Identifiers compare by their keys (gateway/identifiers.py): a route names the buyer as an operator writes it."""
    assert matches(Route(("hit",), receiver=receiver), "acme", FACTS) is True


def test_document_types_by_label() -> None:
    credit = replace(FACTS, document_type=DocumentType.UBL_CREDIT_NOTE)
    cii = replace(FACTS, document_type=DocumentType.CII_INVOICE)
    router = Router((Route(("notes",), document_type="ubl:CreditNote"),
                     Route(("cii",), document_type="cii:CrossIndustryInvoice")), ("rest",))
    assert [router.route("acme", f) for f in (FACTS, credit, cii)] == [("rest",), ("notes",), ("cii",)]


def test_every_criterion_of_a_rule_must_match() -> None:
    full = Route(("erp",), receiver="0088:4000002000005", partner="acme", document_type="ubl:Invoice",
                 customization="urn:cust:1", profile="urn:prof:1")
    assert matches(full, "acme", FACTS)
    for change in (dict(receiver="0088:1"), dict(partner="x"), dict(document_type="ubl:CreditNote"),
                   dict(customization="x"), dict(profile="x")):
        assert not matches(replace(full, **change), "acme", FACTS), change  # type: ignore[arg-type]
    assert not matches(full, "globex", FACTS)


def test_unmatched_goes_to_the_default() -> None:
    router = Router((Route(("a",), partner="globex"),), ("b", "c"))
    assert router.route("acme", FACTS) == ("b", "c")
    assert router.explain("acme", FACTS) == "routing.default"
    assert Router((), ("b",)).route("acme", FACTS) == ("b",)


def test_unmatched_with_an_empty_default_is_unrouted() -> None:
    router = Router((Route(("a",), partner="globex"),), ())
    assert router.route("acme", FACTS) == ()
    assert router.explain("acme", FACTS) == "unrouted"
    assert Router((), ()).explain("acme", FACTS) == "unrouted"
    assert "routing.default is empty" in UNROUTED


# --- through a running gateway ---------------------------------------------------------------------------

BUYER = "0088:4000002000005"  # the buyer's EndpointID in the bundled sample invoice


def invoice(number: str, *, other_buyer: bool = False) -> bytes:
    doc = numbered(number)
    if other_buyer:
        doc = doc.replace(b">4000002000005<", b">4000002000099<").replace(b">NL123456789B01<", b">NL999999999B01<")
    return doc


def configure(inst: instance.Instance, routes: str, default: str | None) -> tuple[Path, Path]:
    """Two directory destinations in folders of their own, the given [[routes]] and routing.default."""
    a, b = inst.root / "erp-a", inst.root / "erp-b"
    a.mkdir()
    b.mkdir()
    text = inst.config.read_text()
    old = '[[destinations]]\nname = "erp-inbox"\ntype = "directory"\npath = "outbox"\n'
    assert old in text
    text = text.replace(old, '[[destinations]]\nname = "erp-a"\ntype = "directory"\npath = "erp-a"\n\n'
                             '[[destinations]]\nname = "erp-b"\ntype = "directory"\npath = "erp-b"\n', 1)
    if default is not None:
        text = text.replace("[routing]\n", f"[routing]\ndefault = {default}\n", 1)
    inst.config.write_text(text + "\n" + routes)
    return a, b


def files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_an_invoice_goes_to_its_routes_destination_only(inst: instance.Instance) -> None:
    a, b = configure(inst, f'[[routes]]\nreceiver = "{BUYER}"\ndocument_type = "ubl:Invoice"\ndestinations = ["erp-a"]\n',
                     '["erp-b"]')
    async with serving(inst, "info", io.StringIO()) as gw:
        stop_delivery_loop()
        async with gw.session() as s:
            status, routed = await post(s, invoice("ROUTE-1"))
            assert (status, routed["status"]) == (202, "accepted")
            assert await gw.gw.outbox.run_once() == 1
            mid = str(routed["message_id"])
            assert files(a) == [f"{mid}.json", f"{mid}.xml"] and files(b) == []
            assert (a / f"{mid}.xml").read_bytes() == invoice("ROUTE-1")
            shown = await gw.gw.store.reports.message(mid)
            assert shown is not None and shown.route == "routes[0]"
            assert [d.destination for d in shown.deliveries] == ["erp-a"]

            status, other = await post(s, invoice("ROUTE-2", other_buyer=True))
            assert (status, other["status"]) == (202, "accepted")
            assert await gw.gw.outbox.run_once() == 1
            oid = str(other["message_id"])
            assert files(b) == [f"{oid}.json", f"{oid}.xml"]
            assert files(a) == [f"{mid}.json", f"{mid}.xml"]
            shown = await gw.gw.store.reports.message(oid)
            assert shown is not None and shown.route == "routing.default"


async def test_unrouted_invoice_is_held_until_released_to_a_destination(
        inst: instance.Instance, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = configure(inst, '[[routes]]\nreceiver = "0088:4000002000099"\ndestinations = ["erp-a"]\n', "[]")
    config = str(inst.config)
    async with serving(inst, "info", io.StringIO()) as gw:
        stop_delivery_loop()
        async with gw.session() as s:
            status, receipt = await post(s, invoice("HOLD-1"))
        assert (status, receipt["status"]) == (202, "held")
        mid = str(receipt["message_id"])
        assert "no routing rule" not in str(receipt)  # the sender is not told why
        assert await gw.gw.outbox.run_once() == 0
        assert files(a) == files(b) == []
        shown = await gw.gw.store.reports.message(mid)
        assert shown is not None and shown.route == "unrouted" and shown.deliveries == ()

        capsys.readouterr()
        code, out, _ = await run_command_aside(capsys, "quarantine", "list", "-c", config)
        assert code == 0
        [row] = [r for r in table_rows(out) if r["MESSAGE ID"] == mid]
        assert "no routing rule matches" in row["REASONS"] and row["STATE"] == "held"

        code, out, err = await run_command_aside(capsys, "quarantine", "release", mid, "--reason", "r", "-c", config)
        assert code == 2 and err.startswith("einvoice-gateway: refused: ") and "--to" in err and out == ""
        assert [q.state for q in await gw.gw.store.quarantine.held(None) if q.message_id == mid] == ["held"]  # nothing changed

        code, out, err = await run_command_aside(capsys, "quarantine", "release", mid, "--reason", "r", "--to", "nowhere", "-c", config)
        assert code == 2 and "--to: no destination named 'nowhere'" in err

        code, out, err = await run_command_aside(capsys, "quarantine", "release", mid, "--reason", "r", "--to", "erp-b", "--by", "olga",
                                 "-c", config)
        assert code == 0, err
        assert f"message {mid} released by {actor('olga')}" in out
        assert await gw.gw.outbox.run_once() == 1
        assert files(b) == [f"{mid}.json", f"{mid}.xml"] and files(a) == []
        shown = await gw.gw.store.reports.message(mid)
        assert shown is not None and shown.status == "delivered"
        assert [d.destination for d in shown.deliveries] == ["erp-b"]
        assert shown.quarantine is not None and shown.quarantine.state == "released" and shown.quarantine.decided_by == actor("olga")


async def test_release_without_to_follows_the_routes_configured_now(
        inst: instance.Instance, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = configure(inst, "", "[]")
    async with serving(inst, "info", io.StringIO()) as gw:
        stop_delivery_loop()
        async with gw.session() as s:
            status, receipt = await post(s, invoice("HOLD-2"))
        assert (status, receipt["status"]) == (202, "held")
        mid = str(receipt["message_id"])
        # The operator adds a route for this buyer; the release routes the invoice by it.
        inst.config.write_text(inst.config.read_text() + f'\n[[routes]]\nreceiver = "{BUYER}"\ndestinations = ["erp-a"]\n')
        capsys.readouterr()
        code, _, err = await run_command_aside(capsys, "quarantine", "release", mid, "--reason", "route added", "-c", str(inst.config))
        assert code == 0, err
        assert await gw.gw.outbox.run_once() == 1
        assert files(a) == [f"{mid}.json", f"{mid}.xml"] and files(b) == []


@pytest.mark.slow
async def test_release_to_overrides_the_route_of_an_invoice_held_for_another_reason(
        inst: instance.Instance, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = configure(inst, f'[[routes]]\nreceiver = "{BUYER}"\ndestinations = ["erp-a"]\n', "[]")
    config = str(inst.config)
    assert (await run_command_aside(capsys, "partners", "edit", "demo-supplier", "--amount-ceiling", "EUR:1", "-c", config))[0] == 0
    async with serving(inst, "info", io.StringIO()) as gw:
        stop_delivery_loop()
        async with gw.session() as s:
            status, receipt = await post(s, invoice("CEILING-1"))
        assert (status, receipt["status"]) == (202, "held")  # routed to erp-a, held for the amount
        mid = str(receipt["message_id"])
        code, _, err = await run_command_aside(capsys, "quarantine", "release", mid, "--reason", "r", "--to", "erp-b", "-c", config)
        assert code == 0, err
        assert await gw.gw.outbox.run_once() == 1
        assert files(a) == []
        assert files(b) == [f"{mid}.json", f"{mid}.xml"]
