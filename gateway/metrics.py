"""Prometheus metrics: counters and histograms the stages update, gauges read at scrape time.

With several worker processes (gateway/app/supervisor.py) each process writes its counters to files
in ``<state_dir>/metrics`` (prometheus_client's multiprocess mode, chosen by the supervisor through
PROMETHEUS_MULTIPROC_DIR before a worker imports this module); the admin listener of worker 0 adds
them up.  Gauges (outbox depth, certificate expiry, …) are computed from shared state at each
scrape, so they are right whichever process answers.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Stage latencies from 1 ms (parse of a small invoice) to 60 s (the rules timeout).
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
Gauge = tuple[str, str, list[str], Iterable[tuple[list[str], float]]]  # name, help, label names, samples


def prepare_directory(state_dir: Path) -> Path:
    """The multiprocess directory, emptied: counters restart with the service, as Prometheus expects."""
    directory = state_dir / "metrics"
    directory.mkdir(mode=0o700, exist_ok=True)
    for f in directory.glob("*.db"):
        f.unlink()
    return directory


class _Gauges(Collector):
    def __init__(self, gauges: list[Gauge]):
        self.gauges = gauges

    def collect(self) -> Iterator[Metric]:
        for name, text, labels, samples in self.gauges:
            family = GaugeMetricFamily(name, text, labels=labels)
            for values, value in samples:
                family.add_metric(values, value)
            yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.invoices = Counter("einvoice_invoices", "Invoices answered, by transport, outcome and reason code",
                                ["transport", "outcome", "code"], registry=self.registry)
        self.stage_seconds = Histogram("einvoice_stage_seconds", "Time spent in each pipeline stage", ["stage"],
                                       buckets=STAGE_BUCKETS, registry=self.registry)
        self.deliveries = Counter("einvoice_delivery_attempts", "Delivery attempts by destination and outcome "
                                  "(delivered, retry, dead_letter)", ["destination", "outcome"], registry=self.registry)
        self.reloads = Counter("einvoice_reloads", "Configuration reloads (SIGHUP) by result", ["result"],
                               registry=self.registry)
        self.handshakes_failed = Counter("einvoice_tls_handshake_failures", "TLS handshakes that failed, by listener "
                                         "and reason (OpenSSL's, or HANDSHAKE_TIMEOUT, CONNECTION_LOST)",
                                         ["listener", "reason"], registry=self.registry)
        self.expiry_warnings = Counter("einvoice_certificate_expiry_warnings", "Certificate expiry warnings logged, "
                                       "by threshold in days", ["threshold_days"], registry=self.registry)

    def invoice(self, transport: str, outcome: str, code: str) -> None:
        self.invoices.labels(transport, outcome, code).inc()

    def handshake_failed(self, listener: str, reason: str) -> None:
        self.handshakes_failed.labels(listener, reason).inc()

    def stage(self, name: str, seconds: float) -> None:
        self.stage_seconds.labels(name).observe(seconds)

    def delivery(self, destination: str, outcome: str) -> None:
        self.deliveries.labels(destination, outcome).inc()

    def _counters(self) -> CollectorRegistry:
        """Every process's counters (multiprocess mode) or this one's."""
        directory = os.environ.get(MULTIPROC_ENV)
        registry = CollectorRegistry()
        if directory:
            multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
        else:
            registry.register(_Forward(self.registry))
        return registry

    def render(self, gauges: list[Gauge]) -> bytes:
        """The text exposition: the counters plus the gauges."""
        registry = self._counters()
        registry.register(_Gauges(gauges))
        return generate_latest(registry)

    def refusals(self) -> dict[str, float]:
        """Invoices refused since the start, by reason code, over every transport (the console's dashboard)."""
        out: dict[str, float] = {}
        for family in self._counters().collect():
            if family.name != "einvoice_invoices":
                continue
            for sample in family.samples:
                if sample.name.endswith("_total") and sample.labels.get("outcome") in ("rejected", "deferred"):
                    code = sample.labels.get("code", "")
                    out[code] = out.get(code, 0.0) + sample.value
        return out


class _Forward(Collector):
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self.registry.collect()
