"""The delivery contract (gateway/delivery/sender.py): what every destination kind implements, and how
an attempt that did not deliver is reported.

It promises: a ``Sender`` has a ``name`` and a ``concurrency`` and two coroutines, ``send`` (deliver,
or raise DeliveryFailed) and ``close``; a ``DeliveryFailed`` carries the reason as people read it, cut
to MAX_ERROR_CHARS from the start (it is stored with the job and shown to operators), and says whether
retrying can help (``permanent``) and how long the destination asked to be left alone
(``retry_after``).  Both flags are keyword-only, so that a bare ``DeliveryFailed(reason)`` is always
the safe reading: transient, retried on the outbox's own schedule.

How the outbox acts on them is tested in tests/delivery/test_outbox.py; every sender the registry
builds is checked against this shape in tests/delivery/test_registry.py.
"""

from __future__ import annotations

import inspect

import pytest

from gateway.delivery.sender import MAX_ERROR_CHARS, DeliveryFailed, Sender


def test_a_bare_failure_is_transient_with_no_delay_of_its_own():
    failure = DeliveryFailed("HTTP 503: down for maintenance")
    assert (failure.error, failure.permanent, failure.retry_after) == ("HTTP 503: down for maintenance", False, None)
    assert isinstance(failure, Exception)


def test_the_flags_are_kept_as_given():
    assert DeliveryFailed("HTTP 410", permanent=True).permanent is True
    assert DeliveryFailed("HTTP 429", retry_after=120.0).retry_after == 120.0
    assert DeliveryFailed("HTTP 429", retry_after=0.0).retry_after == 0.0  # "now" is an answer too, not "no answer"


def test_the_flags_cannot_be_given_by_position():
    with pytest.raises(TypeError):
        DeliveryFailed("HTTP 410", True)  # type: ignore[misc]


@pytest.mark.parametrize("length", [0, 1, MAX_ERROR_CHARS - 1, MAX_ERROR_CHARS])
def test_a_reason_within_the_bound_is_kept_whole(length: int):
    reason = "é" * length  # counted in characters: a reason is text, stored as text
    assert DeliveryFailed(reason).error == reason
    assert len(DeliveryFailed(reason + "ü").error) == min(length + 1, MAX_ERROR_CHARS)


def test_a_long_reason_keeps_its_beginning():
    # An ERP's error page: the status and the first words say what happened; the rest is cut.
    body = "HTTP 500: NullPointerException at com.erp.InvoiceImport.parse(InvoiceImport.java:42)\n" + "\tat frame\n" * 500
    failure = DeliveryFailed(body, permanent=True)
    assert failure.error == body[:MAX_ERROR_CHARS]
    assert failure.error.startswith("HTTP 500: NullPointerException at com.erp.InvoiceImport.parse")
    assert failure.permanent  # cutting the reason changes nothing else


def test_the_shape_of_a_sender():
    assert set(Sender.__annotations__) == {"name", "concurrency"}
    assert inspect.iscoroutinefunction(Sender.send) and inspect.iscoroutinefunction(Sender.close)
    assert list(inspect.signature(Sender.send).parameters) == ["self", "job", "document"]


def test_delivery_failed_cuts_its_reason() -> None:
    assert len(DeliveryFailed("x" * 5000).error) == 300
