"""The operator commands over a stopped gateway's store: messages, dead-letters, and the sending side of partners.

``populated`` runs a real instance once per module (mutual-TLS listener, Unix-socket ERP listener,
delivery loop) until its store holds one message in each state an operator meets:

* ``delivered``: the sample from the demo partner, written to the ERP inbox folder;
* ``foreign``: an invoice from a second partner (``acme``), delivered as well;
* ``dead``: an invoice the routes send to an https ERP endpoint that answers 422 (dead-lettered at once);
* ``pending``: an invoice the ERP submitted for partner ``buyer``, whose endpoint refuses connections
  (retried later: pending, one attempt made).

Each test works on its own copy of that stopped instance, so commands that change the store
(retry, requeue) do not leak into other tests.  ``cli.main`` runs in-process; argparse errors are
``SystemExit(2)``.  Listings are tables under a header or JSON (empty: said on stderr, or ``[]``); a
filter naming no partner or destination, or a status not among the allowed ones, is exit 2 saying so;
refusals and unknown ids are exit 2 with their kind (``refused:``, ``not found:``).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from gateway import devpki
from gateway.cli import main as cli
from gateway.cli.common import actor, current_user
from gateway.operations import instance
from gateway.operations.instance import Instance
from gateway.partners.book import load_directory
from tests.helpers import run_command, table_rows
from tests.helpers.messages import BUYER, ERP_REFUSAL, REFUSED_BUYER, populate


def usage_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """An argparse refusal: exit 2, and its message on stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 2
    return capsys.readouterr().err


# --- the populated instance -------------------------------------------------------------------------


@dataclass(frozen=True)
class Populated:
    root: Path
    ids: dict[str, str]  # delivered, foreign, dead, pending → message id


@dataclass(frozen=True)
class State:
    config: str
    root: Path
    ids: dict[str, str]


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Populated:
    inst = instance.init(tmp_path_factory.mktemp("messages") / "gw", port=0)
    ids = asyncio.run(populate(inst))
    return Populated(inst.root, ids)


@pytest.fixture
def state(populated: Populated, tmp_path: Path) -> Iterator[State]:
    root = tmp_path / "gw"
    shutil.copytree(populated.root, root, ignore=shutil.ignore_patterns("*.sock"))
    yield State(str(root / "config.toml"), root, populated.ids)


def listed(capsys: pytest.CaptureFixture[str], state: State, *args: str) -> list[dict[str, Any]]:
    code, out, err = run_command(capsys, "messages", "list", "--json", *args, "-c", state.config)
    assert code == 0, err
    rows: list[dict[str, Any]] = json.loads(out)
    return rows


def show(capsys: pytest.CaptureFixture[str], state: State, key: str) -> dict[str, Any]:
    code, out, err = run_command(capsys, "messages", "show", state.ids[key], "--json", "-c", state.config)
    assert code == 0, err
    detail: dict[str, Any] = json.loads(out)
    return detail


# --- messages list ------------------------------------------------------------------------------------


def test_list_is_a_table_with_a_header(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "messages", "list", "-c", state.config)
    assert code == 0, err
    assert out.split()[:9] == ["MESSAGE", "ID", "DIR", "RECEIVED", "PARTNER", "STATUS", "TYPE", "INVOICE", "AMOUNT"]
    lines = [list(r.values()) for r in table_rows(out)]
    assert all(len(fields) == 8 for fields in lines), out
    by_id = {f[0]: (f[1], f[3], f[4], f[5]) for f in lines}
    ids = state.ids
    assert by_id == {
        ids["delivered"]: ("in", "demo-supplier", "delivered", "ubl:Invoice"),
        ids["dead"]: ("in", "demo-supplier", "dead-letter", "ubl:Invoice"),
        ids["foreign"]: ("in", "acme", "delivered", "ubl:Invoice"),
        ids["pending"]: ("out", "buyer", "accepted", "ubl:Invoice"),
    }
    received = [f[2] for f in lines]
    assert received == sorted(received, reverse=True)  # newest first
    assert {f[6] for f in lines} == {"DEMO-2026-0001", "DEMO-2026-0009", "DEMO-2026-0003"}


def test_list_json(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    rows = listed(capsys, state)
    assert sorted(r["message_id"] for r in rows) == sorted(state.ids.values())
    pending = next(r for r in rows if r["message_id"] == state.ids["pending"])
    assert (pending["direction"], pending["partner"], pending["status"], pending["invoice_number"]) == \
        ("out", "buyer", "accepted", "DEMO-2026-0001")


# A fixed far date, not "tomorrow": a date computed at import made a run across midnight UTC fail.
FUTURE = "2999-01-01"
FILTERS: list[tuple[list[str], set[str]]] = [
    (["--partner", "acme"], {"foreign"}),
    (["--partner", "demo-supplier"], {"delivered", "dead"}),
    (["--partner", "DEMO-Supplier"], {"delivered", "dead"}),  # a registered name in another case
    (["--partner", "buyer"], {"pending"}),  # the recipient, for a message sent out
    (["--status", "delivered"], {"delivered", "foreign"}),
    (["--status", "Delivered"], {"delivered", "foreign"}),  # any case
    (["--status", "DEAD-LETTER"], {"dead"}),
    (["--status", "dead-letter"], {"dead"}),
    (["--status", "dead"], {"dead"}),
    (["--status", "pending"], {"pending"}),
    (["--direction", "out"], {"pending"}),
    (["--direction", "in"], {"delivered", "dead", "foreign"}),
    (["--direction", "in", "--status", "delivered", "--partner", "demo-supplier"], {"delivered"}),
    (["--since", "2000-01-01"], {"delivered", "dead", "foreign", "pending"}),
    (["--until", "2000-01-01"], set()),
    (["--since", FUTURE], set()),
    (["--until", f"{FUTURE}T00:00:00Z"], {"delivered", "dead", "foreign", "pending"}),
    (["--limit", "1"], {"pending"}),  # the newest: submitted last
    (["--limit", "1", "--direction", "in"], {"foreign"}),
]


@pytest.mark.parametrize("args,expected", FILTERS, ids=[" ".join(a) for a, _ in FILTERS])
def test_list_filters(state: State, capsys: pytest.CaptureFixture[str], args: list[str], expected: set[str]) -> None:
    assert {r["message_id"] for r in listed(capsys, state, *args)} == {state.ids[k] for k in expected}


def test_a_partner_removed_since_is_still_a_filter(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_command(capsys, "partners", "remove", "buyer", "-c", state.config)[0] == 0
    assert {r["message_id"] for r in listed(capsys, state, "--partner", "buyer")} == {state.ids["pending"]}


@pytest.mark.parametrize("command", [["messages", "list"], ["dead-letters"], ["quarantine", "list"]])
def test_a_partner_filter_naming_no_partner_is_exit_2(state: State, capsys: pytest.CaptureFixture[str],
                                                       command: list[str]) -> None:
    for extra in ([], ["--json"]):
        code, out, err = run_command(capsys, *command, "--partner", "nobody", *extra, "-c", state.config)
        assert (code, out) == (2, "")
        assert err == "einvoice-gateway: not found: --partner: no partner named 'nobody' (see: einvoice-gateway partners list)\n"


@pytest.mark.parametrize("status", ["bogus", "deliverd", ""])
def test_a_status_not_among_the_allowed_ones_is_exit_2_listing_them(state: State, capsys: pytest.CaptureFixture[str],
                                                                    status: str) -> None:
    err = usage_error(capsys, "messages", "list", "--status", status, "-c", state.config)
    assert f"argument --status: invalid choice: {status.lower()!r} (choose from 'accepted', 'held', 'delivered', " \
           "'dead-letter', 'rejected', 'pending', 'dead')" in err, err


@pytest.mark.parametrize("command", [["messages", "list"], ["dead-letters"]])
def test_a_limit_must_be_a_count(state: State, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    assert "is not a whole number of at least 1" in usage_error(capsys, *command, "--limit", "0", "-c", state.config)


EMPTY = [(["messages", "list", "--until", "2000-01-01"], "no messages"),
         (["dead-letters", "--until", "2000-01-01"], "no dead letters"),
         (["quarantine", "list"], "no invoices are held"),
         (["quarantine", "list", "--all"], "no invoice was ever held")]


@pytest.mark.parametrize(("command", "says"), EMPTY, ids=[" ".join(c) for c, _ in EMPTY])
def test_an_empty_listing_says_so(state: State, capsys: pytest.CaptureFixture[str], command: list[str], says: str) -> None:
    code, out, err = run_command(capsys, *command, "-c", state.config)
    assert (code, out, err) == (0, "", f"{says}\n")
    code, out, err = run_command(capsys, *command, "--json", "-c", state.config)
    assert (code, json.loads(out), err) == (0, [], "")


def test_since_is_inclusive_and_until_exclusive(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    rows = listed(capsys, state)  # newest first
    ids = [r["message_id"] for r in rows]
    for i, row in enumerate(rows):
        assert [r["message_id"] for r in listed(capsys, state, "--since", row["received_at"])] == ids[: i + 1]
        assert [r["message_id"] for r in listed(capsys, state, "--until", row["received_at"])] == ids[i + 1 :]


@pytest.mark.parametrize("command", [["messages", "list", "--since"], ["messages", "list", "--until"],
                                     ["dead-letters", "--since"]])
def test_bad_date_is_a_usage_error(state: State, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    err = usage_error(capsys, *command, "last tuesday", "-c", state.config)
    assert "'last tuesday' is not a date" in err


# --- messages show ------------------------------------------------------------------------------------


def test_show_has_deliveries_and_history(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "messages", "show", state.ids["dead"], "--json", "-c", state.config)
    assert code == 0, err
    dead = json.loads(out)
    assert (dead["message_id"], dead["direction"], dead["partner"], dead["status"]) == \
        (state.ids["dead"], "in", "demo-supplier", "dead-letter")
    assert dead["customer_ids"][0] == REFUSED_BUYER
    [delivery] = dead["deliveries"]
    assert (delivery["destination"], delivery["state"], delivery["attempts"]) == ("erp-api", "dead", 1)
    assert delivery["last_error"] == f"HTTP 422: {ERP_REFUSAL}"
    assert [h["action"] for h in dead["history"]] == ["invoice.accepted", "delivery.dead_letter"]
    assert dead["history"][1]["detail"]["destination"] == "erp-api"
    assert "Demo Buyer BV" not in out and "Voorbeeldstraat" not in out  # never the content

    pending = show(capsys, state, "pending")
    assert (pending["direction"], pending["partner"], pending["route"]) == ("out", "buyer", "outbound")
    [delivery] = pending["deliveries"]
    assert (delivery["destination"], delivery["state"]) == ("partners", "pending")
    assert delivery["attempts"] >= 1 and delivery["last_error"] and delivery["next_attempt_at"]


def test_show_is_labelled_lines_for_people(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "messages", "show", state.ids["dead"], "-c", state.config)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["message", "id:", state.ids["dead"]]
    assert any(line.split() == ["status:", "dead-letter"] for line in lines), out
    assert "deliveries:" in lines and any(line.strip().startswith("- destination:") for line in lines), out
    assert any(line.strip().split() == ["last", "error:", "HTTP", "422:", *ERP_REFUSAL.split()] for line in lines), out
    assert "Demo Buyer BV" not in out and "Voorbeeldstraat" not in out  # never the content


@pytest.mark.parametrize("command", [["messages", "show"], ["quarantine", "show"]])
def test_show_unknown_message(state: State, capsys: pytest.CaptureFixture[str], command: list[str]) -> None:
    for extra in ([], ["--json"]):
        code, out, err = run_command(capsys, *command, "00000000-0000-4000-8000-000000000000", *extra, "-c", state.config)
        assert (code, out) == (2, "")
        assert err.startswith("einvoice-gateway: not found: no ") and "message 00000000-0000-4000-8000-000000000000" in err


# --- retry and requeue ----------------------------------------------------------------------------------


def test_retry_makes_a_waiting_delivery_due_now(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    before = show(capsys, state, "pending")["deliveries"][0]
    code, out, err = run_command(capsys, "messages", "retry", state.ids["pending"], "--by", "alice", "-c", state.config)
    assert code == 0, err
    assert "due now for partners" in out
    after = show(capsys, state, "pending")
    [delivery] = after["deliveries"]
    assert delivery["state"] == "pending" and delivery["attempts"] == before["attempts"]
    assert delivery["next_attempt_at"] <= datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    [retried] = [h for h in after["history"] if h["action"] == "delivery.retried"]
    assert retried["actor"] == actor("alice") and retried["detail"]["destinations"] == ["partners"]
    assert retried["actor"].startswith(f"cli:{current_user()} ") and retried["actor"].endswith("--by alice)")


@pytest.mark.parametrize("key", ["delivered", "dead"])
def test_retry_without_a_waiting_delivery_is_refused(state: State, capsys: pytest.CaptureFixture[str], key: str) -> None:
    code, out, err = run_command(capsys, "messages", "retry", state.ids[key], "-c", state.config)
    assert (code, out) == (2, "")
    assert err.startswith("einvoice-gateway: refused: ") and "no waiting" in err
    assert [h["action"] for h in show(capsys, state, key)["history"] if h["action"].startswith("delivery.re")] == []


def test_requeue_puts_a_dead_letter_back(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "messages", "requeue", state.ids["dead"], "--reason", "ERP cost centre fixed",
                         "--by", "bob", "-c", state.config)
    assert code == 0, err
    assert "requeued for erp-api" in out
    after = show(capsys, state, "dead")
    [delivery] = after["deliveries"]
    assert (delivery["state"], delivery["attempts"]) == ("pending", 0)
    assert after["status"] == "accepted"
    requeued = after["history"][-1]
    assert (requeued["action"], requeued["actor"]) == ("delivery.requeued", actor("bob"))
    assert requeued["detail"] == {"destinations": ["erp-api"], "reason": "ERP cost centre fixed"}
    code, out, err = run_command(capsys, "dead-letters", "-c", state.config)
    assert (code, out, err) == (0, "", "no dead letters\n")


def test_requeue_needs_a_reason(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    err = usage_error(capsys, "messages", "requeue", state.ids["dead"], "-c", state.config)
    assert "--reason" in err
    assert show(capsys, state, "dead")["deliveries"][0]["state"] == "dead"


def test_requeue_without_a_dead_letter_is_refused(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_command(capsys, "messages", "requeue", state.ids["pending"], "--reason", "why not", "-c", state.config)
    assert code == 2
    assert err.startswith("einvoice-gateway: refused: ") and "no dead-lettered delivery" in err


# --- dead-letters -------------------------------------------------------------------------------------


def test_dead_letters_lists_the_refused_delivery(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "dead-letters", "-c", state.config)
    assert code == 0, err
    [row] = table_rows(out)
    assert list(row) == ["MESSAGE ID", "DESTINATION", "PARTNER", "INVOICE", "DEAD SINCE", "ATTEMPTS", "ERROR"]
    assert list(row.values())[:4] == [state.ids["dead"], "erp-api", "demo-supplier", "DEMO-2026-0009"]
    assert row["DEAD SINCE"].startswith("20") and row["ATTEMPTS"] == "1"
    assert row["ERROR"] == f"HTTP 422: {ERP_REFUSAL}"

    code, out, _ = run_command(capsys, "dead-letters", "--json", "-c", state.config)
    [row] = json.loads(out)
    assert (row["message_id"], row["destination"], row["direction"], row["error"]) == \
        (state.ids["dead"], "erp-api", "in", f"HTTP 422: {ERP_REFUSAL}")


@pytest.mark.parametrize("args,found", [
    (["--destination", "erp-api"], True),
    (["--destination", "erp-inbox"], False),
    (["--destination", "partners"], False),
    (["--partner", "Demo-Supplier"], True),
    (["--partner", "demo-supplier"], True),
    (["--partner", "acme"], False),
    (["--since", "2000-01-01"], True),
    (["--since", FUTURE], False),
])
def test_dead_letters_filters(state: State, capsys: pytest.CaptureFixture[str], args: list[str], found: bool) -> None:
    code, out, err = run_command(capsys, "dead-letters", "--json", *args, "-c", state.config)
    assert code == 0, err
    assert [r["message_id"] for r in json.loads(out)] == ([state.ids["dead"]] if found else [])


def test_a_destination_filter_naming_no_destination_is_exit_2(state: State, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_command(capsys, "dead-letters", "--destination", "nowhere", "-c", state.config)
    assert (code, out) == (2, "")
    assert err.startswith("einvoice-gateway: not found: --destination: no destination named 'nowhere' (configured: ")
    assert "erp-api" in err


# --- partners: endpoint and signing of outbound invoices ---------------------------------------------------


def partner_json(capsys: pytest.CaptureFixture[str], inst: Instance, name: str) -> dict[str, Any]:
    code, out, err = run_command(capsys, "partners", "show", name, "--json", "-c", str(inst.config))
    assert code == 0, err
    shown: dict[str, Any] = json.loads(out)
    return shown


def test_partner_endpoint_and_outbound_signing(inst: Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(inst.config)
    cert = devpki.issue(inst.ca, tmp_path / "pki", "buyer", role="client").cert
    code, _, err = run_command(capsys, "partners", "add", "buyer", "--client-cert", str(cert), "--party-id", BUYER,
                       "--endpoint", "https://x.example/v1/invoices", "--sign-outbound", "-c", cfg)
    assert code == 0, err
    shown = partner_json(capsys, inst, "buyer")
    assert (shown["endpoint"], shown["sign_outbound"]) == ("https://x.example/v1/invoices", True)

    code, _, err = run_command(capsys, "partners", "edit", "buyer", "--no-sign-outbound", "-c", cfg)
    assert code == 0, err
    shown = partner_json(capsys, inst, "buyer")
    assert (shown["endpoint"], shown["sign_outbound"]) == ("https://x.example/v1/invoices", False)

    code, _, err = run_command(capsys, "partners", "edit", "buyer", "--endpoint", "https://y.example:8443/v1/invoices",
                       "--sign-outbound", "-c", cfg)
    assert code == 0, err
    partner = load_directory(inst.partners).get("buyer")
    assert partner is not None
    assert (partner.endpoint, partner.sign_outbound) == ("https://y.example:8443/v1/invoices", True)

    demo = partner_json(capsys, inst, instance.DEMO_PARTNER)  # registered without: neither
    assert (demo["endpoint"], demo["sign_outbound"]) == (None, False)


@pytest.mark.parametrize("action", ["add", "edit"])
@pytest.mark.parametrize("url", ["http://x", "http://x.example/v1/invoices", "ftp://x.example/", "https://"])
def test_endpoint_must_be_https(inst: Instance, tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str,
                                url: str) -> None:
    before = inst.partners.read_bytes()
    if action == "add":
        cert = devpki.issue(inst.ca, tmp_path / "pki", "buyer", role="client").cert
        argv = ["partners", "add", "buyer", "--client-cert", str(cert), "--party-id", BUYER, "--endpoint", url]
    else:
        argv = ["partners", "edit", instance.DEMO_PARTNER, "--endpoint", url]
    code, out, err = run_command(capsys, *argv, "-c", str(inst.config))
    assert (code, out) == (2, "")
    assert "--endpoint" in err and "is neither an https:// URL" in err and "nor mailto:ADDRESS" in err
    assert inst.partners.read_bytes() == before
