"""Step lateness (unit tier): the histogram, its file, the Prometheus collector, the
warning, and the gateway's merge of the ``emugate:*`` family."""
from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from emu_executor.lateness import METRIC, LatenessCollector, LatenessStats, quantile_from_counts
from gateway.metrics import merge_vllm_metrics


def test_histogram_file_and_collector(tmp_path):
    path = tmp_path / "late.f64"
    st = LatenessStats(path, warn_ms=None)
    for x in [0.0] * 97 + [0.0004, 0.003, 0.2]:
        st.observe(x)
    assert st.count == 100 and abs(st.sum_s - 0.2034) < 1e-9
    assert st.quantile(0.5) == 0.0001 and st.quantile(0.99) == 0.005 and st.quantile(1.0) == 0.25
    reg = CollectorRegistry()
    reg.register(LatenessCollector(path))
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(reg).decode())}
    fam = fams[METRIC]
    buckets = {s.labels["le"]: s.value for s in fam.samples if s.name.endswith("_bucket")}
    assert buckets["0.0001"] == 97 and buckets["0.001"] == 98 and buckets["+Inf"] == 100
    assert quantile_from_counts([0] * 14, 0.99) == 0.0


def test_collector_without_file_yields_nothing(tmp_path):
    reg = CollectorRegistry()
    reg.register(LatenessCollector(tmp_path / "absent.f64"))
    assert METRIC not in generate_latest(reg).decode()


def test_warning_names_the_problem_once_per_interval(tmp_path, caplog):
    st = LatenessStats(None, warn_ms=1.0)
    with caplog.at_level(logging.WARNING, logger="vllm.emugate.lateness"):
        st.observe(0.0005)
        st.observe(0.004)
        st.observe(0.009)
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1 and "cannot keep up" in msgs[0] and "4.0 ms" in msgs[0]


def test_gateway_merges_emugate_families(tmp_path):
    path = tmp_path / "late.f64"
    st = LatenessStats(path, warn_ms=None)
    st.observe(0.002)
    reg = CollectorRegistry()
    reg.register(LatenessCollector(path))
    text = generate_latest(reg).decode() + "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 3.0\n"
    merged = merge_vllm_metrics([({"backend": "h100", "replica": "0", "mode": "emulate"}, text),
                                 ({"backend": "h100", "replica": "1", "mode": "emulate"}, text)]).decode()
    fams = {f.name: f for f in text_string_to_metric_families(merged)}
    late = [s for s in fams["emugate:step_lateness_seconds"].samples if s.name.endswith("_count")]
    assert sorted(s.labels["replica"] for s in late) == ["0", "1"] and all(s.value == 1 for s in late)
