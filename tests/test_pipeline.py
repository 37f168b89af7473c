from gateway.cli.demo import SAMPLE
from tests.helpers import post


async def test_valid_sample_is_accepted_and_delivered(gateway, client):
    answer = await post(client(), SAMPLE)
    assert answer.status == 202, answer.text
    body = answer.json
    assert body["status"] == "accepted" and body["duplicate"] is False
    await gateway.gw.outbox.run_once()
    delivered = gateway.inst.delivery_folder / f"{body['message_id']}.xml"
    assert delivered.read_bytes() == SAMPLE
