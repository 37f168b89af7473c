"""gateway/metrics.py: the Prometheus text exposition, and what the console's dashboard reads from it.

``Metrics`` holds the counters and the stage histogram of one gateway (its own registry: two gateways
in one process count apart); ``render(gauges)`` is the text format, counters plus the gauges computed
at scrape time; ``refusals()`` adds up refused and deferred invoices by code.  With
PROMETHEUS_MULTIPROC_DIR set (by the supervisor, before a worker imports the module) each process
counts in files there and a render adds up every process's counts; ``prepare_directory`` empties
that folder at start.  The text is parsed back here with prometheus_client's own parser.
"""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import MULTIPROC_ENV, STAGE_BUCKETS, Metrics, prepare_directory
from tests.helpers import ENV, ROOT

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: bytes) -> tuple[dict[str, tuple[str, str]], Samples]:
    """(family name -> (type, help), (sample name, sorted labels) -> value) of a text exposition."""
    families: dict[str, tuple[str, str]] = {}
    samples: Samples = {}
    for family in text_string_to_metric_families(text.decode()):
        families[family.name] = (family.type, family.documentation)
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return families, samples


def key(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def test_a_fresh_gateway_renders_every_family_with_no_counts() -> None:
    families, samples = parse(Metrics().render([]))
    assert {name: kind for name, (kind, _) in families.items()} == {
        "einvoice_invoices": "counter", "einvoice_stage_seconds": "histogram", "einvoice_delivery_attempts": "counter",
        "einvoice_reloads": "counter", "einvoice_certificate_expiry_warnings": "counter",
        "einvoice_tls_handshake_failures": "counter"}
    assert all(doc for _, doc in families.values())  # every family says what it counts
    assert samples == {}  # labelled counters have no series until something happens


def test_counts_are_rendered_by_their_labels() -> None:
    m = Metrics()
    for _ in range(3):
        m.invoice("https", "accepted", "OK")
    m.invoice("smtp", "rejected", "SMIME_SIGNATURE_INVALID")
    m.delivery("erp-inbox", "retry")
    m.delivery("erp-inbox", "delivered")
    m.reloads.labels("failed").inc()
    _, samples = parse(m.render([]))
    assert samples[key("einvoice_invoices_total", transport="https", outcome="accepted", code="OK")] == 3
    assert samples[key("einvoice_invoices_total", transport="smtp", outcome="rejected", code="SMIME_SIGNATURE_INVALID")] == 1
    assert samples[key("einvoice_delivery_attempts_total", destination="erp-inbox", outcome="retry")] == 1
    assert samples[key("einvoice_delivery_attempts_total", destination="erp-inbox", outcome="delivered")] == 1
    assert samples[key("einvoice_reloads_total", result="failed")] == 1
    assert sum(v for (name, _), v in samples.items() if name == "einvoice_invoices_total") == 4


def test_stage_latencies_fall_into_the_documented_buckets() -> None:
    """From 1 ms to the 60 s rules timeout; a slower stage still counts (in +Inf)."""
    m = Metrics()
    for seconds in (0.0005, 0.003, 0.003, 59.0, 120.0):
        m.stage("rules", seconds)
    _, samples = parse(m.render([]))
    buckets = {float(dict(labels)["le"]): v for (name, labels), v in samples.items() if name == "einvoice_stage_seconds_bucket"}
    assert sorted(buckets) == [*STAGE_BUCKETS, float("inf")]
    assert STAGE_BUCKETS[0] == 0.001 and STAGE_BUCKETS[-1] == 60.0
    assert (buckets[0.001], buckets[0.0025], buckets[0.005], buckets[30.0], buckets[60.0], buckets[float("inf")]) == (1, 1, 3, 3, 4, 5)
    assert samples[key("einvoice_stage_seconds_count", stage="rules")] == 5
    assert samples[key("einvoice_stage_seconds_sum", stage="rules")] == 0.0005 + 0.003 + 0.003 + 59.0 + 120.0


def test_gauges_are_rendered_as_given_at_scrape_time() -> None:
    hostile = 'CN=Acme "Ltd"\\, O=x\nbreak'  # a partner's certificate subject: quotes, backslash, newline
    gauges = [
        ("einvoice_outbox_depth", "Delivery jobs waiting", [], [([], 7.0)]),
        ("einvoice_certificate_expiry_days", "Days until a certificate expires", ["owner", "subject"],
         [(["gateway", "CN=localhost"], 824.5), (["acme", hostile], -3.0)]),
        ("einvoice_dead_letters", "Dead letters", ["destination"], []),  # a family without samples
    ]
    m = Metrics()
    families, samples = parse(m.render(gauges))
    assert families["einvoice_outbox_depth"] == ("gauge", "Delivery jobs waiting")
    assert families["einvoice_dead_letters"][0] == "gauge"
    assert samples[key("einvoice_outbox_depth")] == 7.0
    assert samples[key("einvoice_certificate_expiry_days", owner="gateway", subject="CN=localhost")] == 824.5
    assert samples[key("einvoice_certificate_expiry_days", owner="acme", subject=hostile)] == -3.0  # escaped, parsed back whole
    _, again = parse(m.render([]))  # gauges are not kept between scrapes
    assert not [k for k in again if k[0].startswith(("einvoice_outbox", "einvoice_certificate_expiry_days"))]


def test_refusals_add_up_rejected_and_deferred_by_code_over_transports() -> None:
    m = Metrics()
    m.invoice("https", "rejected", "SCHEMA_INVALID")
    m.invoice("smtp", "rejected", "SCHEMA_INVALID")
    m.invoice("https", "deferred", "STORAGE_UNAVAILABLE")
    m.invoice("https", "rejected", "PARTNER_UNKNOWN")
    m.invoice("https", "accepted", "OK")
    m.invoice("https", "held", "HELD")
    assert m.refusals() == {"SCHEMA_INVALID": 2.0, "STORAGE_UNAVAILABLE": 1.0, "PARTNER_UNKNOWN": 1.0}  # not the _created times
    assert Metrics().refusals() == {}


def test_two_gateways_in_one_process_count_apart() -> None:
    """No global registry: a second Metrics neither clashes with the first nor sees its counts."""
    a, b = Metrics(), Metrics()
    a.invoice("https", "rejected", "TOO_LARGE")
    assert a.refusals() == {"TOO_LARGE": 1.0} and b.refusals() == {}
    _, samples = parse(b.render([]))
    assert samples == {}


WORKER = """
import sys
from gateway.metrics import Metrics
m = Metrics()
for _ in range(int(sys.argv[1])):
    m.invoice("https", "accepted", "OK")
m.invoice("https", "rejected", "SCHEMA_INVALID")
m.stage("parse", 0.002)
"""


def test_multiprocess_mode_adds_up_every_workers_counts(tmp_path: Path, monkeypatch) -> None:
    directory = prepare_directory(tmp_path)
    env = {**ENV, MULTIPROC_ENV: str(directory)}
    for accepted in (2, 5):  # two worker processes, each counting in its own files
        subprocess.run([sys.executable, "-c", WORKER, str(accepted)], env=env, cwd=ROOT, check=True, timeout=60)
    assert len(list(directory.glob("*.db"))) >= 2

    here = Metrics()
    here.invoice("https", "accepted", "OK")  # this process's in-memory counts are not what a worker-0 scrape reports
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    _, samples = parse(here.render([("einvoice_outbox_depth", "Jobs", [], [([], 1.0)])]))
    assert samples[key("einvoice_invoices_total", transport="https", outcome="accepted", code="OK")] == 7
    assert samples[key("einvoice_invoices_total", transport="https", outcome="rejected", code="SCHEMA_INVALID")] == 2
    assert samples[key("einvoice_stage_seconds_count", stage="parse")] == 2
    assert samples[key("einvoice_outbox_depth")] == 1.0  # the gauges once, from the process that answers
    assert here.refusals() == {"SCHEMA_INVALID": 2.0}


def test_prepare_directory_starts_the_counts_afresh(tmp_path: Path) -> None:
    directory = prepare_directory(tmp_path)
    assert directory == tmp_path / "metrics"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700  # other users cannot read or plant counts
    (directory / "counter_1234.db").write_bytes(b"old counts")
    (directory / "histogram_99.db").write_bytes(b"old counts")
    (directory / "README").write_text("not ours")
    assert prepare_directory(tmp_path) == directory  # again, over a folder left by the previous run
    assert sorted(p.name for p in directory.iterdir()) == ["README"]
