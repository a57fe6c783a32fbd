"""Open-loop ShareGPT load against an OpenAI endpoint (the gateway, or vLLM directly).

    locust -f loadtests/sharegpt.py --headless -H http://127.0.0.1:8000 \\
        --model mistral-h1024-l8 --request-rate 5 --num-prompts 200 \\
        --result-json runs/r5.json --result-png runs/r5.png

One *driver* user per Locust process sends every request of the plan at its
scheduled time (a greenlet per arrival): open loop, as ``vllm bench serve``,
never closed-loop users or a LoadTestShape. The plan (ShareGPT sampling and
gamma/Poisson arrivals) is vLLM's (:mod:`loadtests.plan`), so the same
seed gives the same requests at the same times as ``vllm bench serve``.
Each request is measured by :mod:`loadtests.sse` (bytes timestamped as they
arrive) and aggregated by :mod:`loadtests.metrics` (vLLM's definitions).

Locust's UI shows, besides the HTTP row, one row each for TTFT, TPOT, ITL
(the request's mean gap; exact per-gap ITL percentiles are in the JSON) and
E2EL, in ms. At the end the run writes ``--result-json`` (the keys of
vLLM's ``--save-result``, plus goodput and send-lag figures) and
``--result-png``, and stops Locust.

``python loadtests/sharegpt.py --help`` lists the workload's options
(``locust --help`` prints before it loads a locustfile, so it cannot).

Trace replay: ``--trace FILE`` replays a Mooncake JSONL, Azure CSV or emugate
recording instead (:mod:`loadtests.trace`): arrivals follow the timestamps
(``--time-scale``, ``--trace-start``, ``--trace-duration``), prompts are token
ids with exactly the trace's lengths and shared prefix blocks, sent to
``/v1/completions`` with ``max_tokens`` = the output length and ``ignore_eos``.
The result adds the prefix-cache hit rate the backends saw (their
``vllm:prefix_cache_*`` counters on ``/metrics``, before and after) beside the
trace's ideal hit rate, and the requests clipped to ``max_model_len``.

Distributed: start each worker with ``--plan-workers N`` (N workers in all);
worker i sends every N-th request of the plan and writes its own
``<result-json>.worker<i>``.
"""
from __future__ import annotations

import os
import sys
import time

import gevent
from gevent.lock import Semaphore
from locust import User, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtests.endpoint import EndpointNotReady, wait_for_model  # noqa: E402
from loadtests.metrics import RequestResult, calculate_metrics, parse_goodput, result_json  # noqa: E402
from loadtests.options import add_workload_args  # noqa: E402
from loadtests.plan import PlanSpec, make_plan, split_for_worker  # noqa: E402
from loadtests.report import summary_table, write_json, write_png  # noqa: E402
from loadtests.sse import ConnectionPool, build_payload, stream_request  # noqa: E402


@events.init_command_line_parser.add_listener
def _options(parser):
    add_workload_args(parser)


def _resolve_model_and_tokenizer(host: str, opts, headers: dict[str, str]) -> tuple[str, str]:
    model, tok = opts.model, opts.tokenizer
    root = None
    if opts.ready_check_timeout_sec > 0 or model is None or tok is None:
        log = (lambda m: print(m, file=sys.stderr, flush=True))
        data = wait_for_model(host, model, headers, opts.ready_check_timeout_sec, log=log)
        entry = next(m for m in data if model is None or m["id"] == model)
        model = model or entry["id"]
        root = entry.get("root")
    if tok is None:
        try:
            from profiles.assets import resolve_model_dir
            tok = str(resolve_model_dir(model))
        except (FileNotFoundError, ImportError):
            tok = root or model
    return model, tok


def _served_max_model_len(host: str, model: str, headers: dict[str, str]) -> int | None:
    """The served model's ``max_model_len`` from ``GET /v1/models`` (vLLM reports it), or None."""
    import httpx
    try:
        data = httpx.get(host.rstrip("/") + "/v1/models", headers=headers, timeout=30).json().get("data", [])
        return next((int(m["max_model_len"]) for m in data if m.get("id") == model and m.get("max_model_len")), None)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None


def prefix_cache_counters(host: str, headers: dict[str, str]) -> tuple[float, float] | None:
    """(queries, hits) of the endpoint's prefix cache, in tokens, summed over every replica's
    ``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits`` counters on ``/metrics``; None when unreadable."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    try:
        text = httpx.get(host.rstrip("/") + "/metrics", headers=headers, timeout=30).text
        fams = {f.name: f for f in text_string_to_metric_families(text)}
    except (httpx.HTTPError, ValueError):
        return None
    def total(name: str) -> float:
        f = fams.get(name)
        return sum(s.value for s in f.samples if s.name.endswith("_total")) if f else float("nan")
    q, h = total("vllm:prefix_cache_queries"), total("vllm:prefix_cache_hits")
    return None if q != q or h != h else (q, h)


def _hit_rate(before, after) -> float | None:
    """Prefix-cache hit rate over a run: hit tokens / queried tokens between two counter readings."""
    if before is None or after is None or after[0] <= before[0]:
        return None
    return (after[1] - before[1]) / (after[0] - before[0])


class ShareGPTDriver(User):
    """The one user per process that executes the plan (see module docstring)."""

    fixed_count = 1
    host = "http://127.0.0.1:8000"

    def wait_time(self):
        return 3600

    @task
    def drive(self):
        """Run the plan; on any error print it, set Locust's exit code to 1 and stop (never hang)."""
        try:
            self._drive()
        except gevent.GreenletExit:
            raise
        except Exception as e:  # noqa: BLE001 - reported, then the run ends with exit code 1
            if not isinstance(e, EndpointNotReady):
                import traceback
                traceback.print_exc(file=sys.stderr)
            print(f"[sharegpt] error: {e}", file=sys.stderr, flush=True)
            self.environment.process_exit_code = 1
            self.environment.runner.quit()
            raise gevent.GreenletExit() from None

    def _drive(self):
        env = self.environment
        o = env.parsed_options
        runner = env.runner
        widx = getattr(runner, "worker_index", 0) or 0
        headers = {"Authorization": f"Bearer {o.api_key}"} if o.api_key else {}
        model, tok = _resolve_model_and_tokenizer(self.host, o, headers)
        trace = builder = None
        if o.trace:
            from loadtests.plan import TraceSpec, make_trace_plan
            from loadtests.trace import PromptBuilder, cached_word_pool
            max_len = o.max_model_len or _served_max_model_len(self.host, model, headers)
            full, trace = make_trace_plan(TraceSpec(o.trace, o.trace_format, o.time_scale, o.trace_start,
                                                    o.trace_duration, o.scale_inputs, max_len))
            builder = PromptBuilder(cached_word_pool(tok, o.tokenizer_mode), trace.block_size, seed=o.seed)
            plan = split_for_worker(full, widx, o.plan_workers)
            o.endpoint = "completions"  # token-id prompts: exact lengths and shared prefixes
            print(f"[sharegpt] trace {o.trace}: {len(trace)} requests over {trace.duration_s:.0f} s (time scale "
                  f"{o.time_scale:g}), ideal prefix-cache hit rate {trace.ideal_hit_rate():.1%}, "
                  f"{trace.over_max_model_len} clipped to max_model_len {max_len}", file=sys.stderr)
        else:
            spec = PlanSpec(tokenizer=tok, num_prompts=o.num_prompts, request_rate=o.request_rate,
                            burstiness=o.burstiness, seed=o.seed, dataset_path=o.dataset_path,
                            output_len=o.output_len, ramp_up_strategy=o.ramp_up_strategy,
                            ramp_up_start_rps=o.ramp_up_start_rps, ramp_up_end_rps=o.ramp_up_end_rps,
                            tokenizer_mode=o.tokenizer_mode)
            plan = split_for_worker(make_plan(spec), widx, o.plan_workers)
        percentiles = [float(p) for p in o.percentiles.split(",") if p]
        goodput = parse_goodput(o.goodput)
        chat = o.endpoint == "chat"
        path = "/v1/chat/completions" if chat else "/v1/completions"
        cache0 = prefix_cache_counters(self.host, headers)
        pool = ConnectionPool(self.host)
        sem = Semaphore(o.max_concurrency) if o.max_concurrency else None
        results = [RequestResult() for _ in plan]
        print(f"[sharegpt] {len(plan)} requests at {o.request_rate} req/s (burstiness {o.burstiness}, "
              f"seed {o.seed}) -> {self.host}{path} model={model}", file=sys.stderr)

        def one(i: int, p, scheduled: float) -> None:
            r = results[i]
            r.scheduled_time = scheduled
            q0 = time.perf_counter()
            if sem:
                sem.acquire()
            try:
                r.queue_time = time.perf_counter() - q0
                if builder is not None:
                    payload = build_payload("completions", model, builder.prompt(p.request, p.index),
                                            p.request.output_length, True)
                    stream_request(pool, path, payload, p.request.input_length, False, headers, r)
                else:
                    payload = build_payload(o.endpoint, model, p.request.prompt, p.request.expected_output_len,
                                            o.ignore_eos)
                    stream_request(pool, path, payload, p.request.prompt_len, chat, headers, r)
            finally:
                if sem:
                    sem.release()
            exc = None if r.success else RuntimeError(r.error[:300])
            events.request.fire(request_type="POST", name=path, response_time=r.latency * 1000,
                                response_length=r.output_tokens, exception=exc, context={})
            if r.success:
                rows = {"TTFT": r.ttft, "E2EL": r.latency}
                if r.output_tokens > 1:
                    rows["TPOT"] = (r.latency - r.ttft) / (r.output_tokens - 1)
                if r.itl:
                    rows["ITL"] = sum(r.itl) / len(r.itl)
                for name, v in rows.items():
                    events.request.fire(request_type=name, name=name.lower(), response_time=v * 1000,
                                        response_length=0, exception=None, context={})

        greenlets = []
        t0 = time.perf_counter()
        for i, p in enumerate(plan):
            delay = t0 + p.at - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            greenlets.append(gevent.spawn(one, i, p, t0 + p.at))
        gevent.joinall(greenlets)
        duration = time.perf_counter() - t0
        metrics = calculate_metrics(results, duration, percentiles, goodput)
        lags = sorted((r.start_time - r.queue_time - r.scheduled_time) * 1000 for r in results)
        cache1 = prefix_cache_counters(self.host, headers)
        extra = {"send_lag_ms_p50": lags[len(lags) // 2] if lags else 0.0,
                 "send_lag_ms_p99": lags[min(len(lags) - 1, int(len(lags) * 0.99))] if lags else 0.0,
                 "send_lag_ms_max": lags[-1] if lags else 0.0,
                 "mean_queue_time_ms": 1000 * sum(r.queue_time for r in results) / max(1, len(results)),
                 "goodput_slos_ms": goodput or None, "percentiles": percentiles, "seed": o.seed,
                 "endpoint": path, "ignore_eos": o.ignore_eos, "driver": "locust (emugate loadtests.sharegpt)",
                 "prefix_cache_hit_rate": _hit_rate(cache0, cache1)}
        if trace is not None:
            extra.update({"trace": o.trace, "time_scale": o.time_scale, "trace_start_s": o.trace_start,
                          "trace_duration_s": trace.duration_s, "trace_block_size": trace.block_size,
                          "trace_ideal_hit_rate": trace.ideal_hit_rate(),
                          "over_max_model_len": trace.over_max_model_len, "trace_notes": trace.notes})
        doc = result_json(results, metrics, backend="openai-chat" if chat else "openai", model_id=model,
                          tokenizer_id=tok, num_prompts=len(plan), request_rate=o.request_rate,
                          burstiness=o.burstiness, max_concurrency=o.max_concurrency or None,
                          label=o.label, extra=extra)
        out = o.result_json if o.plan_workers <= 1 else f"{o.result_json}.worker{widx}"
        write_json(doc, out)
        png = o.result_png or os.path.splitext(out)[0] + ".png"
        write_png(results, png, title=f"{model} @ {o.request_rate} req/s (burstiness {o.burstiness})")
        print(summary_table(metrics, percentiles), file=sys.stderr)
        print(f"[sharegpt] send lag p99 {extra['send_lag_ms_p99']:.2f} ms; wrote {out} and {png}", file=sys.stderr)
        runner.quit()
        raise gevent.GreenletExit()


if __name__ == "__main__":
    # `locust --help` prints before loading a locustfile, so list this workload's options here.
    import argparse
    _p = argparse.ArgumentParser(prog="locust -f loadtests/sharegpt.py",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(_p)
    _p.print_help()
