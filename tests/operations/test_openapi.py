"""The admin listener's OpenAPI document: valid OpenAPI 3.1, the one error shape of the other listeners,
served at /v1/openapi.json, and true of the running listener (schemathesis), without and with a token."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
import schemathesis

from gateway.errors import ERROR_SCHEMAS
from gateway.inbound import openapi as inbound_api
from gateway.operations import instance
from gateway.operations.openapi import admin_document
from tests.helpers import free_port, serving
from tests.helpers import openapi as fuzzing
from tests.helpers.daemon import set_admin

TOKEN = "admin-token-for-the-openapi-test"


@pytest.mark.parametrize("token", [False, True])
def test_the_document_is_valid_openapi_3_1(token: bool) -> None:
    doc = admin_document(token=token)
    schemathesis.openapi.from_dict(json.loads(json.dumps(doc))).validate()
    assert ("security" in doc) is token
    assert {"/healthz", "/readyz", "/metrics", "/v1/openapi.json"} == doc["paths"].keys()  # not the console's pages
    for item in doc["paths"].values():
        assert ("401" in item["get"]["responses"]) is token


def test_errors_have_the_shape_of_the_other_listeners() -> None:
    """JsonRefusals answers every listener's parser refusals: one description of that shape (gateway/errors.py)."""
    mine = admin_document(token=False)["components"]["schemas"]
    theirs = inbound_api.partner_document()["components"]["schemas"]
    assert (mine["Error"], mine["Detail"]) == (theirs["Error"], theirs["Detail"]) == (
        ERROR_SCHEMAS["Error"], ERROR_SCHEMAS["Detail"])


def with_token(inst: instance.Instance) -> Path:
    path = inst.root / "keys" / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, TOKEN.encode() + b"\n")
    os.close(fd)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("token", [False, True], ids=["loopback", "token"])
async def test_the_admin_listener_answers_as_its_document_says(inst: instance.Instance, token: bool) -> None:
    set_admin(inst, free_port(), token_file=with_token(inst) if token else None)
    async with serving(inst, "warning") as running:
        url = f"http://127.0.0.1:{running.gw.admin_port}"
        with fuzzing.client(headers={"Authorization": f"Bearer {TOKEN}"} if token else None) as session:
            schema = await asyncio.to_thread(fuzzing.load, url, session)
            assert schema.raw_schema == admin_document(token=token)
            sent = await asyncio.to_thread(fuzzing.fuzz, schema, session)
            readyz = next(o for o in fuzzing.operations(schema) if o.path == "/readyz")
            running.gw.stopping = True  # what /readyz says while the gateway stops (only not_ready reads the flag)
            try:
                answer = await asyncio.to_thread(fuzzing.call, readyz.Case(), session, fuzzing.DOCUMENTED)
            finally:
                running.gw.stopping = False
            assert answer.status_code == 503 and answer.json()["reason"] == "stopping", answer.text
        assert sent.keys() == {"GET /healthz", "GET /readyz", "GET /metrics", "GET /v1/openapi.json"}, sent
        if token:  # without it: the 401 the document describes, on every path
            with fuzzing.client() as anonymous:
                for operation in fuzzing.operations(schema):
                    answer = await asyncio.to_thread(anonymous.get, url + operation.path, timeout=10)
                    assert answer.status_code == 401, answer.text
                    operation.Case().validate_response(answer, checks=fuzzing.CHECKS)
