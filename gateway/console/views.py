"""What the console's message pages read, shaped for the templates (queries: gateway/storage, Reports).

Nothing here returns invoice content (that is ``messages.MessagePages.content``).
"""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from typing import Any

from ..storage.base import Reports
from ..storage.records import SUMMARIES

PAGE = 50
MAX_PAGES = 200
STATUSES = SUMMARIES


def parse_day(text: str, where: str) -> str | None:
    """A date (YYYY-MM-DD) from a search form, as the RFC 3339 prefix the store compares with."""
    text = text.strip()
    if not text:
        return None
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        raise ValueError(f"{where}: give a date as YYYY-MM-DD")
    return datetime.strptime(text, "%Y-%m-%d").replace(tzinfo=UTC).strftime("%Y-%m-%dT00:00:00")


async def search(reports: Reports, *, partner: str = "", status: str = "", since: str | None = None,
                 until: str | None = None, number: str = "", amount: str = "", page: int = 0) -> tuple[list[dict[str, Any]], bool]:
    """One page of messages, newest first (the document type without its syntax prefix), and whether there are more."""
    page = max(0, min(page, MAX_PAGES))
    rows = await reports.search(partner=partner, status=status, since=since, until=until, number=number, amount=amount,
                                offset=page * PAGE, limit=PAGE + 1)
    shown = [dataclasses.asdict(r) | {"document_type": r.document_type.split(":")[-1]} for r in rows[:PAGE]]
    return shown, len(rows) > PAGE
