"""The gateway's Prometheus metrics and the merge of its backends' ``vllm:*`` metrics.

Own metrics (``emugate_*``), labelled by backend:

* ``emugate_requests_total{backend,code}``: requests answered (upstream status);
* ``emugate_in_flight{backend}``: requests in flight;
* ``emugate_errors_total{backend,kind}``: ``connect`` (replica unreachable,
  retried elsewhere), ``stream`` (upstream dropped mid-response), ``client_disconnect``
  (client left mid-response; upstream closed so vLLM aborts), ``timeout``,
  ``no_replica``, ``unknown_model``, ``bad_request``, ``queue_full``, ``auth``;
* ``emugate_added_latency_seconds{backend}``: time the gateway adds to a
  request: from receiving it to sending it upstream, plus from upstream's
  response headers to ours (seconds; upstream's own time excluded);
* ``emugate_ttft_seconds{backend}`` and ``emugate_itl_seconds{backend}``:
  for streamed (SSE) 200 responses, as the gateway sees them: from the end of
  the client's request body to the first body chunk sent back, and between
  consecutive body chunks (one SSE event per chunk as vLLM frames them), in
  seconds. They include the replica's time: the client-side view, per backend;
* ``emugate_fault_active{backend,replica,kind}``: 1 while an engine fault
  (slow, spikes, kv_pressure, hang, crash) is on for a replica, 0 after;
* ``emugate_faults_injected_total{backend,kind}``: front-door and mid-stream
  faults injected (``http_429``, ``http_503``, ``stream_cut``, ``stream_reset``...).

:func:`merge_vllm_metrics` parses every replica's exposition with
``prometheus_client``'s parser, adds ``backend``, ``replica`` and ``mode``
labels to each ``vllm:*`` sample and writes each family once, all replicas'
samples together (a family split into several blocks is invalid exposition
text that strict Prometheus/OpenMetrics parsers reject).
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

ADDED_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                         0.0075, 0.01, 0.025, 0.05, 0.1)
#: Seconds; vLLM's own TTFT buckets (vllm/v1/metrics/loggers.py) cover 1 ms to 2560 s.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
#: Seconds; vLLM's inter-token-latency buckets (same file).
ITL_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)


class GatewayMetrics:
    """A private registry holding the gateway's own metrics."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("emugate_requests", "Requests answered, by upstream status code",
                                ["backend", "code"], registry=self.registry)
        self.in_flight = Gauge("emugate_in_flight", "Requests in flight through the gateway",
                               ["backend"], registry=self.registry)
        self.errors = Counter("emugate_errors", "Gateway-side errors by kind", ["backend", "kind"],
                              registry=self.registry)
        self.added_latency = Histogram("emugate_added_latency_seconds",
                                       "Latency the gateway adds per request (seconds)", ["backend"],
                                       buckets=ADDED_LATENCY_BUCKETS, registry=self.registry)
        self.ttft = Histogram("emugate_ttft_seconds", "Time to first streamed chunk seen at the gateway (seconds)",
                              ["backend"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("emugate_itl_seconds", "Gap between streamed chunks seen at the gateway (seconds)",
                             ["backend"], buckets=ITL_BUCKETS, registry=self.registry)
        self.fault_active = Gauge("emugate_fault_active", "1 while an engine fault is on for a replica "
                                  "(gateway/faults.py)", ["backend", "replica", "kind"], registry=self.registry)
        self.faults_injected = Counter("emugate_faults_injected", "Front-door and mid-stream faults injected, by kind "
                                       "(http_429, stream_cut...)", ["backend", "kind"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Families:
    """A collector over pre-built metric families (what :func:`merge_vllm_metrics` assembles)."""

    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self):
        return self._families


def merge_vllm_metrics(texts: list[tuple[dict[str, str], str]]) -> bytes:
    """One valid exposition of the ``vllm:*`` (and emulated replicas' ``emugate:*``) families of
    several replicas.

    Args:
        texts: (extra labels, exposition text) per replica, e.g.
            ``({"backend": "emu", "replica": "0", "mode": "emulate"}, text)``.

    Returns:
        Prometheus text format (0.0.4), each family's HELP/TYPE once and all
        its samples after them. A replica whose text does not parse is left
        out (its scrape counts as failed, the rest are served).
    """
    merged: dict[str, Metric] = {}
    for labels, text in texts:
        try:
            fams = list(text_string_to_metric_families(text))
        except (ValueError, IndexError, TypeError):
            continue
        for fam in fams:
            if not fam.name.startswith(("vllm:", "emugate:")):
                continue
            m = merged.get(fam.name)
            if m is None:
                m = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for smp in fam.samples:
                m.samples.append(Sample(smp.name, {**labels, **smp.labels}, smp.value, smp.timestamp, smp.exemplar))
    reg = CollectorRegistry(auto_describe=False)
    reg.register(_Families(list(merged.values())))
    return generate_latest(reg)


def scrape_value(text: str, family: str) -> float | None:
    """Sum of a family's samples in an exposition text (None if absent)."""
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith(family) and (len(line) > len(family) and line[len(family)] in "{ "):
            try:
                total += float(line.rsplit(" ", 1)[1])
                found = True
            except ValueError:
                pass
    return total if found else None
