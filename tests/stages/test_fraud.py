"""Fraud checks and quarantine (issue 7), over the real mutual-TLS listener on 127.0.0.1.

* IBAN check digits (ISO 13616 mod 97): a wrong one is refused with 422 INVALID_IBAN and audited.
* A payee account the seller never used before holds the invoice ("held", no reason told), the
  operator releases or rejects it with ``einvoice-gateway quarantine …``, every step audited.
* Amount ceilings per partner (``partners edit --amount-ceiling``), taken up by the running gateway.
* Business duplicates: same seller, number and issue date with other content is 409 DUPLICATE_CONFLICT.
* The ``partners`` options for rule packs and ceilings.

``gateway`` is overridden here only to send the log lines to a buffer (the CLI's output is read with
capsys); the background delivery loop runs, so delivery is checked by polling the destination folder
named in the instance's configuration.  Rules are on (the default "en16931" pack): every invoice built
here from the sample stays EN 16931-valid (amounts are scaled together, so the totals still add up).
"""

from __future__ import annotations

import asyncio
import io
import json
import sqlite3
import tomllib
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import devpki, logs
from gateway.cli import main as cli
from gateway.cli.common import actor
from gateway.cli.demo import SAMPLE
from gateway.operations import instance
from gateway.partners.book import load_directory
from gateway.stages import fraud
from tests.helpers import FOREIGN, FOREIGN_IDS, Running, audit_of, eventually, post, run_command, run_command_aside, serving, table_rows
from tests.helpers.invoices import DEMO, IBAN_A, IBAN_B, IBAN_C, accepted, delivered, invoice, outbox

assert SAMPLE.count(IBAN_A.encode()) == 1
HELD_MESSAGE = "accepted and held for review before delivery"
CII_EXAMPLE = Path("invoices/valid/en16931/cii-examples/CII_example1.xml")  # seller 57151520 / NL8200.98.395.B.01


# --- helpers ----------------------------------------------------------------------------------------


async def get_status(s: aiohttp.ClientSession, message_id: str) -> tuple[dict[str, Any], str]:
    async with s.get(f"/v1/invoices/{message_id}") as r:
        assert r.status == 200, await r.text()
        text = await r.text()
        return json.loads(text), text


async def wait_delivered(gateway: Running, message_id: str) -> None:
    await eventually(lambda: delivered(gateway.inst, message_id), f"delivery of {message_id}", 3.0)


async def delivered_status(gateway: Running, message_id: str) -> bool:
    status = await gateway.gw.store.intake.status(message_id, DEMO)
    return status is not None and status.status == "delivered"


def account_states(gateway: Running, partner: str = DEMO) -> dict[str, str]:
    conn = sqlite3.connect(gateway.gw.store.path)
    try:
        return dict(conn.execute("SELECT account, state FROM seller_accounts WHERE partner = ?", (partner,)))
    finally:
        conn.close()


async def quarantine(capsys: pytest.CaptureFixture[str], gateway: Running, *argv: str) -> tuple[int, str, str]:
    return await run_command_aside(capsys, "quarantine", *argv, "-c", str(gateway.inst.config))


async def partner_reloaded(gateway: Running, check: Callable[[Any], bool], name: str = DEMO) -> None:
    """Wait until the running gateway has re-read the partners file (reload_interval_s = 1.0)."""
    def ok() -> bool:
        p = gateway.gw.parts.partners.current.get(name)
        return p is not None and check(p)

    await eventually(ok, f"partners file reloaded for {name}", 5.0)


@pytest.fixture
async def gateway(inst: instance.Instance) -> AsyncIterator[Running]:
    try:  # log lines must not mix with the CLI output capsys reads
        async with serving(inst, "info", io.StringIO()) as running:
            yield running
    finally:
        logs.configure("warning")


# --- 1. IBAN check digits ----------------------------------------------------------------------------


@pytest.mark.parametrize("iban", [IBAN_A, IBAN_B, IBAN_C, "NO9386011117947", "de89 3704 0044 0532 0130 00",
                                  "NL57 RABO 0107307510"])
def test_iban_valid(iban):
    assert fraud.looks_like_iban(iban)
    assert fraud.iban_valid(iban)


def one_digit_changed(iban: str) -> list[str]:
    """Every variant of ``iban`` with one digit (check digits included) replaced by another."""
    out = []
    for i, c in enumerate(iban):
        if c.isdigit():
            out.extend(iban[:i] + d + iban[i + 1:] for d in "0123456789" if d != c)
    return out


@pytest.mark.parametrize("iban", [IBAN_A, IBAN_B, IBAN_C])
def test_iban_one_digit_changed_is_invalid(iban):
    variants = one_digit_changed(iban)
    assert len(variants) > 100
    for bad in variants:  # mod 97 detects every single-digit substitution
        assert fraud.looks_like_iban(bad), bad
        assert not fraud.iban_valid(bad), bad
    assert not fraud.iban_valid(iban[:2] + iban[3] + iban[2] + iban[4:])  # swapped check digits


@pytest.mark.parametrize("account", ["12345678", "0532013000", "DE89", "NOT AN IBAN", "1234567890123456", "DEXX370400440532013000"])
def test_non_iban_accounts_are_not_taken_for_ibans(account):
    assert not fraud.looks_like_iban(account)


async def test_wrong_iban_check_digits_is_refused_and_audited(gateway, client):
    bad = IBAN_A[:-1] + "1"
    assert fraud.looks_like_iban(bad) and not fraud.iban_valid(bad)
    status, reply = await post(client(), invoice("IBAN-0001", iban=bad))
    assert status == 422, reply
    assert reply["error"] == "INVALID_IBAN"
    assert any(bad in d["message"] for d in reply["details"]), reply
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 0}
    [record] = await audit_of(gateway.gw.store, "fraud.invalid_iban")
    assert (record["actor"], record["partner"], record["message_id"]) == ("gateway", DEMO, None)
    assert bad not in json.dumps(record)  # the audit log keeps no invoice content
    # the corrected invoice goes through; a proprietary (non-IBAN) account is not checked as an IBAN
    assert await accepted(client(), invoice("IBAN-0001"))
    assert await accepted(client(), invoice("IBAN-0002", iban="0532013000"), status="held")  # but it is a new account


@pytest.mark.slow
async def test_iban_spacing_and_case_do_not_make_a_new_account(gateway, client):
    s = client()
    await accepted(s, invoice("SPACE-0001", iban=IBAN_A))
    await accepted(s, invoice("SPACE-0002", iban="de89 3704 0044 0532 0130 00"))
    assert account_states(gateway) == {IBAN_A: "known"}


# --- 2. changed payee account: held, released, rejected -------------------------------------------------


@pytest.mark.slow
async def test_changed_account_is_held_released_and_then_known(gateway, client, capsys):
    s = client()
    # The seller's first invoice: its account is recorded as known, and nothing is held.
    first = await accepted(s, invoice("ACC-0001"))
    [seen] = await audit_of(gateway.gw.store, "account.first_seen")
    assert (seen["partner"], seen["message_id"]) == (DEMO, first)
    assert seen["detail"]["accounts"] == ["DE89…3000"]  # masked in the audit log
    assert account_states(gateway) == {IBAN_A: "known"}
    assert await accepted(s, invoice("ACC-0002"))
    await wait_delivered(gateway, first)

    # A new account: held.  The sender is told only that it is held, never why.
    sent = await post(s, invoice("ACC-0003", iban=IBAN_B))
    code, reply = sent
    assert code == 202, reply
    held = reply["message_id"]
    assert (reply["status"], reply["duplicate"], reply["message"]) == ("held", False, HELD_MESSAGE)
    assert set(reply) == {"message_id", "status", "sha256", "received_at", "duplicate", "message", "rules"}
    for word in ("account", "IBAN", "GB82", "5432", "payee", "never used", "reason"):
        assert word.lower() not in sent.text.lower(), word
    state, text = await get_status(s, held)
    assert (state["status"], state["deliveries"]) == ("held", [])
    for word in ("account", "GB82", "payee", "never used"):
        assert word.lower() not in text.lower(), word
    assert account_states(gateway) == {IBAN_A: "known", IBAN_B: "pending"}
    [record] = await audit_of(gateway.gw.store, "quarantine.held")
    assert (record["message_id"], record["actor"]) == (held, "gateway")
    assert IBAN_B not in json.dumps(record) and "GB82…5432" in json.dumps(record, ensure_ascii=False)

    # Invoices keep being delivered; the held one is not.
    later = await accepted(s, invoice("ACC-0004"))
    await wait_delivered(gateway, later)
    await asyncio.sleep(0.6)  # more than two passes of the delivery loop (0.25 s)
    assert not list(outbox(gateway.inst).glob(f"{held}.*"))

    # A second invoice with the same unreviewed account is held too.
    second = await accepted(s, invoice("ACC-0005", iban=IBAN_B), status="held")

    code, out, err = await quarantine(capsys, gateway, "list")
    assert code == 0, err
    rows = table_rows(out)
    assert [r["MESSAGE ID"] for r in rows] == [held, second]
    assert [rows[0][k] for k in ("STATE", "PARTNER", "INVOICE", "ISSUED")] == ["held", DEMO, "ACC-0003", "2026-11-02"]
    assert rows[0]["AMOUNT"] == "1250.00 EUR" and "GB82…5432" in rows[0]["REASONS"]
    code, out, _ = await quarantine(capsys, gateway, "list", "--json", "--partner", DEMO)
    entries = json.loads(out)
    assert [e["message_id"] for e in entries] == [held, second]
    assert entries[0]["reasons"] == ["payee account GB82…5432 was never used by this seller before"]
    code, out, err = await quarantine(capsys, gateway, "list", "--json", "--partner", "nobody")
    assert (code, out) == (2, "") and "not found: --partner: no partner named 'nobody'" in err

    code, out, err = await quarantine(capsys, gateway, "show", held, "--json")
    assert code == 0, err
    shown = json.loads(out)
    assert (shown["message_id"], shown["state"], shown["invoice_number"]) == (held, "held", "ACC-0003")
    accounts = {a["account"]: a for a in shown["accounts"]}
    assert set(accounts) == {IBAN_A, IBAN_B}
    assert (accounts[IBAN_A]["state"], accounts[IBAN_A]["first_message_id"], accounts[IBAN_A]["this_invoice"]) == \
        ("known", first, False)
    assert (accounts[IBAN_B]["state"], accounts[IBAN_B]["this_invoice"]) == ("pending", True)

    # Release: delivered, audited with who decided, and the account becomes known.
    code, out, err = await quarantine(capsys, gateway, "release", held, "--reason", "confirmed by phone", "--by", "alice")
    assert code == 0, err
    assert f"message {held} released by {actor('alice')}" in out
    await wait_delivered(gateway, held)
    await eventually(lambda: delivered_status(gateway, held), "status delivered", 3.0)
    state, _ = await get_status(s, held)
    assert state["status"] == "delivered"
    assert [d["status"] for d in state["deliveries"]] == ["delivered"]
    sidecar = json.loads((outbox(gateway.inst) / f"{held}.json").read_text())
    assert (sidecar["message_id"], sidecar["invoice_number"]) == (held, "ACC-0003")
    [record] = await audit_of(gateway.gw.store, "quarantine.released")
    assert (record["actor"], record["partner"], record["message_id"]) == (actor("alice"), DEMO, held)
    assert record["detail"] == {"note": "confirmed by phone"}
    assert account_states(gateway)[IBAN_B] == "known"
    code, out, _ = await quarantine(capsys, gateway, "list")
    assert [r["MESSAGE ID"] for r in table_rows(out)] == [second]
    code, out, _ = await quarantine(capsys, gateway, "list", "--all", "--json")
    decided = {e["message_id"]: e for e in json.loads(out)}
    assert (decided[held]["state"], decided[held]["decided_by"], decided[held]["note"]) == \
        ("released", actor("alice"), "confirmed by phone")
    # the sender resending the released invoice hears "accepted", as for any other
    code, reply = await post(s, invoice("ACC-0003", iban=IBAN_B))
    assert (code, reply["message_id"], reply["status"], reply["duplicate"]) == (202, held, "accepted", True)

    # B is known now: the next invoice paying to it is not held.
    after = await accepted(s, invoice("ACC-0006", iban=IBAN_B))
    await wait_delivered(gateway, after)

    # The second held invoice is still held (releasing one does not release the others); reject it.
    assert not delivered(gateway.inst, second)
    code, out, err = await quarantine(capsys, gateway, "reject", second, "--reason", "duplicate of ACC-0003", "--by", "bob")
    assert code == 0, err
    assert f"message {second} rejected by {actor('bob')}" in out
    state, _ = await get_status(s, second)
    assert (state["status"], state["deliveries"]) == ("rejected", [])
    [record] = await audit_of(gateway.gw.store, "quarantine.rejected")
    assert (record["actor"], record["message_id"]) == (actor("bob"), second)
    code, reply = await post(s, invoice("ACC-0005", iban=IBAN_B))
    assert (code, reply["message_id"], reply["status"], reply["duplicate"]) == (202, second, "rejected", True)
    assert "message" not in reply
    await asyncio.sleep(0.6)
    assert not list(outbox(gateway.inst).glob(f"{second}.*"))
    assert account_states(gateway) == {IBAN_A: "known", IBAN_B: "known"}  # B's review was the released invoice's


@pytest.mark.slow
async def test_rejected_invoice_is_never_delivered_and_decided_once(gateway, client, capsys):
    s = client()
    await accepted(s, invoice("REJ-0001"))
    held = await accepted(s, invoice("REJ-0002", iban=IBAN_C), status="held")
    code, out, err = await quarantine(capsys, gateway, "reject", held, "--reason", "account not on file", "--by", "carol")
    assert code == 0, err
    state, _ = await get_status(s, held)
    assert state["status"] == "rejected"
    assert (await gateway.gw.store.reports.counts()).get("deliveries_rejected") == 1
    assert account_states(gateway) == {IBAN_A: "known", IBAN_C: "rejected"}

    # Deciding again, either way, fails with a clear message and changes nothing.
    for action in ("reject", "release"):
        code, out, err = await quarantine(capsys, gateway, action, held, "--reason", "again", "--by", "dave")
        assert code == 2
        assert out == ""
        assert err.startswith(f"einvoice-gateway: refused: message {held} was already rejected")
    assert [r["actor"] for r in await audit_of(gateway.gw.store, "quarantine.rejected")] == [actor("carol")]
    assert await audit_of(gateway.gw.store, "quarantine.released") == []
    # Unknown ids: exit 2 as well.
    for argv in (("release", "no-such-id", "--reason", "x"), ("show", "no-such-id")):
        code, _, err = await quarantine(capsys, gateway, *argv)
        assert code == 2 and "no quarantined message no-such-id" in err
    # A rejected account stays suspect: the next invoice paying to it is held again.
    again = await accepted(s, invoice("REJ-0003", iban=IBAN_C), status="held")

    later = await accepted(s, invoice("REJ-0004"))
    await wait_delivered(gateway, later)
    await asyncio.sleep(0.6)
    assert not list(outbox(gateway.inst).glob(f"{held}.*"))
    assert not list(outbox(gateway.inst).glob(f"{again}.*"))
    state, _ = await get_status(s, held)
    assert state["status"] == "rejected"


@pytest.mark.slow
async def test_account_history_is_per_partner(gateway, client, capsys, tmp_path):
    """Another seller's first invoice to an account the demo partner never used is not held."""
    s = client()
    await accepted(s, invoice("PER-0001"))
    other = devpki.issue(gateway.inst.ca, tmp_path / "other-pki", "other", role="client")
    code, _, err = await run_command_aside(capsys, "partners", "add", "other", "--client-cert", str(other.cert),
                             *[x for pid in FOREIGN_IDS for x in ("--party-id", pid)], "-c", str(gateway.inst.config))
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: True, "other")
    theirs = await accepted(client(other.cert, other.key), invoice("PER-0001", iban=IBAN_B, doc=FOREIGN))
    assert account_states(gateway, "other") == {IBAN_B: "known"}
    assert account_states(gateway) == {IBAN_A: "known"}
    assert [r["message_id"] for r in await audit_of(gateway.gw.store, "account.first_seen") if r["partner"] == "other"] == [theirs]
    await wait_delivered(gateway, theirs)  # (the same number from two sellers is no business duplicate either)


@pytest.mark.slow
async def test_releasing_a_later_held_invoice_makes_its_account_known(gateway, client, capsys):
    s = client()
    await accepted(s, invoice("LATE-0001"))
    first = await accepted(s, invoice("LATE-0002", iban=IBAN_B), status="held")
    second = await accepted(s, invoice("LATE-0003", iban=IBAN_B), status="held")
    code, _, err = await quarantine(capsys, gateway, "release", second, "--reason", "confirmed", "--by", "alice")
    assert code == 0, err
    await wait_delivered(gateway, second)
    # The operator confirmed B by releasing an invoice paying to it: B is known, the next one is not held.
    assert account_states(gateway)[IBAN_B] == "known"
    await accepted(s, invoice("LATE-0004", iban=IBAN_B))
    # and `quarantine show` of the still held first one, or of the second, marks B as this invoice's account
    for mid in (first, second):
        shown = json.loads((await quarantine(capsys, gateway, "show", mid, "--json"))[1])
        assert {a["account"]: a["this_invoice"] for a in shown["accounts"]}[IBAN_B] is True


# --- 3. amount ceilings --------------------------------------------------------------------------------


@pytest.mark.slow
async def test_amount_ceiling_edited_at_runtime(gateway, client, capsys):
    s = client()
    cfg = str(gateway.inst.config)
    assert await accepted(s, invoice("CEIL-0001"))  # 1250.00 EUR, no ceiling yet
    code, out, err = await run_command_aside(capsys, "partners", "edit", DEMO, "--amount-ceiling", "EUR:100", "-c", cfg)
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: p.amount_ceilings == (("EUR", Decimal("100")),))
    shown = json.loads((await run_command_aside(capsys, "partners", "show", DEMO, "--json", "-c", cfg))[1])
    assert shown["amount_ceilings"] == {"EUR": "100"}

    over = await accepted(s, invoice("CEIL-0002"), status="held")  # 1250.00 EUR
    usd = await accepted(s, invoice("CEIL-0003", scale="0.01", currency="USD"), status="held")  # 12.50 USD
    at = await accepted(s, invoice("CEIL-0004", scale="0.08"))  # exactly 100.00 EUR: not over
    under = await accepted(s, invoice("CEIL-0005", scale="0.01"))  # 12.50 EUR
    entries = {e["message_id"]: e for e in json.loads((await quarantine(capsys, gateway, "list", "--json"))[1])}
    assert set(entries) == {over, usd}
    assert entries[over]["reasons"] == ["payable amount 1250.00 EUR is over the ceiling 100"]
    assert (entries[over]["payable_amount"], entries[over]["currency"]) == ("1250.00", "EUR")
    assert entries[usd]["reasons"] == ["currency USD has no amount ceiling for this partner"]
    for mid in (at, under):
        await wait_delivered(gateway, mid)
    await asyncio.sleep(0.3)
    for mid in (over, usd):
        assert not delivered(gateway.inst, mid)
        assert (await get_status(s, mid))[0]["status"] == "held"

    # A ceiling per currency; removing the EUR one lets large EUR invoices through again (USD: ceiling 20).
    code, _, err = await run_command_aside(capsys, "partners", "edit", DEMO, "--remove-amount-ceiling", "EUR", "--amount-ceiling", "USD:20",
                             "-c", cfg)
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: p.amount_ceilings == (("USD", Decimal("20")),))
    await accepted(s, invoice("CEIL-0006", scale="0.01", currency="USD"))
    await accepted(s, invoice("CEIL-0007", currency="USD"), status="held")  # 1250.00 USD
    await accepted(s, invoice("CEIL-0008"), status="held")  # EUR has no ceiling now: held
    code, _, err = await run_command_aside(capsys, "partners", "edit", DEMO, "--remove-amount-ceiling", "USD", "-c", cfg)
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: p.amount_ceilings == ())
    await accepted(s, invoice("CEIL-0009"))
    # The held ones are still held, and can be released.
    code, _, err = await quarantine(capsys, gateway, "release", over, "--reason", "approved by CFO", "--by", "erin")
    assert code == 0, err
    await wait_delivered(gateway, over)


@pytest.mark.parametrize("bad", ["EUR", "EUR:", "eur:100", "EUR:-1", "EUR:abc", "EURO:100", "EUR:NaN", "EUR:Infinity"])
def test_amount_ceiling_option_is_checked(inst, capsys, bad):
    before = inst.partners.read_bytes()
    code, _, err = run_command(capsys, "partners", "edit", DEMO, "--amount-ceiling", bad, "-c", str(inst.config))
    assert code == 2
    assert "--amount-ceiling[0]" in err and "CURRENCY:AMOUNT" in err
    assert inst.partners.read_bytes() == before


# --- 4. business duplicates ------------------------------------------------------------------------------


async def test_business_duplicate(gateway, client):
    s = client()
    original = invoice("DUP-0001")
    first = await accepted(s, original)

    code, reply = await post(s, invoice("DUP-0001", note="Same number, other content."))
    assert code == 409, reply
    assert reply["error"] == "DUPLICATE_CONFLICT"
    assert first in reply["message"]
    assert any(first in d["message"] for d in reply["details"])
    [record] = await audit_of(gateway.gw.store, "fraud.duplicate_conflict")
    assert (record["actor"], record["partner"], record["message_id"]) == ("gateway", DEMO, None)
    assert record["detail"]["transport"] == "https" and record["detail"]["code"] == "DUPLICATE_CONFLICT"
    assert set(record["detail"]) == {"transport", "code", "sha256"}  # a hash of the body, never the body
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1

    # the identical bytes again: a duplicate receipt for the first message
    code, reply = await post(s, original)
    assert (code, reply["message_id"], reply["status"], reply["duplicate"]) == (202, first, "accepted", True)
    # the same number on another day is another invoice
    other_day = await accepted(s, invoice("DUP-0001", issue_date="2026-11-03"))
    assert other_day != first
    # another account on a conflicting invoice: refused as a duplicate before the account is looked at
    code, reply = await post(s, invoice("DUP-0001", iban=IBAN_B, note="Pay elsewhere."))
    assert (code, reply["error"]) == (409, "DUPLICATE_CONFLICT")
    assert account_states(gateway) == {IBAN_A: "known"}
    assert len(await audit_of(gateway.gw.store, "fraud.duplicate_conflict")) == 2
    assert await audit_of(gateway.gw.store, "quarantine.held") == []
    await wait_delivered(gateway, first)
    await wait_delivered(gateway, other_day)


@pytest.mark.slow
@pytest.mark.parametrize(("number", "issue_date"), [
    ("dup-0002", None), ("DUP\u2013 2", None), ("DUP-\u200b0002", None), ("ＤＵＰ－０００２", None),
    ("DUP-0002", "2026-11-02Z"), ("DUP-2", "2026-11-02+02:00"),
], ids=["case-and-zeros", "en-dash-and-space", "zero-width", "full-width", "utc-suffix", "offset"])
async def test_a_business_duplicate_written_differently_is_refused(gateway, client, number: str, issue_date: str | None):
    """Issue 20, item 4: the same invoice number and date, spelt otherwise, is the same invoice (a double payment)."""
    s = client()
    first = await accepted(s, invoice("DUP-0002"))
    code, reply = await post(s, invoice(number, issue_date=issue_date, note="Pay me twice."))
    assert (code, reply["error"]) == (409, "DUPLICATE_CONFLICT"), reply
    assert first in reply["message"] and repr(number) in reply["message"]
    assert (await gateway.gw.store.reports.counts())["invoices"] == 1
    await wait_delivered(gateway, first)


@pytest.mark.slow
async def test_business_duplicate_of_a_held_invoice(gateway, client):
    s = client()
    await accepted(s, invoice("HDUP-0001"))
    body = invoice("HDUP-0002", iban=IBAN_B)
    held = await accepted(s, body, status="held")
    sent = await post(s, body)
    code, reply = sent
    assert (code, reply["message_id"], reply["status"], reply["duplicate"]) == (202, held, "held", True)
    assert reply["message"] == HELD_MESSAGE and "GB82" not in sent.text
    code, reply = await post(s, invoice("HDUP-0002", iban=IBAN_B, note="Other content."))
    assert (code, reply["error"]) == (409, "DUPLICATE_CONFLICT")
    assert held in reply["message"]
    assert (await gateway.gw.store.reports.counts())["invoices"] == 2
    assert len(await gateway.gw.store.quarantine.held()) == 1


@pytest.mark.slow
async def test_business_duplicate_across_syntaxes(cii_inst, gateway, client, capsys, corpus):
    """A CII invoice and a UBL one from the same seller with the same number and issue date: 409."""
    cii_doc = (corpus / CII_EXAMPLE).read_bytes()
    # Let the demo partner own the CII example's seller identifiers (legal registration and VAT number).
    code, _, err = await run_command_aside(capsys, "partners", "edit", DEMO, "--party-id", "57151520", "--party-id", "NL8200.98.395.B.01",
                             "-c", str(cii_inst.config))
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: "57151520" in p.party_ids)
    s = client()
    code, reply = await post(s, cii_doc)
    assert code == 202, reply
    assert reply["status"] == "accepted"
    [pack] = reply["rules"]["packs"]
    assert pack.startswith("en16931 ")
    # the UBL sample with the CII example's number (12115118) and issue date (20150109 → 2015-01-09)
    code, reply2 = await post(s, invoice("12115118", issue_date="2015-01-09"))
    assert code == 409, reply2
    assert reply2["error"] == "DUPLICATE_CONFLICT" and reply["message_id"] in reply2["message"]
    # the same number on another date is fine
    await accepted(s, invoice("12115118", issue_date="2015-01-10"), status="held")  # another account than the CII one
    assert len(await audit_of(gateway.gw.store, "fraud.duplicate_conflict")) == 1


# --- 5. partners CLI: rule packs and ceilings ---------------------------------------------------------------


def test_partners_rules_options(inst, tmp_path, capsys):
    cfg = str(inst.config)
    cert = devpki.issue(inst.ca, tmp_path / "x-pki", "x", role="client").cert
    base = ["partners", "add", "x", "--client-cert", str(cert), "--party-id", "0088:999", "-c", cfg]
    before = inst.partners.read_bytes()

    code, out, err = run_command(capsys, *base, "--rules", "en16931,nope")
    assert code == 2
    assert "'nope'" in err and "--rules" in err and "en16931" in err
    assert inst.partners.read_bytes() == before
    assert not list((inst.root / "partner-certs").glob("x-*"))  # no stray certificate left behind

    with pytest.raises(SystemExit) as exc:
        cli.main([*base, "--rules", "en16931", "--no-rules"])
    assert exc.value.code == 2

    code, out, err = run_command(capsys, *base, "--no-rules", "--amount-ceiling", "EUR:50000", "--amount-ceiling", "CHF:1000.50")
    assert code == 0, err
    assert "warning" in err and "not be checked against any business rules" in err
    [entry] = [p for p in tomllib.loads(inst.partners.read_text())["partners"] if p["name"] == "x"]
    assert entry["rules"] == []
    assert sorted(entry["amount_ceilings"]) == ["CHF:1000.50", "EUR:50000"]
    x = load_directory(inst.partners).get("x")
    assert x is not None and x.rules == ()
    shown = json.loads(run_command(capsys, "partners", "show", "x", "--json", "-c", cfg)[1])
    assert shown["rules"] == []
    assert shown["amount_ceilings"] == {"CHF": "1000.50", "EUR": "50000"}
    code, _, err = run_command(capsys, "check-config", "-c", cfg)
    assert code == 0 and "partner 'x' is registered with --no-rules" in err

    # the demo partner uses the configured default
    shown = json.loads(run_command(capsys, "partners", "show", DEMO, "--json", "-c", cfg)[1])
    assert (shown["rules"], shown["amount_ceilings"]) == ("default (en16931)", {})

    code, _, err = run_command(capsys, "partners", "edit", "x", "--rules", "nope", "-c", cfg)
    assert code == 2 and "'nope'" in err
    code, _, err = run_command(capsys, "partners", "edit", "x", "--rules", "en16931", "-c", cfg)
    assert code == 0, err
    assert json.loads(run_command(capsys, "partners", "show", "x", "--json", "-c", cfg)[1])["rules"] == ["en16931"]
    code, _, err = run_command(capsys, "partners", "edit", "x", "--default-rules", "--remove-amount-ceiling", "CHF", "-c", cfg)
    assert code == 0, err
    shown = json.loads(run_command(capsys, "partners", "show", "x", "--json", "-c", cfg)[1])
    assert (shown["rules"], shown["amount_ceilings"]) == ("default (en16931)", {"EUR": "50000"})
    [entry] = [p for p in tomllib.loads(inst.partners.read_text())["partners"] if p["name"] == "x"]
    assert "rules" not in entry


async def test_no_rules_partner_skips_business_rules_but_not_fraud_checks(gateway, client, capsys, tmp_path):
    """--no-rules: an invoice breaking EN 16931 (totals that do not add up) is accepted; the IBAN
    check and the account history still apply."""
    other = devpki.issue(gateway.inst.ca, tmp_path / "nr-pki", "nr", role="client")
    code, _, err = await run_command_aside(capsys, "partners", "add", "nr", "--client-cert", str(other.cert), "--no-rules",
                             *[x for pid in FOREIGN_IDS for x in ("--party-id", pid)], "-c", str(gateway.inst.config))
    assert code == 0, err
    await partner_reloaded(gateway, lambda p: p.rules == (), "nr")
    s = client(other.cert, other.key)
    broken = invoice("NR-0001", doc=FOREIGN).replace(b">1250.00</cbc:PayableAmount>", b">1249.00</cbc:PayableAmount>")
    code, reply = await post(s, broken)
    assert (code, reply["status"]) == (202, "accepted"), reply
    assert "rules" not in reply
    code, reply = await post(s, invoice("NR-0002", iban=IBAN_B[:-1] + "3", doc=FOREIGN))
    assert (code, reply["error"]) == (422, "INVALID_IBAN")
    await accepted(s, invoice("NR-0003", iban=IBAN_B, doc=FOREIGN), status="held")


async def test_default_rules_refuse_totals_that_do_not_add_up(gateway, client):
    """The counterpart of the --no-rules test: for a partner with the default rules the same broken
    totals are refused with 422 RULES_FAILED (BR-CO-16), not stored."""
    broken = invoice("RULES-0001").replace(b">1250.00</cbc:PayableAmount>", b">1249.00</cbc:PayableAmount>")
    code, reply = await post(client(), broken)
    assert (code, reply["error"]) == (422, "RULES_FAILED"), reply
    assert any("BR-CO-16" in d["message"] for d in reply["details"]), reply
    assert (await gateway.gw.store.reports.counts()) == {"invoices": 0}
