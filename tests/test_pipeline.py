import asyncio
import hashlib
import threading
from dataclasses import replace
from typing import Any

from gateway.cli.demo import SAMPLE
from gateway.operations.instance import DEMO_PARTNER
from gateway.partners.edit import edit_partners
from gateway.stages import xmlparse
from tests.helpers import audit_of, eventually, numbered, post

ELSEWHERE = "0088:4000000000009"


async def test_valid_sample_is_accepted_and_delivered(gateway, client):
    answer = await post(client(), SAMPLE)
    assert answer.status == 202, answer.text
    body = answer.json
    assert body["status"] == "accepted" and body["duplicate"] is False
    await gateway.gw.outbox.run_once()
    delivered = gateway.inst.delivery_folder / f"{body['message_id']}.xml"
    assert delivered.read_bytes() == SAMPLE


async def test_a_resend_the_stages_would_now_refuse_gets_its_first_receipt(gateway, client):
    """A partner that lost the 202 and resends must learn its invoice was accepted, whatever changed since:
    the stages' refusal is answered only for content never accepted, and only that refusal is audited."""
    s = client()
    first = await post(s, SAMPLE)
    assert first.status == 202, first.text

    def move_the_partner(partners: list[Any], _store: Any) -> None:  # the invoice's seller is no longer theirs
        i = next(i for i, p in enumerate(partners) if p.name == DEMO_PARTNER)
        partners[i] = replace(partners[i], party_ids=(ELSEWHERE,))

    await asyncio.to_thread(edit_partners, gateway.inst.partners, DEMO_PARTNER, move_the_partner)
    book = gateway.gw.parts.partners
    await eventually(lambda: book.refresh() or book.current.get(DEMO_PARTNER).party_ids == (ELSEWHERE,),
                     "the partners file reloaded")

    again = await post(s, SAMPLE)
    assert (again.status, again.json.get("message_id"), again.json.get("duplicate")) == \
        (202, first.json["message_id"], True), again.text
    unsigned = numbered("PIPELINE-0002")
    fresh = await post(s, unsigned)
    assert (fresh.status, fresh.json["error"]) == (403, "SUPPLIER_NOT_AUTHORIZED"), fresh.text
    refused = await audit_of(gateway.gw.store, "invoice.rejected")
    assert [r["detail"]["sha256"] for r in refused] == [hashlib.sha256(unsigned).hexdigest()]


async def test_a_payment_account_hidden_in_an_extension_is_refused_and_nothing_stored(gateway, client):
    """Issue 20, item 2: an extension slot takes any XML, and a consumer searching descendants reads it."""
    hidden = (b'<ext:UBLExtensions xmlns:ext="urn:oasis:names:specification:ubl:schema:xsd:CommonExtensionComponents-2">'
              b'<ext:UBLExtension><ext:ExtensionContent><x:Notes xmlns:x="urn:example:x"><cac:PaymentMeans>'
              b'<cbc:PaymentMeansCode>30</cbc:PaymentMeansCode><cac:PayeeFinancialAccount><cbc:ID>GB82WEST12345698765432'
              b'</cbc:ID></cac:PayeeFinancialAccount></cac:PaymentMeans></x:Notes></ext:ExtensionContent></ext:UBLExtension>'
              b'</ext:UBLExtensions>')
    head, sep, rest = numbered("PIPELINE-EXT-1").partition(b"<cbc:")
    answer = await post(client(), head + hidden + sep + rest)
    assert (answer.status, answer.json["error"]) == (422, "EXTENSION_REFUSED"), answer.text
    assert [d["path"] for d in answer.json["details"]][0] == "/*/ext:UBLExtensions/ext:UBLExtension/ext:ExtensionContent/x:Notes"
    assert (await gateway.gw.store.reports.counts()).get("invoices", 0) == 0


async def test_the_stage_threads_are_renewed_after_a_budget_of_parsing(gateway, client, monkeypatch):
    """lxml's per-thread name dictionary never shrinks: after RENEW_AFTER_BYTES of parsed structure the pipeline
    moves its work to fresh stage threads (here the budget is one sample invoice)."""
    monkeypatch.setattr(xmlparse, "RENEW_AFTER_BYTES", 1)
    s = client()
    threads = []
    for i in range(3):
        status, body = await post(s, numbered(f"RENEW-{i}"))
        assert status == 202, body
        threads.append({t for t in threading.enumerate() if t.name.startswith("stage")})
    assert gateway.gw.executor.renewals == 3
    assert not threads[0] & threads[2]  # the first invoice's threads are gone
