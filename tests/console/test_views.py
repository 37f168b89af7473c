"""What the message pages read (``gateway/console/views.py``): a search form's dates as the prefix the
store compares with, and one page of messages at a time, shaped for the templates.

The paging is checked against a store that records what it was asked; the dates and the shaping
against the real store of the package's one gateway (tests/console/conftest.py), read only.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import pytest

from gateway.console import views
from gateway.storage.records import MessageSummary
from tests.helpers.console import shared


def summary(i: int, document_type: str = "ubl:Invoice") -> MessageSummary:
    return MessageSummary(f"m{i:04d}", "inbound", "acme", f"2026-03-01T10:{i // 60:02d}:{i % 60:02d}.000000Z",
                          document_type, f"INV-{i}", "100.00", "EUR", "delivered")


class CountingReports:
    """A store's reports that hold ``total`` messages and record each search they answer."""

    def __init__(self, total: int):
        self.rows = [summary(i) for i in range(total)]
        self.asked: list[dict[str, Any]] = []

    async def search(self, **kw: Any) -> list[MessageSummary]:
        self.asked.append(kw)
        return self.rows[kw["offset"]:kw["offset"] + kw["limit"]]


# --- 1. dates from the search form -----------------------------------------------------------------------


def test_a_day_is_the_start_of_that_day_in_utc():
    assert views.parse_day("2026-03-01", "from") == "2026-03-01T00:00:00"
    assert views.parse_day(" 2024-02-29 ", "until") == "2024-02-29T00:00:00"  # spaces around, a leap day
    assert views.parse_day("", "from") is None and views.parse_day("   ", "until") is None  # no bound


@pytest.mark.parametrize("text", ["2026-3-1", "01.03.2026", "20260301", "2026-03-01T00:00", "2026-03-01 12:00",
                                  "2026/03/01", "'; DROP TABLE invoices; --"])
def test_other_shapes_of_a_day_are_refused_naming_the_field(text):
    with pytest.raises(ValueError, match="^until: give a date as YYYY-MM-DD$"):
        views.parse_day(text, "until")


@pytest.mark.parametrize("text", ["2026-02-30", "2025-02-29", "2026-13-01", "2026-00-10", "２０２６-０３-０１"])
def test_days_that_do_not_exist_are_refused(text):
    with pytest.raises(ValueError):
        views.parse_day(text, "from")


# --- 2. one page at a time --------------------------------------------------------------------------------


async def test_a_page_is_fifty_messages_and_says_whether_more_follow():
    reports = CountingReports(120)
    first, more = await views.search(reports)
    assert [r["message_id"] for r in first] == [f"m{i:04d}" for i in range(50)] and more
    third, more = await views.search(reports, page=2)
    assert [r["message_id"] for r in third] == [f"m{i:04d}" for i in range(100, 120)] and not more
    assert [(a["offset"], a["limit"]) for a in reports.asked] == [(0, 51), (100, 51)]  # one more than shown: "more?"
    exactly, more = await views.search(CountingReports(50))
    assert len(exactly) == 50 and not more


async def test_the_page_number_is_bounded():
    reports = CountingReports(0)
    for asked in (-1, -10_000, views.MAX_PAGES, views.MAX_PAGES + 1, 10**9):
        assert await views.search(reports, page=asked) == ([], False)
    assert [a["offset"] for a in reports.asked] == [0, 0] + [views.MAX_PAGES * views.PAGE] * 3


async def test_the_filters_reach_the_store_as_given():
    reports = CountingReports(3)
    await views.search(reports, partner="acme", status="held", since="2026-03-01T00:00:00", until="2026-04-01T00:00:00",
                       number="INV-7", amount="100.00", page=1)
    assert reports.asked == [{"partner": "acme", "status": "held", "since": "2026-03-01T00:00:00",
                              "until": "2026-04-01T00:00:00", "number": "INV-7", "amount": "100.00", "offset": 50, "limit": 51}]


async def test_a_row_is_the_summary_with_the_document_type_without_its_syntax():
    reports = CountingReports(0)
    reports.rows = [summary(1, "ubl:Invoice"), summary(2, "ubl:CreditNote"), summary(3, "cii:CrossIndustryInvoice")]
    rows, _ = await views.search(reports)
    assert [r["document_type"] for r in rows] == ["Invoice", "CreditNote", "CrossIndustryInvoice"]
    assert rows[0] == {"message_id": "m0001", "direction": "inbound", "partner": "acme",
                       "received_at": "2026-03-01T10:00:01.000000Z", "document_type": "Invoice", "invoice_number": "INV-1",
                       "payable_amount": "100.00", "currency": "EUR", "status": "delivered"}


# --- 3. on the real store ----------------------------------------------------------------------------------


@shared
async def test_days_bound_the_search_on_the_real_store(world):
    reports = world.store.reports
    delivered = await reports.message(world.ids["delivered"])
    day = date.fromisoformat(delivered.received_at[:10])
    before, after = (str(day - timedelta(days=1)), str(day + timedelta(days=1)))

    async def found(since: str = "", until: str = "", **kw: Any) -> set[str]:
        rows, _ = await views.search(reports, since=views.parse_day(since, "from"), until=views.parse_day(until, "until"), **kw)
        return {r["message_id"] for r in rows}

    everything = await found()
    assert {world.ids[k] for k in ("delivered", "dead", "pending", "foreign", "held")} <= everything
    assert world.ids["delivered"] in await found(since=str(day)) and world.ids["delivered"] in await found(until=str(after))
    assert await found(since=str(after)) == set()  # "from" the next day: nothing yet
    assert world.ids["delivered"] not in await found(until=str(day))  # "until" a day is up to its start, not through it
    assert await found(since=str(before), until=str(before)) == set()
    [row], more = await views.search(reports, number="CONSOLE-0001")
    assert (row["message_id"], row["document_type"], row["partner"], more) == (world.ids["held"], "Invoice", "demo-supplier",
                                                                             False)
