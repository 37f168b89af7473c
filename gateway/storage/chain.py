"""The audit chain's form: every record carries the hash of the one before (backend independent).

Storage appends records in the transaction of what they record; ``record_hash`` is what links
them.  Checking a chain and its signed checkpoints is gateway/operations/audit.py's business.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

GENESIS = "0" * 64  # the ``prev`` of the first record
CHECKPOINT = "audit.checkpoint"
FIELDS = ("seq", "at", "actor", "action", "partner", "message_id", "detail", "prev")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the canonical JSON of the record's fields (``detail`` as its stored JSON text)."""
    detail = record["detail"]
    canonical = [record["seq"], record["at"], record["actor"], record["action"], record["partner"], record["message_id"],
                 detail if isinstance(detail, str) else json.dumps(detail, sort_keys=True), record["prev"]]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=True, separators=(",", ":")).encode()).hexdigest()
