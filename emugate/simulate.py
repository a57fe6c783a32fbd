"""``emugate simulate``: vLLM's own engine core in virtual time.

Capacity questions ("how many replicas of which GPU for this traffic under this SLO?") need many
runs of many configurations; emulate mode answers them only in real time. Here the same engine
runs without a clock to wait on:

* **engine**: vLLM's ``EngineCore`` (V1 scheduler, KV-cache manager, prefix cache, chunked
  prefill, preemption, async scheduling's batch queue) in this process, over the emulated
  executor on a virtual clock (:class:`emu_executor.virtual.VirtualTimeExecutor`). The engine
  configuration is built exactly as the gateway starts a replica (``gateway.launch.vllm_command``
  parsed by vLLM's own server argument parser), and the emulation platform then applies the
  profile's fingerprint (async scheduling, block size, ``max_num_batched_tokens``,
  ``max_num_seqs``) as in emulate mode; the KV pool is the profile's.
* **requests**: the same request bodies the Locust driver sends (``loadtests.sse.build_payload``),
  turned into engine requests by vLLM's own front-end code (its OpenAI request classes, renderer,
  chat template, ``get_max_tokens``, ``to_sampling_params`` and ``InputProcessor``), so prompt
  tokens, ``max_tokens`` and sampling parameters are the server's. No detokenization, no HTTP.
* **time**: a request arrives at its scheduled time on the virtual clock; the engine loop runs as
  vLLM's busy loop does (take every request that has arrived, then one ``step_fn``), and a step's
  output is collected when the device finishes it (step end = ``max(now, previous end + host gap)
  + latency``, the oracle's draws). The engine's own CPU time counts as zero: on the profiled
  hardware it is inside the recorded step times and host gaps. What this leaves out, the API
  server and client path, is measured by ``benchmarks/simulate_agreement.py``.
* **fleet**: N replicas of one or several backends; each request's replica is chosen by
  ``gateway.routing.pick`` itself (the gateway's policies), with the gateway's outstanding counts
  (a request is outstanding from its arrival to its last token) and, for ``kv_aware``, the
  replica's waiting queue and KV usage as a ``/metrics`` poll every ``metrics_poll_s`` would see.

Metrics per request follow ``vllm bench serve`` (TTFT, ITL, E2EL from token times; TPOT per
request), and :func:`result_doc` writes vLLM's result JSON, so ``emugate compare`` works between
a simulated, an emulated and a real run.
"""
from __future__ import annotations

import contextlib
import heapq
import logging
import os
import random
import sys
import time
from array import array
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

from gateway.config import BackendConfig, Config
from loadtests.metrics import RequestResult

#: The executor qualname simulate runs under (the emulated executor on a virtual clock).
VIRTUAL_EXECUTOR = "emu_executor.virtual.VirtualTimeExecutor"


class SimulationError(ValueError):
    """A simulation cannot run as asked; the message says what to change."""


# --------------------------------------------------------------------------- workload
@dataclass(slots=True)
class Arrival:
    """One request of a workload: when it arrives (s from the run's start), its OpenAI body, and the
    prompt length the workload counts it with (tokens; ``input_lens`` in the result, as vLLM's
    benchmark counts the dataset's length).

    ``body`` is built on demand by :meth:`Workload.body` so that a long trace never holds every
    prompt in memory.
    """

    index: int
    at: float
    prompt_len: int
    source: Any  # the plan entry (loadtests.plan.PlannedRequest / TracePlannedRequest)
    model: str = ""


@dataclass
class Workload:
    """Arrivals with the request bodies the Locust driver would send for them.

    Build one with :func:`sharegpt_workload` or :func:`trace_workload`.
    """

    arrivals: list[Arrival]
    endpoint: str  # "chat" or "completions"
    ignore_eos: bool
    describe: str
    request_rate: float
    burstiness: float
    seed: int
    tokenizer: str
    builder: Any = None  # loadtests.trace.PromptBuilder for traces
    extra: dict = field(default_factory=dict)
    key: str = ""  # names the request set (not the arrival times): rendered prompts are cached by (key, index)

    def head(self, n: int) -> "Workload":
        """The first ``n`` requests (same key: their rendered prompts are shared)."""
        return Workload(self.arrivals[:n], self.endpoint, self.ignore_eos, self.describe, self.request_rate,
                        self.burstiness, self.seed, self.tokenizer, self.builder, dict(self.extra), self.key)

    def at_rate(self, rate: float) -> "Workload":
        """The same requests at another mean rate (req/s). ShareGPT: arrival times drawn as the Locust
        driver draws them for this seed and burstiness (``loadtests.arrivals.arrival_times``); a trace:
        its timestamps scaled (its burst pattern kept).

        Raises:
            SimulationError: a rate <= 0.
        """
        from loadtests.arrivals import arrival_times
        if not rate > 0:
            raise SimulationError(f"request rate must be > 0 req/s (got {rate:g})")
        if self.builder is not None:  # a trace keeps its shape: its timestamps scaled to the new mean rate
            f = self.request_rate / rate
            arrivals = [Arrival(a.index, a.at * f, a.prompt_len, a.source, a.model) for a in self.arrivals]
            return Workload(arrivals, self.endpoint, self.ignore_eos, f"{self.describe.split(' (')[0]} (timestamps "
                            f"x{f:.3g}: {rate:g} req/s)", rate, self.burstiness, self.seed, self.tokenizer,
                            self.builder, dict(self.extra), self.key)
        times = arrival_times(len(self.arrivals), rate, self.burstiness, self.seed)
        arrivals = [Arrival(a.index, t, a.prompt_len, a.source, a.model) for a, t in zip(self.arrivals, times)]
        d = self.describe.split(" at ")[0]
        return Workload(arrivals, self.endpoint, self.ignore_eos, f"{d} at {rate:g} req/s (burstiness "
                        f"{self.burstiness:g}, seed {self.seed})", rate, self.burstiness, self.seed, self.tokenizer,
                        None, dict(self.extra), self.key)

    def body(self, a: Arrival, model: str) -> dict:
        """The request body for arrival ``a`` (``loadtests.sse.build_payload``, as the driver sends it)."""
        from loadtests.sse import build_payload
        if self.builder is not None:
            r = a.source.request
            return build_payload("completions", model, self.builder.prompt(r, a.source.index), r.output_length,
                                 True)
        r = a.source.request
        return build_payload(self.endpoint, model, r.prompt, r.expected_output_len, self.ignore_eos)

    @property
    def duration_s(self) -> float:
        """The last arrival's time (s)."""
        return self.arrivals[-1].at if self.arrivals else 0.0


def sharegpt_workload(tokenizer: str, *, num_prompts: int, request_rate: float, burstiness: float = 1.0,
                      seed: int = 0, endpoint: str = "chat", ignore_eos: bool = False,
                      dataset_path: str | None = None, output_len: int | None = None,
                      tokenizer_mode: str | None = None) -> Workload:
    """ShareGPT open-loop arrivals, exactly the Locust driver's plan (``loadtests.plan.make_plan``:
    vLLM's sampling, Poisson/gamma arrivals at ``request_rate`` req/s with ``burstiness``, one seed).

    Raises:
        SimulationError: a rate <= 0 or no prompts.
    """
    from loadtests.plan import PlanSpec, make_plan
    if not request_rate > 0:
        raise SimulationError(f"--request-rate must be > 0 req/s (got {request_rate:g}); a rate of 0 sends nothing")
    if num_prompts < 1:
        raise SimulationError(f"--num-prompts must be >= 1 (got {num_prompts})")
    if not burstiness > 0:
        raise SimulationError(f"--burstiness must be > 0 (got {burstiness:g})")
    plan = make_plan(PlanSpec(tokenizer=tokenizer, num_prompts=num_prompts, request_rate=request_rate,
                              burstiness=burstiness, seed=seed, dataset_path=dataset_path, output_len=output_len,
                              tokenizer_mode=tokenizer_mode))
    arrivals = [Arrival(p.index, p.at, p.request.prompt_len, p) for p in plan]
    # no num_prompts in the key: vLLM's sampling shuffles with the seed and takes the first valid entries,
    # so a smaller sample is a prefix of a larger one and index i is the same request in both
    key = f"sharegpt|{tokenizer}|{seed}|{dataset_path}|{output_len}|{endpoint}|{ignore_eos}"
    return Workload(arrivals, endpoint, ignore_eos, f"ShareGPT {len(plan)} requests at {request_rate:g} req/s "
                    f"(burstiness {burstiness:g}, seed {seed})", request_rate, burstiness, seed, tokenizer, key=key)


def trace_workload(path: str, tokenizer: str, *, fmt: str | None = None, time_scale: float = 1.0,
                   start_s: float = 0.0, duration_s: float | None = None, scale_inputs: float = 1.0,
                   max_model_len: int | None = None, seed: int = 0, tokenizer_mode: str | None = None) -> Workload:
    """A timestamped trace (Mooncake JSONL, Azure CSV, an emugate recording), as the Locust driver
    replays it: its window and time scale, lengths fitted to ``max_model_len``, token-id prompts whose
    shared hash ids share exactly those KV blocks, to ``/v1/completions`` with ``ignore_eos``.

    Raises:
        SimulationError: the trace is unreadable or its window holds no request (the message says which).
    """
    from loadtests.plan import TraceSpec, make_trace_plan
    from loadtests.trace import PromptBuilder, TraceError, cached_word_pool
    try:
        plan, trace = make_trace_plan(TraceSpec(path, fmt, time_scale, start_s, duration_s, scale_inputs,
                                                max_model_len))
    except TraceError as e:
        raise SimulationError(str(e)) from None
    if not plan:
        raise SimulationError(f"{path}: no request in the window (start {start_s:g} s, duration "
                              f"{duration_s if duration_s is not None else 'all'} s); widen it or check the file")
    builder = PromptBuilder(cached_word_pool(tokenizer, tokenizer_mode), trace.block_size, seed=seed)
    arrivals = [Arrival(p.index, p.at, p.request.input_length, p) for p in plan]
    rate = len(plan) / max(trace.duration_s, 1e-9)
    extra = {"trace": path, "time_scale": time_scale, "trace_start_s": start_s, "trace_duration_s": trace.duration_s,
             "trace_block_size": trace.block_size, "trace_ideal_hit_rate": trace.ideal_hit_rate(),
             "over_max_model_len": trace.over_max_model_len}
    key = f"trace|{path}|{tokenizer}|{start_s}|{duration_s}|{scale_inputs}|{max_model_len}|{seed}"
    return Workload(arrivals, "completions", True, f"trace {path}: {len(plan)} requests over "
                    f"{trace.duration_s:.0f} s (time scale {time_scale:g})", rate, 1.0, seed, tokenizer, builder, extra,
                    key)


# --------------------------------------------------------------------------- engine
@contextlib.contextmanager
def _environ(updates: dict[str, str]):
    """Set environment variables for the block (the emulation platform and executor read theirs there)."""
    old = {k: os.environ.get(k) for k in updates}
    os.environ.update(updates)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def backend_engine_args(b: BackendConfig) -> tuple[list[str], dict[str, str]]:
    """(vLLM server arguments, emulate-mode environment) of backend ``b``'s replica 0, as the gateway
    starts it (``gateway.launch.vllm_command``), with the virtual-time executor.

    Raises:
        SimulationError: ``b`` is a real backend (simulation needs a profile).
        FileNotFoundError: its profile cannot be found.
    """
    from gateway.launch import vllm_command
    if b.urls:
        raise SimulationError(f"backend {b.name!r} fronts running servers (urls): simulate needs the profile they run; "
                              "describe one replica with mode = 'emulate' and its profile instead")
    if b.mode != "emulate":
        raise SimulationError(f"backend {b.name!r} is mode = 'real': simulate needs a latency profile. Capture one "
                              f"(emugate profile capture --config ... --backend {b.name}) and set mode = 'emulate', "
                              f"profile = '...'; or leave it out of the workload (--model)")
    argv, env = vllm_command(b.model_copy(update={"capture_trace": None}), port=8000, replica=0)
    argv = argv[argv.index("vllm.entrypoints.openai.api_server") + 1:]
    i = argv.index("--distributed-executor-backend")
    argv[i + 1] = VIRTUAL_EXECUTOR
    for flag in ("--host", "--port"):
        if flag in argv:
            j = argv.index(flag)
            del argv[j:j + 2]
    emu = {k: v for k, v in env.items() if k.startswith("EMUGATE_") or k == "HF_HUB_OFFLINE"}
    emu["EMUGATE_BOOST"] = "off"
    return argv, emu


class _Frontend:
    """A request body -> vLLM ``EngineCoreRequest``, by vLLM's own front-end code (module docstring)."""

    def __init__(self, vllm_config) -> None:
        from vllm.v1.engine.input_processor import InputProcessor
        self.mc = vllm_config.model_config
        self.ip = InputProcessor(vllm_config)
        self.renderer = self.ip.renderer
        self.defaults = self.mc.get_diff_sampling_param()
        gen = getattr(self.mc, "generation_config", "auto")
        self.override_max_tokens = (self.defaults.get("max_tokens") if gen not in ("auto", "vllm")
                                    else (getattr(self.mc, "override_generation_config", None) or {})
                                    .get("max_new_tokens"))

    def render(self, body: dict) -> tuple[dict, Any]:
        """(engine input, sampling parameters) of ``body`` (a chat body when it has ``messages``): the
        server's prompt tokens, ``max_tokens`` and sampling defaults.

        Raises:
            ValueError: vLLM refuses the request (its message: e.g. longer than max_model_len).
        """
        from vllm.entrypoints.serve.utils.api_utils import get_max_tokens
        r = self.renderer
        if "messages" in body:
            from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
            req = ChatCompletionRequest.model_validate(body)
            _, (engine_input,) = r.render_chat([req.messages], req.build_chat_params(None, "auto"),
                                               req.build_tok_params(self.mc))
            max_req = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        else:
            from vllm.entrypoints.openai.completion.protocol import CompletionRequest
            from vllm.renderers.inputs.preprocess import parse_model_prompt
            req = CompletionRequest.model_validate(body)
            (engine_input,) = r.render_cmpl([parse_model_prompt(self.mc, req.prompt)], req.build_tok_params(self.mc))
            max_req = req.max_tokens
        plen = len(engine_input["prompt_token_ids"])
        max_tokens = get_max_tokens(self.mc.max_model_len, max_req, plen, self.defaults, self.override_max_tokens)
        return engine_input, req.to_sampling_params(max_tokens, self.defaults)

    def request(self, request_id: str, rendered: tuple[dict, Any], arrival_s: float):
        """The ``EngineCoreRequest`` of a rendered body (:meth:`render`), arriving at ``arrival_s`` (s)."""
        engine_input, sp = rendered
        return self.ip.process_inputs(request_id, engine_input, sp, ("generate",), arrival_time=arrival_s)


def engine_config(b: BackendConfig):
    """vLLM's ``VllmConfig`` for emulated backend ``b``, parsed by ``vllm serve``'s own argument parser from
    the arguments the gateway would start it with; call inside ``_environ`` of the backend's emulation env.

    Raises:
        SimulationError: vLLM refuses the arguments or the engine configuration (its message).
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    argv, _ = backend_engine_args(b)
    parser = make_arg_parser(FlexibleArgumentParser(prog="vllm serve"))
    try:
        args = parser.parse_args(argv)
    except SystemExit:
        raise SimulationError(f"backend {b.name!r}: vLLM refused its arguments {argv}") from None
    try:
        return AsyncEngineArgs.from_cli_args(args).create_engine_config()
    except Exception as e:  # vLLM's validation errors (pydantic, ValueError)
        raise SimulationError(f"backend {b.name!r}: vLLM refused the engine configuration: {e}") from None


def build_engine(b: BackendConfig, replica: int = 0, seed: int | None = None):
    """(EngineCore, front end) for replica ``replica`` of emulated backend ``b``, in this process.

    Raises:
        SimulationError: a real backend, or vLLM refuses the engine arguments (its message).
        FileNotFoundError: the profile cannot be found.
    """
    _, env = backend_engine_args(b)
    env["EMUGATE_SEED"] = str((b.seed if seed is None else seed) + replica)
    with _environ(env):
        from vllm.v1.engine.core import EngineCore

        from emu_executor.virtual import VirtualTimeExecutor
        cfg = engine_config(b)
        try:
            core = EngineCore(cfg, executor_class=VirtualTimeExecutor, log_stats=False)
        except (ValueError, RuntimeError, NotImplementedError) as e:  # e.g. the KV pool cannot hold max_model_len
            raise SimulationError(f"backend {b.name!r}: vLLM could not start its engine: {e}") from None
        front = _Frontend(cfg)
    return core, front


# --------------------------------------------------------------------------- replicas
class _Pending:
    """A request in one replica: its arrival and token times (s, virtual)."""

    __slots__ = ("index", "at", "prompt_len", "times", "tokens")

    def __init__(self, index: int, at: float, prompt_len: int) -> None:
        self.index = index
        self.at = at
        self.prompt_len = prompt_len
        self.times = array("d")  # one entry per output message (a step's new tokens)
        self.tokens = 0


class SimReplica:
    """One emulated replica: an in-process engine core on its own virtual clock.

    Has the attributes ``gateway.routing.pick`` reads (``name``, ``ready``, ``outstanding``,
    ``num_waiting``, ``kv_usage``), kept as the gateway would see them (:class:`Fleet`).
    """

    def __init__(self, backend: BackendConfig, index: int, seed: int | None = None) -> None:
        self.backend = backend
        self.name = f"{backend.name}/{index}"
        self.index = index
        self.core, self.front = build_engine(backend, index, seed)
        self.executor = self.core.model_executor
        self.clock = self.executor.clock
        self.ready = True
        self.outstanding = 0
        self.num_waiting = 0
        self.kv_usage = 0.0
        self.next_poll = 0.0
        self._queue: list[tuple[float, int, Any]] = []  # arrivals routed here, not yet in the engine
        self._inflight: dict[str, _Pending] = {}
        self._finish_times: list[float] = []  # heap: finishes not yet counted against ``outstanding``
        self.results: dict[int, RequestResult] = {}
        self._run = 0
        self.on_finish: Callable[[RequestResult], bool] | None = None
        self.stopped = False

    def reset(self, seed: int, latency_scale: float = 1.0) -> None:
        """Prepare a new run (clock 0, the draws of ``seed``, an empty prefix cache).

        Raises:
            RuntimeError: the previous run left requests in the engine.
        """
        if self.has_work():
            raise RuntimeError(f"{self.name}: previous run not drained")
        self.executor.reset(seed + self.index, latency_scale)
        self.core.reset_prefix_cache()
        self.outstanding = self.num_waiting = 0
        self.kv_usage = 0.0
        self.next_poll = 0.0
        self._queue.clear()
        self._finish_times.clear()
        self.results = {}
        self._run += 1
        self.stopped = False

    def has_work(self) -> bool:
        """Requests in the scheduler, steps in flight, or arrivals queued for it."""
        c = self.core
        return bool(self._queue) or c.scheduler.has_requests() or bool(c.batch_queue)

    def enqueue(self, at: float, index: int, prompt_len: int, rendered: tuple[dict, Any]) -> None:
        """A request (rendered by this backend's front end) routed here at ``at`` (s); the engine takes it
        at its next loop iteration."""
        rid = f"r{self._run}-{index}"
        req = self.front.request(rid, rendered, at)
        self._queue.append((at, index, req, prompt_len))
        self.outstanding += 1

    def release(self, t: float) -> None:
        """Count requests finished by ``t`` (s) out of ``outstanding`` (the gateway's view at ``t``)."""
        h = self._finish_times
        while h and h[0] <= t:
            heapq.heappop(h)
            self.outstanding -= 1

    def poll(self, t: float, every_s: float) -> None:
        """Refresh ``num_waiting``/``kv_usage`` as a ``/metrics`` poll at ``t`` would (every ``every_s`` s)."""
        if t >= self.next_poll:
            sch = self.core.scheduler
            self.num_waiting = len(sch.waiting)
            self.kv_usage = sch.kv_cache_manager.usage
            self.next_poll = t + every_s

    def advance(self, until: float) -> None:
        """Run engine loop iterations that start before ``until`` (s)."""
        while self.clock.now < until and self.has_work() and not self.stopped:
            self.iterate()

    def drain(self) -> None:
        """Run until every request has finished (or ``on_finish`` stopped the run)."""
        while self.has_work() and not self.stopped:
            self.iterate()

    def abort_all(self) -> None:
        """Abort every request still queued or in the engine and flush the steps in flight."""
        self._queue.clear()
        ids = list(self._inflight)
        self._inflight.clear()
        if ids:
            self.core.abort_requests(ids)
        while self.has_work():
            self.iterate()

    def iterate(self) -> None:
        """One pass of vLLM's busy loop: admit what has arrived, then one ``step_fn``; record tokens."""
        core, clock, q = self.core, self.clock, self._queue
        if q:
            if not core.scheduler.has_requests() and not core.batch_queue and clock.now < q[0][0]:
                clock.now = q[0][0]  # idle until the next arrival
            n = 0
            while n < len(q) and q[n][0] <= clock.now:
                at, index, req, plen = q[n]
                self._inflight[req.request_id] = _Pending(index, at, plen)
                core.add_request(*core.preprocess_add_request(req))
                n += 1
            del q[:n]
        outputs, executed = core.step_fn()
        core.post_step(executed)
        if not outputs:
            return
        now = clock.now
        for eco in outputs.values():
            for o in eco.outputs:
                p = self._inflight.get(o.request_id)
                if p is None:
                    continue
                if o.new_token_ids:
                    p.times.append(now)
                    p.tokens += len(o.new_token_ids)
                if o.finish_reason is not None:
                    del self._inflight[o.request_id]
                    self._finish(p)

    def _finish(self, p: _Pending) -> None:
        t = p.times
        r = RequestResult(prompt_len=p.prompt_len, success=bool(t))
        if t:
            r.output_tokens = p.tokens
            r.ttft = t[0] - p.at
            r.latency = t[-1] - p.at
            r.itl = array("d", (t[i] - t[i - 1] for i in range(1, len(t))))
        else:
            r.error = "finished without an output token"
        r.start_time = r.scheduled_time = p.at
        self.results[p.index] = r
        heapq.heappush(self._finish_times, t[-1] if t else p.at)
        if self.on_finish is not None and self.on_finish(r):
            self.stopped = True

    def stats(self) -> dict:
        """This run's engine counters: steps, preemptions, prefix-cache tokens, device busy time (s)."""
        ex = self.executor
        return {"steps": ex.num_steps, "preemptions": ex.num_preemptions, "prefix_cache_queries": ex.prefix_queries,
                "prefix_cache_hits": ex.prefix_hits, "busy_s": ex.device.busy_s, "end_s": self.clock.now}

    def shutdown(self) -> None:
        """Release the engine core."""
        with contextlib.suppress(Exception):
            self.core.shutdown()


# --------------------------------------------------------------------------- rendering ahead
#: Runs with at least this many requests render them in a helper process ahead of the simulation
#: (on hosts with 2+ cores): vLLM's front end (chat template, tokenizer, request validation) is ~40 %
#: of a ShareGPT simulation's wall time on one core (benchmarks/simulate_speed.py).
RENDER_AHEAD_MIN = 1000
#: Requests per chunk sent to the helper, and chunks kept in flight.
RENDER_CHUNK = 128
RENDER_INFLIGHT = 4

_WORKER_FRONT: "_Frontend | None" = None


def _render_init(backend_json: str, env: dict[str, str]) -> None:
    """Helper process: build the backend's front end (vLLM's renderer and input processor) once."""
    global _WORKER_FRONT
    os.environ.update(env)
    quiet_vllm()
    b = BackendConfig.model_validate_json(backend_json)
    with _environ(backend_engine_args(b)[1]):
        _WORKER_FRONT = _Frontend(engine_config(b))


def _render_chunk(bodies: list[dict]) -> list:
    """Helper process: render a chunk of bodies; a refused body comes back as its ValueError."""
    out = []
    for b in bodies:
        try:
            out.append(_WORKER_FRONT.render(b))
        except ValueError as e:
            out.append(e)
    return out


class _RenderAhead:
    """Renders a workload's bodies in order, in one helper process, a few chunks ahead of the simulation
    (the same vLLM front-end code, so the rendered requests are identical to rendering in-process)."""

    def __init__(self, backend: BackendConfig, workload: "Workload", model: str) -> None:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        env = {k: v for k, v in os.environ.items() if k.startswith(("EMUGATE_", "VLLM_", "HF_"))}
        self._ex = ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_render_init,
                                       initargs=(backend.model_dump_json(), env))
        self._wl, self._model = workload, model
        self._next_chunk = 0
        self._futures: list = []
        self._buf: list = []
        for _ in range(RENDER_INFLIGHT):
            self._submit()

    def _submit(self) -> None:
        arr = self._wl.arrivals
        i = self._next_chunk * RENDER_CHUNK
        if i >= len(arr):
            return
        bodies = [self._wl.body(a, self._model) for a in arr[i:i + RENDER_CHUNK]]
        self._futures.append(self._ex.submit(_render_chunk, bodies))
        self._next_chunk += 1

    def next(self):
        """The next request's rendering, in workload order.

        Raises:
            ValueError: vLLM refused that request's body.
        """
        if not self._buf:
            self._buf = list(reversed(self._futures.pop(0).result()))
            self._submit()
        r = self._buf.pop()
        if isinstance(r, Exception):
            raise r
        return r

    def close(self) -> None:
        self._ex.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- fleet
@dataclass
class RunResult:
    """One simulated run: per-request results (in workload order), engine counters per replica, and
    what it cost (wall seconds)."""

    results: list[RequestResult]
    duration_s: float
    replicas: dict[str, dict]
    wall_s: float
    routed: dict[str, int]
    stopped: bool = False  # ended early by ``stop`` (requests after that point are missing)

    @property
    def speedup(self) -> float:
        """Simulated seconds per wall second."""
        return self.duration_s / self.wall_s if self.wall_s > 0 else float("inf")

    def totals(self) -> dict:
        """Counters summed over replicas."""
        keys = ("steps", "preemptions", "prefix_cache_queries", "prefix_cache_hits", "busy_s")
        return {k: sum(r[k] for r in self.replicas.values()) for k in keys}


class Fleet:
    """Replicas of one or several emulated backends behind the gateway's routing (module docstring).

    Args:
        config: a gateway config; only the backends ``models`` names are built (default: the first).
        models: served model names to build.
        replicas: override every built backend's ``replicas``.
        extra_args: vLLM engine arguments appended to every built backend's (e.g. ``["--max-num-seqs", "128"]``).
        progress: print one line per replica built.

    Raises:
        SimulationError: an unknown model name, a real backend, or vLLM refuses a configuration.
    """

    def __init__(self, config: Config, models: Sequence[str] | None = None, replicas: int | None = None,
                 extra_args: Sequence[str] = (), progress: bool = False) -> None:
        self.config = config
        self.policy = config.gateway.routing
        self.poll_s = config.gateway.metrics_poll_s
        names = {b.model_name: b for b in config.backends}
        wanted = list(models or [config.backends[0].model_name])
        unknown = [m for m in wanted if m not in names]
        if unknown:
            raise SimulationError(f"no backend serves {unknown}; the config serves {sorted(names)}")
        self.by_model: dict[str, list[SimReplica]] = {}
        self.backends: dict[str, BackendConfig] = {}
        for m in wanted:
            b = names[m]
            upd: dict = {"extra_args": [*b.extra_args, *extra_args]} if extra_args else {}
            if replicas is not None:
                upd["replicas"] = replicas
            if upd:
                b = b.model_copy(update=upd)
            self.backends[m] = b
            reps = []
            for i in range(b.replicas):
                t0 = time.perf_counter()
                reps.append(SimReplica(b, i))
                if progress:
                    print(f"[simulate] {b.name} replica {i + 1}/{b.replicas}: engine built in "
                          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
            self.by_model[m] = reps
        self.replicas = [r for reps in self.by_model.values() for r in reps]
        #: Keep each rendered request (prompt tokens, sampling parameters) for runs of the same request set
        #: at other rates or seeds (``emugate plan``); off for one long run, whose renders are used once.
        self.cache_renders = False
        self._renders: dict = {}
        #: Render long runs' requests in a helper process (:class:`_RenderAhead`); False: in-process.
        self.render_ahead = True

    def profile_notes(self) -> list[str]:
        """What users must know about each backend's profile (estimate labels, error bands)."""
        from profiles.format import Profile
        from profiles.summary import profile_notes
        out = []
        for m, b in self.backends.items():
            prof = self.by_model[m][0].executor.profile
            if isinstance(prof, Profile):
                out += [f"{b.name}: {line}" for line in profile_notes(prof)]
        return out

    def run(self, workload: Workload, seed: int = 0, latency_scale: float = 1.0,
            model_weights: dict[str, float] | None = None, progress: bool = False,
            stop: Callable[[RequestResult], bool] | None = None) -> RunResult:
        """Simulate ``workload`` through the fleet; every replica restarts at clock 0 with ``seed``.

        ``model_weights``: share of requests per served model (default: all to the first). Steps are
        timed as drawn x ``latency_scale``. ``stop``: called with each finished request; when it
        returns True the run ends there (every request still in flight is aborted; the result says
        ``stopped``): the planner's way to drop a run whose SLO has already failed.

        Raises:
            SimulationError: the workload is empty.
        """
        if not workload.arrivals:
            raise SimulationError("the workload holds no request")
        for r in self.replicas:
            r.reset(seed, latency_scale)
            r.on_finish = stop
        models = list(self.by_model)
        weights = [float((model_weights or {}).get(m, 1.0 if i == 0 else 0.0)) for i, m in enumerate(models)] \
            if model_weights else [1.0] + [0.0] * (len(models) - 1)
        pick_rng = random.Random(seed)
        from gateway.routing import affinity_key, pick
        routed = {r.name: 0 for r in self.replicas}
        t_wall = time.perf_counter()
        n = len(workload.arrivals)
        report_every = max(1, n // 20)
        ahead = None
        if (len(models) == 1 and not self.cache_renders and n >= RENDER_AHEAD_MIN
                and (os.cpu_count() or 1) >= 2 and self.render_ahead):
            ahead = _RenderAhead(self.backends[models[0]], workload, models[0])
        # the body is needed here to render it in-process, or for the affinity policies' key
        need_body = ahead is None or self.policy in ("prefix_affinity", "session_affinity")
        try:
            for k, a in enumerate(workload.arrivals):
                model = models[0] if len(models) == 1 else pick_rng.choices(models, weights)[0]
                reps = self.by_model[model]
                for r in reps:
                    r.advance(a.at)
                    r.release(a.at)
                body = workload.body(a, model) if need_body else None
                try:
                    rendered = ahead.next() if ahead is not None else self._render(reps[0], workload, a.index, body)
                except ValueError as e:
                    raise SimulationError(f"request {a.index}: vLLM refused it: {e}") from None
                if len(reps) == 1:
                    chosen = reps[0]
                else:
                    if self.policy == "kv_aware":
                        for r in reps:
                            r.poll(a.at, self.poll_s)
                    key = affinity_key(self.policy, body, {})
                    chosen = pick(reps, self.policy, key)
                chosen.enqueue(a.at, a.index, a.prompt_len, rendered)
                routed[chosen.name] += 1
                if stop is not None and any(r.stopped for r in self.replicas):
                    break
                if progress and (k + 1) % report_every == 0:
                    el = time.perf_counter() - t_wall
                    print(f"[simulate] {k + 1}/{n} requests, {a.at:.0f} s simulated in {el:.1f} s wall "
                          f"({a.at / max(el, 1e-9):.0f}x)", file=sys.stderr)
        finally:
            if ahead is not None:
                ahead.close()
        for r in self.replicas:
            r.drain()
        stopped = any(r.stopped for r in self.replicas)
        if stopped:
            for r in self.replicas:
                r.abort_all()
        wall = time.perf_counter() - t_wall
        results: list[RequestResult] = [RequestResult(error="not simulated")] * n
        pos = {a.index: i for i, a in enumerate(workload.arrivals)}
        for r in self.replicas:
            for idx, res in r.results.items():
                results[pos[idx]] = res
        end = max((res.start_time + res.latency for res in results if res.success), default=0.0)
        return RunResult(results, end, {r.name: r.stats() for r in self.replicas}, wall, routed, stopped)

    def _render(self, replica: SimReplica, workload: Workload, index: int, body: dict):
        if not self.cache_renders:
            return replica.front.render(body)
        key = (replica.backend.name, workload.key, index)
        hit = self._renders.get(key)
        if hit is None:
            hit = self._renders[key] = replica.front.render(body)
        return hit

    def shutdown(self) -> None:
        """Release every engine."""
        for r in self.replicas:
            r.shutdown()


# --------------------------------------------------------------------------- results
def result_doc(run: RunResult, workload: Workload, model: str, percentiles: Sequence[float] = (50, 90, 99),
               goodput: dict[str, float] | None = None, label: str | None = None,
               notes: Iterable[str] = (), detailed: bool = True) -> dict:
    """vLLM's ``--save-result`` JSON for a simulated run (the Locust runner's keys), plus the
    simulation's own: ``simulated`` (true), ``sim_speedup`` (simulated s per wall s), ``sim_wall_s``,
    engine counters (``num_steps``, ``num_preemptions``, ``prefix_cache_hit_rate``), per-replica
    counters and routing, and the profiles' notes (estimate labels with their error bands).

    ``detailed=False`` leaves out the per-request arrays (vLLM's default without ``--save-detailed``).
    """
    from loadtests.metrics import calculate_metrics, result_json
    m = calculate_metrics(run.results, run.duration_s, list(percentiles), goodput)
    tot = run.totals()
    extra = {"simulated": True, "driver": "emugate simulate (virtual time)", "sim_wall_s": run.wall_s,
             "sim_speedup": run.speedup, "num_steps": tot["steps"], "num_preemptions": tot["preemptions"],
             "prefix_cache_hit_rate": (tot["prefix_cache_hits"] / tot["prefix_cache_queries"]
                                       if tot["prefix_cache_queries"] else None),
             "replicas": run.replicas, "routed": run.routed, "seed": workload.seed,
             "endpoint": "/v1/chat/completions" if workload.endpoint == "chat" else "/v1/completions",
             "ignore_eos": workload.ignore_eos, "goodput_slos_ms": goodput or None,
             "percentiles": list(percentiles), "profile_notes": list(notes), "workload": workload.describe}
    extra.update(workload.extra)
    doc = result_json(run.results, m, backend="openai-chat" if workload.endpoint == "chat" else "openai",
                      model_id=model, tokenizer_id=workload.tokenizer, num_prompts=len(run.results),
                      request_rate=workload.request_rate, burstiness=workload.burstiness, max_concurrency=None,
                      label=label, extra=extra)
    if detailed:
        doc["itls"] = [list(r.itl) for r in run.results]
    else:
        for k in ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "queue_times",
                  "generated_texts", "errors"):
            doc.pop(k, None)
    return doc


def quiet_vllm() -> None:
    """Keep vLLM's start-up chatter out of a simulation's output (warnings still show)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.getLogger("vllm").setLevel(logging.WARNING)


def iter_models(models: Sequence[str] | None) -> Iterator[tuple[str, float]]:
    """``NAME`` or ``NAME=WEIGHT`` items -> (name, weight).

    Raises:
        SimulationError: a weight that is not a positive number.
    """
    for item in models or []:
        name, _, w = item.partition("=")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise SimulationError(f"--model {item!r}: weight must be a number") from None
        if weight <= 0:
            raise SimulationError(f"--model {item!r}: weight must be > 0")
        yield name, weight
