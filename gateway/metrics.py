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
  response headers to ours (seconds; upstream's own time excluded).

``relabel_vllm_metrics`` rewrites a replica's exposition so each ``vllm:*``
sample carries ``backend``, ``replica`` and ``mode`` labels, and keeps one
``# HELP``/``# TYPE`` line per family across replicas.
"""
from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ADDED_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005,
                         0.0075, 0.01, 0.025, 0.05, 0.1)


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

    def render(self) -> bytes:
        return generate_latest(self.registry)


_SAMPLE = re.compile(r"^(vllm:[A-Za-z0-9_:]+)(\{([^}]*)\})?(\s.*)$")
_META = re.compile(r"^# (HELP|TYPE) (vllm:[A-Za-z0-9_:]+)")


def relabel_vllm_metrics(text: str, labels: dict[str, str], seen_meta: set[str]) -> list[str]:
    """Lines of ``text`` for ``vllm:*`` families with ``labels`` added to each sample.

    ``seen_meta`` collects (HELP/TYPE, family) already emitted, so merging
    several replicas yields each family's metadata once.
    """
    extra = ",".join(f'{k}="{v}"' for k, v in labels.items())
    out = []
    for line in text.splitlines():
        m = _META.match(line)
        if m:
            key = f"{m.group(1)} {m.group(2)}"
            if key not in seen_meta:
                seen_meta.add(key)
                out.append(line)
            continue
        m = _SAMPLE.match(line)
        if m:
            name, _, inner, rest = m.groups()
            lab = f"{extra},{inner}" if inner else extra
            out.append(f"{name}{{{lab}}}{rest}")
    return out


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
