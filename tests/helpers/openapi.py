"""A running listener held to the OpenAPI document it serves, by schemathesis.

``load`` reads ``/v1/openapi.json`` from the listener as a client would; ``fuzz`` sends each operation
schemathesis's coverage cases (boundary values, a missing or unsupported body, methods the path does
not have) and generated requests, and checks every answer: no server error, a documented status, the
documented content type, headers and body shape, invalid input refused, 405 with ``Allow``.  They
block (``requests``): an async test runs them on a thread, beside the gateway's event loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import CheckFunction, not_a_server_error
from schemathesis.schemas import APIOperation, BaseSchema
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

PATH = "/v1/openapi.json"
CHECKS: list[CheckFunction] = [not_a_server_error, status_code_conformance, content_type_conformance,
                               response_headers_conformance, response_schema_conformance, negative_data_rejection,
                               unsupported_method]
DOCUMENTED = [check for check in CHECKS if check is not not_a_server_error]  # for a 5xx that a test provokes
EXAMPLES = 50  # per operation and generation mode: the whole file stays well under a minute

# A Factur-X PDF is sent as bytes, like any binary body.
schemathesis.serializer.alias("application/pdf", "application/octet-stream")


@contextlib.contextmanager
def client(ca: Path | None = None, cert: Path | None = None, key: Path | None = None,
           headers: dict[str, str] | None = None) -> Iterator[requests.Session]:
    """A requests session trusting ``ca`` and presenting ``cert``/``key`` (none: plain HTTP)."""
    with requests.Session() as session:
        session.trust_env = False  # the environment's CA bundle (REQUESTS_CA_BUNDLE) and proxies are not for these
        if ca is not None:
            session.verify = str(ca)
        if cert is not None and key is not None:
            session.cert = (str(cert), str(key))
        session.headers.update(headers or {})
        yield session


def load(base_url: str, session: requests.Session) -> BaseSchema:
    """The document the listener at ``base_url`` serves, validated as OpenAPI."""
    schema = schemathesis.openapi.from_url(base_url + PATH, verify=session.verify, cert=session.cert,
                                           headers=dict(session.headers), timeout=10)
    schema.validate()
    return schema


def call(case: schemathesis.Case, session: requests.Session, checks: list[CheckFunction] = CHECKS
         ) -> schemathesis.Response:
    """``case`` sent with ``session``'s TLS settings, its answer checked (schemathesis would otherwise pass its own
    ``verify``, which wins over the session's)."""
    return case.call_and_validate(session=session, checks=checks, verify=session.verify, cert=session.cert, timeout=30)


def operations(schema: BaseSchema) -> list[APIOperation]:
    """Every operation of ``schema``: the document's own too, which schemathesis leaves out of a schema
    loaded from it unless asked for."""
    found = {result.ok().label: result.ok() for result in schema.get_all_operations()}
    for result in schema.include(path=PATH).get_all_operations():
        found.setdefault(result.ok().label, result.ok())
    return list(found.values())


def fuzz(schema: BaseSchema, session: requests.Session, examples: int = EXAMPLES) -> dict[str, int]:
    """Every operation of ``schema``, sent its coverage cases, then generated requests (derandomised: the
    same ones each run); fails the test with schemathesis's report on the first answer the document does
    not describe.  Returns how many requests each operation was sent."""
    sent: dict[str, int] = {}
    for operation in operations(schema):
        cases = list(schema.iter_coverage_cases(operation, generation_modes=list(GenerationMode),
                                                generation_config=schema.config.generation_for(operation=operation)))
        for case in cases:
            call(case, session)
        sent[operation.label] = len(cases)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def run(case: schemathesis.Case) -> None:
                call(case, session)
                sent[case.operation.label] += 1

            try:
                run()
            except Unsatisfiable:  # nothing the document constrains to break (a string parameter, any XML body)
                assert mode is GenerationMode.NEGATIVE, operation.label
    return sent
