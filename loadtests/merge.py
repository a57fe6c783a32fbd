"""One result from a load run: a single driver's, or the exact merge of distributed workers'.

A distributed run (Locust's ``--master`` and N ``--worker`` processes, ``--plan-workers N``) splits
one plan: worker i sends every N-th request. Each worker ships its raw per-request records to the
master (:func:`worker_payload`, a Locust custom message); the master (:class:`Merger`) puts the
records of all workers on one clock (each worker's send times are offsets from its own start,
anchored at that start's wall-clock time) and computes every metric over the union
(:func:`merge_payloads`, then :func:`write_result`), so percentiles are those of all requests,
never averages of worker percentiles. Per request, the merged result is what a single driver
running the whole plan would record; what differs between any two runs is timing noise.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from loadtests.metrics import RequestResult, calculate_metrics, parse_goodput, result_json
from loadtests.report import summary_table, write_json, write_png

#: Fields of one record, in order (times in seconds).
RECORD_FIELDS = ("index", "prompt_len", "output_tokens", "success", "ttft", "itl", "latency", "start_rel",
                 "scheduled_rel", "queue_time", "error")


def worker_payload(worker: int, indices: list[int], results: list[RequestResult], t0: float, t0_epoch: float,
                   duration_s: float, info: dict) -> dict:
    """A worker's records as a msgpack-able dict: times relative to its start ``t0`` (perf_counter s),
    which happened at ``t0_epoch`` (Unix s)."""
    recs = [[i, r.prompt_len, r.output_tokens, r.success, r.ttft, list(r.itl), r.latency, r.start_time - t0,
             r.scheduled_time - t0, r.queue_time, r.error] for i, r in zip(indices, results)]
    return {"worker": worker, "t0_epoch": t0_epoch, "duration_s": duration_s, "records": recs, "info": info}


def merge_payloads(payloads: list[dict]) -> tuple[list[RequestResult], float, dict]:
    """(results in plan order, duration s, info) of several workers' payloads.

    The run starts at the earliest worker start and ends at the last worker's end (s); every
    record's send time is placed on that common clock.

    Raises:
        ValueError: no payload, or two workers sent the same plan index.
    """
    if not payloads:
        raise ValueError("no worker sent records")
    origin = min(p["t0_epoch"] for p in payloads)
    by_index: dict[int, RequestResult] = {}
    end = 0.0
    for p in payloads:
        shift = p["t0_epoch"] - origin
        end = max(end, shift + p["duration_s"])
        for rec in p["records"]:
            d = dict(zip(RECORD_FIELDS, rec))
            if d["index"] in by_index:
                raise ValueError(f"plan index {d['index']} came from two workers")
            by_index[d["index"]] = RequestResult(
                prompt_len=d["prompt_len"], output_tokens=d["output_tokens"], success=d["success"], ttft=d["ttft"],
                itl=list(d["itl"]), latency=d["latency"], start_time=shift + d["start_rel"],
                scheduled_time=shift + d["scheduled_rel"], queue_time=d["queue_time"], error=d["error"])
    info = dict(payloads[0]["info"])
    info["num_prompts"] = len(by_index)
    caches = [p["info"].get("cache") for p in payloads if p["info"].get("cache")]
    befores = [c[0] for c in caches if c[0]]
    afters = [c[1] for c in caches if c[1]]
    # the endpoint's counters are global: the run's window is the earliest "before" to the latest "after"
    info["cache"] = [min(befores, key=lambda x: x[0]) if befores else None,
                     max(afters, key=lambda x: x[0]) if afters else None]
    info["workers"] = len(payloads)
    return [by_index[i] for i in sorted(by_index)], end, info


def hit_rate(before, after) -> float | None:
    """Prefix-cache hit rate over a run: hit tokens / queried tokens between two (queries, hits) readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


def write_result(o: Any, results: list[RequestResult], duration_s: float, info: dict) -> dict:
    """Write the run's result JSON (vLLM's ``--save-result`` keys and ours) and PNG from Locust's parsed
    options ``o``; print the summary table. Returns the document."""
    percentiles = [float(p) for p in o.percentiles.split(",") if p]
    goodput = parse_goodput(o.goodput)
    metrics = calculate_metrics(results, duration_s, percentiles, goodput)
    lags = sorted((r.start_time - r.queue_time - r.scheduled_time) * 1000 for r in results)
    cache0, cache1 = (info.get("cache") or [None, None])
    extra = {"send_lag_ms_p50": lags[len(lags) // 2] if lags else 0.0,
             "send_lag_ms_p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else 0.0,
             "send_lag_ms_max": lags[-1] if lags else 0.0,
             "mean_queue_time_ms": 1000 * sum(r.queue_time for r in results) / max(1, len(results)),
             "goodput_slos_ms": goodput or None, "percentiles": percentiles, "seed": o.seed,
             "endpoint": info["path"], "ignore_eos": o.ignore_eos, "driver": "locust (emugate loadtests.sharegpt)",
             "prefix_cache_hit_rate": hit_rate(cache0, cache1), "workers": info.get("workers", 1)}
    if info.get("trace"):
        extra.update(info["trace"])
    doc = result_json(results, metrics, backend="openai-chat" if info["chat"] else "openai", model_id=info["model"],
                      tokenizer_id=info["tokenizer"], num_prompts=info["num_prompts"], request_rate=o.request_rate,
                      burstiness=o.burstiness, max_concurrency=o.max_concurrency or None, label=o.label, extra=extra)
    out = o.result_json
    write_json(doc, out)
    png = o.result_png or os.path.splitext(out)[0] + ".png"
    write_png(results, png, title=f"{info['model']} @ {o.request_rate} req/s (burstiness {o.burstiness})")
    print(summary_table(metrics, percentiles), file=sys.stderr)
    print(f"[sharegpt] send lag p99 {extra['send_lag_ms_p99']:.2f} ms; wrote {out} and {png}", file=sys.stderr)
    return doc


class Merger:
    """On the master: collects every worker's records (a Locust custom message) and, once all
    ``--plan-workers`` have sent theirs, writes the one merged result and stops the run."""

    def __init__(self, environment, options) -> None:
        self.env = environment
        self.o = options
        self.payloads: dict[int, dict] = {}

    def on_message(self, msg, **_) -> None:
        """Locust message handler (``msg.data``: one :func:`worker_payload`)."""
        p = msg.data
        self.payloads[int(p["worker"])] = p
        print(f"[sharegpt] master: records of worker {p['worker']} ({len(p['records'])} requests); "
              f"{len(self.payloads)}/{self.o.plan_workers}", file=sys.stderr, flush=True)
        if len(self.payloads) >= self.o.plan_workers:
            results, duration, info = merge_payloads(list(self.payloads.values()))
            write_result(self.o, results, duration, info)
            self.env.runner.quit()
