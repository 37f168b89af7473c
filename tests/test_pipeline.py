from gateway.cli.demo import SAMPLE
from tests.helpers import XML


async def test_valid_sample_is_accepted_and_delivered(gateway, client):
    s = client()
    async with s.post("/v1/invoices", data=SAMPLE, headers=XML) as r:
        assert r.status == 202, await r.text()
        body = await r.json()
    assert body["status"] == "accepted" and body["duplicate"] is False
    await gateway.gw.outbox.run_once()
    delivered = gateway.inst.delivery_folder / f"{body['message_id']}.xml"
    assert delivered.read_bytes() == SAMPLE
