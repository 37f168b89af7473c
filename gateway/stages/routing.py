"""Routing: which destinations an accepted invoice goes to.  Pure; no I/O.

Rules are tried in the order the configuration lists them; the first whose every criterion matches
names the destinations.  An invoice no rule matches goes to ``routing.default``; when that is
empty it is held for review (``quarantine list``) rather than delivered nowhere in silence.
Invoices the ERP submits for sending (``POST /v1/outbound``) are not routed here: they go to the
partner destination named by ``outbound.destination``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config.model import Route
from ..identifiers import keys_of, party_key
from ..model import InvoiceFacts

UNROUTED = "no routing rule matches this invoice and routing.default is empty"


@dataclass(frozen=True, slots=True)
class Router:
    routes: tuple[Route, ...]
    default: tuple[str, ...]

    def route(self, partner: str, facts: InvoiceFacts) -> tuple[str, ...]:
        """The destinations for an invoice from ``partner``; () when it must be held."""
        for rule in self.routes:
            if matches(rule, partner, facts):
                return rule.destinations
        return self.default

    def explain(self, partner: str, facts: InvoiceFacts) -> str:
        """Which rule decided (for `messages show` and the logs)."""
        for i, rule in enumerate(self.routes):
            if matches(rule, partner, facts):
                return f"routes[{i}]"
        return "routing.default" if self.default else "unrouted"


def matches(rule: Route, partner: str, facts: InvoiceFacts) -> bool:
    return ((rule.receiver is None or party_key(rule.receiver).key in keys_of(facts.customer_ids))
            and (rule.partner is None or rule.partner == partner)
            and (rule.document_type is None or rule.document_type == facts.document_type.label)
            and (rule.customization is None or rule.customization == facts.customization_id)
            and (rule.profile is None or rule.profile == facts.profile_id))
