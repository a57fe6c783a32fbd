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

Distributed (Locust's own mechanism): ``locust ... --master --expect-workers N --plan-workers N`` and N
``locust ... --worker --plan-workers N``; worker i sends every N-th request of the plan and ships its raw
per-request records to the master (a Locust custom message), which writes ONE ``--result-json`` and PNG
from the union of the records (exact distributions, never averages of worker percentiles):
:mod:`loadtests.merge`.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict

import gevent
from gevent.lock import Semaphore
from locust import User, events, task

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loadtests.endpoint import EndpointNotReady, wait_for_model  # noqa: E402
from loadtests.metrics import RequestResult, parse_goodput  # noqa: E402
from loadtests.options import add_workload_args  # noqa: E402
from loadtests.plan import PlanSpec, make_plan, plan_cache_path, split_for_worker  # noqa: E402
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


def _in_child_process(code: str, *args: str) -> None:
    """Run ``python -c code args...`` in a child process and wait for it without blocking the event loop.

    Used to build the on-disk caches (the ShareGPT plan, a tokenizer's word pool) that take seconds of
    CPU: run inline, they would stall this Locust process's greenlets, and a worker that stalls misses
    its heartbeats to the master, which then drops it and the distributed run never ends.

    Raises:
        RuntimeError: the child failed; the message carries the end of its stderr.
    """
    import gevent.subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = gevent.subprocess.run([sys.executable, "-c", code, *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"building the load plan failed (exit {proc.returncode}): {proc.stderr[-2000:]}")


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


#: The Locust custom message a worker sends its raw per-request records in (distributed runs).
MERGE_MESSAGE = "emugate_sharegpt_records"


@events.init.add_listener
def _distributed(environment, **_):
    """Distributed runs (``--master`` / ``--worker`` with ``--plan-workers N``): one driver per worker, and
    the master merges the workers' records into one result JSON/PNG (:mod:`loadtests.merge`)."""
    from locust.runners import MasterRunner, WorkerRunner
    o = environment.parsed_options
    runner = environment.runner
    if o is None or not isinstance(runner, (MasterRunner, WorkerRunner)):
        return
    ShareGPTDriver.fixed_count = max(1, o.plan_workers)
    if isinstance(runner, MasterRunner):
        # one driver per worker: the master must spawn --plan-workers users (Locust's default is 1, and
        # Locust places fixed_count users one per worker)
        if (o.num_users or 0) != o.plan_workers:
            if o.num_users is not None:
                print(f"[sharegpt] master: -u {o.num_users} replaced by --plan-workers {o.plan_workers} "
                      "(one driver per worker)", file=sys.stderr, flush=True)
            o.num_users = o.plan_workers
        o.spawn_rate = max(float(o.spawn_rate or 0), float(o.plan_workers))
        from loadtests.merge import Merger
        merger = Merger(environment, o)
        runner.register_message(MERGE_MESSAGE, merger.on_message)


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
            _in_child_process("from loadtests.trace import cached_word_pool as f; import sys; "
                              "f(sys.argv[1], sys.argv[2] or None)", tok, o.tokenizer_mode or "")
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
            if not plan_cache_path(spec).is_file():
                _in_child_process("from loadtests.plan import main; main()", json.dumps(asdict(spec)))
            plan = split_for_worker(make_plan(spec), widx, o.plan_workers)
        parse_goodput(o.goodput), o.percentiles.split(",")  # bad SLOs fail before any request is sent
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
        t0_epoch = time.time()
        for i, p in enumerate(plan):
            delay = t0 + p.at - time.perf_counter()
            if delay > 0:
                gevent.sleep(delay)
            greenlets.append(gevent.spawn(one, i, p, t0 + p.at))
        gevent.joinall(greenlets)
        duration = time.perf_counter() - t0
        cache1 = prefix_cache_counters(self.host, headers)
        info = {"model": model, "tokenizer": tok, "chat": chat, "path": path, "num_prompts": len(plan),
                "cache": [cache0, cache1], "trace": None if trace is None else {
                    "trace": o.trace, "time_scale": o.time_scale, "trace_start_s": o.trace_start,
                    "trace_duration_s": trace.duration_s, "trace_block_size": trace.block_size,
                    "trace_ideal_hit_rate": trace.ideal_hit_rate(), "over_max_model_len": trace.over_max_model_len,
                    "trace_notes": trace.notes}}
        from loadtests.merge import worker_payload, write_result
        if o.plan_workers > 1:
            # distributed: the master merges every worker's raw records into one result (loadtests/merge.py)
            runner.send_message(MERGE_MESSAGE, worker_payload(widx, [p.index for p in plan], results, t0, t0_epoch,
                                                               duration, info))
            print(f"[sharegpt] worker {widx}: {len(results)} requests sent to the master for the merged result",
                  file=sys.stderr, flush=True)
            return
        write_result(o, results, duration, info)
        runner.quit()
        raise gevent.GreenletExit()


if __name__ == "__main__":
    # `locust --help` prints before loading a locustfile, so list this workload's options here.
    import argparse
    _p = argparse.ArgumentParser(prog="locust -f loadtests/sharegpt.py",
                                 description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _options(_p)
    _p.print_help()
