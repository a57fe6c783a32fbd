"""Serving metrics exactly as ``vllm bench serve`` computes them (vLLM 0.32).

Per request (:class:`RequestResult`, as vLLM's ``RequestFuncOutput``):

* TTFT: first SSE message carrying ``choices`` minus the send time;
* ITL: gaps between consecutive ``choices`` messages (one per message);
* E2EL (``latency``): last ``choices`` message minus the send time (the
  trailing usage-only message and ``[DONE]`` do not count);
* output tokens: ``usage.completion_tokens``.

Aggregates (:func:`calculate_metrics`, after ``vllm.benchmarks.serve.
calculate_metrics``): TPOT = (E2EL - TTFT)/(output tokens - 1) over requests
with > 1 output token; ITL percentiles over all gaps of all requests;
``np.mean/median/std/percentile`` of seconds x 1000 (ms); throughputs over
the benchmark duration; goodput counts requests meeting every SLO (ms,
``ttft``/``tpot``/``e2el``; TPOT counted 0 for 1-token outputs).

:func:`result_json` writes the keys of vLLM's ``--save-result`` output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_NAMES = {"ttft": "TTFT", "tpot": "TPOT", "itl": "ITL", "e2el": "E2EL"}


@dataclass
class RequestResult:
    """One request's measurement; times in seconds (perf_counter based)."""

    prompt_len: int = 0
    output_tokens: int = 0
    success: bool = False
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    start_time: float = 0.0
    scheduled_time: float = 0.0  # when the schedule said to send it
    queue_time: float = 0.0  # time spent waiting for --max-concurrency
    generated_text: str = ""
    error: str = ""
    token_times: list[float] = field(default_factory=list)


def _stats(values: list[float], percentiles: list[float]) -> dict[str, Any]:
    v = values or 0
    out = {"mean": float(np.mean(v) * 1000), "median": float(np.median(v) * 1000),
           "std": float(np.std(v) * 1000)}
    out["percentiles"] = [(p, float(np.percentile(v, p) * 1000)) for p in percentiles]
    return out


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """``["ttft:500", "tpot:50"]`` -> {"ttft": 500.0, "tpot": 50.0} (ms).

    Raises ValueError for an unknown metric or a non-positive value.
    """
    out: dict[str, float] = {}
    for item in items or []:
        name, _, value = item.partition(":")
        name = name.strip().lower()
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput SLO {item!r}: metric must be ttft, tpot or e2el")
        v = float(value)
        if v <= 0:
            raise ValueError(f"goodput SLO {item!r}: value (ms) must be > 0")
        out[name] = v
    return out


def calculate_metrics(results: list[RequestResult], duration_s: float, percentiles: list[float],
                      goodput: dict[str, float] | None = None) -> dict[str, Any]:
    """Aggregate metrics, keyed as in vLLM's result JSON (ms, tokens/s, requests/s)."""
    output_lens, ttfts, tpots, all_tpots, itls, e2els = [], [], [], [], [], []
    total_input = completed = good = 0
    for r in results:
        if not r.success:
            output_lens.append(0)
            continue
        n = r.output_tokens or 1
        output_lens.append(n)
        total_input += r.prompt_len
        tpot = 0.0
        if n > 1:
            tpot = (r.latency - r.ttft) / (n - 1)
            tpots.append(tpot)
        all_tpots.append(tpot)
        itls += r.itl
        ttfts.append(r.ttft)
        e2els.append(r.latency)
        completed += 1
    if goodput:
        cols, slos = [], []
        for key, col in (("ttft", ttfts), ("tpot", all_tpots), ("e2el", e2els)):
            if key in goodput:
                cols.append(col)
                slos.append(goodput[key] / 1000.0)
        good = sum(all(s >= v for s, v in zip(slos, vals)) for vals in zip(*cols))
    total_output = sum(output_lens)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": completed,
        "failed": sum(1 for r in results if not r.success),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": completed / duration_s,
        "request_goodput": good / duration_s if goodput else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
    }
    for key, vals in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        st = _stats(vals, percentiles)
        out[f"mean_{key}_ms"] = st["mean"]
        out[f"median_{key}_ms"] = st["median"]
        out[f"std_{key}_ms"] = st["std"]
        for p, v in st["percentiles"]:
            pw = str(int(p)) if int(p) == p else str(p)
            out[f"p{pw}_{key}_ms"] = v
    out["max_output_tokens_per_s"], out["max_concurrent_requests"] = _peaks(results)
    return out


def _peaks(results: list[RequestResult]) -> tuple[float, int]:
    """vLLM's per-second peak output tokens/s and concurrent requests."""
    ok = [r for r in results if r.success]
    if not ok:
        return 0.0, 0
    t0 = min(r.start_time for r in ok)
    t1 = max(r.start_time + r.latency for r in ok)
    n = int(np.ceil(t1 - t0)) + 1
    tok, conc = np.zeros(n), np.zeros(n)
    for r in ok:
        t = r.start_time + r.ttft
        times = [t]
        for g in r.itl:
            t += g
            times.append(t)
        for x in times:
            b = int(x - t0)
            if 0 <= b < n:
                tok[b] += 1
        for s in range(int(r.start_time - t0), int(r.start_time + r.latency - t0) + 1):
            conc[s] += 1
    return float(tok.max()), int(conc.max())


def result_json(results: list[RequestResult], metrics: dict[str, Any], *, backend: str, model_id: str,
                tokenizer_id: str, num_prompts: int, request_rate: float, burstiness: float,
                max_concurrency: int | None, label: str | None = None, extra: dict | None = None) -> dict:
    """The document vLLM's ``--save-result`` writes, from our measurements."""
    doc: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": backend, "backend": backend, "label": label,
        "model_id": model_id, "tokenizer_id": tokenizer_id, "num_prompts": num_prompts,
        "request_rate": request_rate if request_rate != float("inf") else "inf",
        "burstiness": burstiness, "max_concurrency": max_concurrency,
    }
    doc.update(metrics)
    doc.update({
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.queue_time for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    })
    doc.update(extra or {})
    return doc
