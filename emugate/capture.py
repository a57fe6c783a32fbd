"""Capture: run a real vLLM with the ProfilingExecutor, sweep the load grid, build a profile.

After a warm-up whose steps are left out of the profile (below), the sweep
has two phases, both over the completions API with ``ignore_eos``:

1. **grid**: for each concurrency C (1, 2, 4, ... up to ``max_concurrency``)
   and prompt length L (16, 64, 256, 1024 tokens, with C*L within
   ``token_budget``), C requests of L random *token ids* (unique, so the
   prefix cache never hits) are sent together and decode ``grid_output``
   tokens. This fills the (scheduled tokens x running requests) grid for
   prefill-containing and decode-only steps at several context lengths.
   The grid runs once per temperature in ``grid_temperatures`` (0 and 1):
   vLLM's sampler is nearly free when a whole batch is greedy and costs
   ~1 ms per request per step on the CPU host when any request samples
   (``benchmarks/sampler_cost.py``), so the profile needs both
   kinds of step (``random_rows``) to tell the two costs apart. A grid run
   greedy only, beside a workload sampled at temperature 1, made the
   oracle 3-5% fast on decode steps of 8-24 requests.
2. **workload**: the project's own Locust ShareGPT workload
   (:func:`loadtests.runner.run_locust`, a separate process, streaming, as
   users drive the server) at each rate of ``workload_rates`` (Poisson),
   ``workload_requests`` requests per rate, seeds ``capture_seed + i``
   (validation uses other seeds, so no request is both captured and
   validated): the mixed prefill/decode steps of real serving, under the
   API server's and the client's real per-token load, from light load to
   beyond saturation. The default rates (0.4, 1.1, 2.0 req/s) are chosen so
   that the README's validation rates (0.5-1.5 req/s) lie between and beyond
   them, never on them: a fidelity figure counts only at rates the profile
   was not built from.

Why the load client matters (measured): on a small CPU host the
forward pass shares cores with the API server and the load client, so a
step's time depends on how much streaming work runs beside it. A profile
whose workload phase was driven by a light httpx client predicted decode
steps of 8-12 requests 24% too fast under Locust load (61.4 ms real vs
49.1 ms predicted, median). The grid phase is streamed too, for the same
reason. On a GPU host the coupling is small, and the same procedure holds.

Warm-up (measured): a freshly started real server runs the same
step shapes slower for its first minute or so (``benchmarks/restart_noise.py``:
single-request decode 37.3 ms in the first probe pass after a 35 s warm-up
pass vs 33.5 ms in the next, in 2 of 4 starts), and the old capture recorded
its grid phase in that state: its single-request decode steps ran 36.8-38.7 ms
where warm validation servers ran 32.4-35.1 ms, and the emulator came out
~7% slow at light load. So capture first runs the grid warm-up bursts and
``warmup_requests`` Locust requests (``warmup_rate`` req/s, seed
``capture_seed + 500``), waits for the trace to flush, and drops every step
recorded up to then (``meta.warmup_steps`` holds the count).

Output lengths: a dummy-weights model's EOS timing is meaningless, so when
fewer than 100 requests end naturally the profile records the tokenized
ShareGPT completion lengths instead (``meta.output_lengths_source``).
"""
from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np

from gateway.config import BackendConfig
from gateway.launch import resolve_model, started_backend, wait_healthy
from profiles.build import build_profile, read_trace_columns
from profiles.format import Profile


#: The ProfilingExecutor's recorder flushes every 2 s (emu_executor.profiling.FLUSH_S); wait this long
#: before counting a trace's steps.
TRACE_FLUSH_WAIT_S = 2.5


def with_trace(backend: BackendConfig, trace: Path) -> BackendConfig:
    """One replica of ``backend`` that records a fresh step trace at ``trace`` (an old file is removed)."""
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.unlink(missing_ok=True)
    return backend.model_copy(update={"capture_trace": str(trace), "replicas": 1, "ports": None})


#: The longest :func:`wait_trace_flushed` waits for an idle server's trace to stop growing (s).
TRACE_SETTLE_TIMEOUT_S = 30.0


def wait_trace_flushed(trace: Path) -> None:
    """Return once a live, idle server's ``trace`` holds every step it ran: when the file's size holds
    still over ``TRACE_FLUSH_WAIT_S`` (longer than the recorder's flush period), at most
    ``TRACE_SETTLE_TIMEOUT_S``. On a loaded host the flusher thread can run late, so one fixed wait
    could miss the last steps. Raises nothing: after the timeout it returns all the same."""
    def size() -> int:
        return trace.stat().st_size if trace.exists() else 0

    deadline, last = time.monotonic() + TRACE_SETTLE_TIMEOUT_S, size()
    while time.monotonic() < deadline:
        time.sleep(TRACE_FLUSH_WAIT_S)
        if (now := size()) == last:
            return
        last = now


def steps_since(trace: Path, n0: int = 0) -> dict[str, np.ndarray]:
    """Step columns (int64; the profile's and the engine columns) of a live, idle server's ``trace``
    after its first ``n0`` steps, read once the recorder has flushed them all
    (:func:`wait_trace_flushed`) and parsed once. Raises nothing."""
    wait_trace_flushed(trace)
    return {k: v[n0:] for k, v in read_trace_columns(trace)[1].items()}


@dataclass
class SweepPlan:
    """What the capture sends. Counts are requests, lengths tokens, rate requests/s."""

    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    prompt_lens: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    token_budget: int = 16384
    grid_output: int = 24
    grid_temperatures: list[float] = field(default_factory=lambda: [0.0, 1.0])
    repeats: int = 1
    workload_requests: int = 100
    workload_rates: list[float] = field(default_factory=lambda: [0.4, 1.1, 2.0])
    capture_seed: int = 1000
    warmup_requests: int = 60
    warmup_rate: float = 2.0

    def grid(self) -> list[tuple[int, int]]:
        return [(c, n) for _ in range(self.repeats) for c in self.concurrency for n in self.prompt_lens
                if c * n <= self.token_budget]


async def _post(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int,
                temperature: float = 0.0) -> None:
    """One completion, streamed like real clients: the API server's per-token SSE work shares the
    host with the engine, and on a small CPU host that shows in the step times."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True,
            "temperature": temperature, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for _ in r.aiter_raw():
            pass


#: The warm-up's bursts, (concurrency, prompt tokens, output tokens): new shapes for JIT
#: compilation, the allocator and caches, before the Locust warm-up requests.
WARMUP_BURSTS = [(4, 512, 48), (1, 64, 48), (8, 128, 48), (2, 1024, 48)]


async def send_bursts(base_url: str, model: str, cells: list[tuple[int, int, int]], rng: random.Random,
                  vocab_lo: int = 1000, vocab_hi: int = 100000, on_cell=None, temperature: float = 0.0) -> None:
    """For each (C, L, N) in ``cells``: C streamed requests of L random token ids (unique, so the
    prefix cache never hits) sent together, each decoding N tokens at ``temperature`` (0: greedy);
    ``on_cell(C, L)`` after each."""
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as client:
        for c, plen, n in cells:
            prompts = [[rng.randrange(vocab_lo, vocab_hi) for _ in range(plen)] for _ in range(c)]
            await asyncio.gather(*(_post(client, model, p, n, temperature) for p in prompts))
            if on_cell:
                on_cell(c, plen)


async def run_grid(base_url: str, model: str, plan: SweepPlan, progress=None) -> None:
    """The grid phase (module docstring) against ``base_url``, streamed; ``progress``: a rich Progress."""
    grid = plan.grid()
    temps = plan.grid_temperatures or [0.0]
    task = progress.add_task("capture grid", total=len(grid) * len(temps)) if progress else None
    cells = [(c, plen, plan.grid_output) for c, plen in grid]
    rng = random.Random(plan.capture_seed)
    for t in temps:
        def on_cell(c: int, plen: int, t: float = t) -> None:
            if progress:
                progress.update(task, advance=1, description=f"grid C={c} L={plen} T={t:g}")
        await send_bursts(base_url, model, cells, rng, on_cell=on_cell, temperature=t)


def run_workload(base_url: str, model: str, plan: SweepPlan, tokenizer_dir: str, prefix: Path) -> list[int]:
    """The workload phase (module docstring); returns the output lengths (tokens) it decoded.

    With ``ignore_eos`` each request decodes its dataset completion length, so
    these are the tokenized ShareGPT completion lengths. Each rate's Locust
    result is written to ``{prefix}.workload-r{rate}.json``.
    """
    from loadtests.runner import run_locust
    lens: list[int] = []
    for i, rate in enumerate(plan.workload_rates):
        seed = plan.capture_seed + i
        t0 = time.perf_counter()
        r = run_locust(base_url, model, prefix.with_name(f"{prefix.name}.workload-r{rate}.json"), rate=rate,
                       num_prompts=plan.workload_requests, seed=seed, tokenizer=tokenizer_dir)
        print(f"[capture] workload {i + 1}/{len(plan.workload_rates)}: {r['completed']} requests at {rate} req/s "
              f"(seed {seed}) in {time.perf_counter() - t0:.0f} s; mean TPOT {r['mean_tpot_ms']:.1f} ms")
        lens += [n for n in r["output_lens"] if n > 0]
    return lens


def warm_up_server(base_url: str, model: str, plan: SweepPlan, tokenizer_dir: str, prefix: Path,
                   trace: Path) -> int:
    """The capture's warm-up (module docstring); returns the number of steps it left in ``trace``."""
    from loadtests.runner import run_locust
    t0 = time.perf_counter()
    asyncio.run(send_bursts(base_url, model, WARMUP_BURSTS, random.Random(plan.capture_seed + 500)))
    if plan.warmup_requests:
        run_locust(base_url, model, prefix.with_name(f"{prefix.name}.warmup.json"), rate=plan.warmup_rate,
                   num_prompts=plan.warmup_requests, seed=plan.capture_seed + 500, tokenizer=tokenizer_dir)
    n = len(steps_since(trace)["latency_us"])
    print(f"[capture] warm-up: {n} steps in {time.perf_counter() - t0:.0f} s (left out of the profile)")
    return n


#: The quick capture's plan (``emugate profile capture --quick``): a few minutes of device time after
#: start-up. Grid cells C requests x L prompt tokens decoding 16 (C 1/4/16/64, L 64/1024 within 16k
#: tokens: 7 cells, ~120 steps: prefill chunks of 64-16k tokens, decode batches of 1-64 at short and
#: long context), sampled at temperature 1 as most traffic is; no Locust workload phase. What it
#: records anchors the step-time model (GPUs) or is the profile (hosts without kernel tables).
QUICK_PLAN = SweepPlan(concurrency=[1, 4, 16, 64], prompt_lens=[64, 1024], token_budget=16384, grid_output=16,
                       grid_temperatures=[1.0], workload_requests=0, workload_rates=[], warmup_requests=0)


#: Seed offset between server starts of one capture: start k uses seeds ``capture_seed + k*10 + i``
#: for its workload phase and ``capture_seed + k*10 + 500`` for its warm-up.
START_SEED_STRIDE = 10


def start_trace(trace: Path, k: int) -> Path:
    """The file of server start ``k`` (0: ``trace`` itself, else ``<stem>.start<k><suffix>``): its trace or log."""
    return trace if k == 0 else trace.with_name(f"{trace.stem}.start{k}{trace.suffix}")


def capture_start(backend: BackendConfig, trace: Path, plan: SweepPlan, log_file: str | Path | None = None,
                  label: str = "") -> tuple[int, list[int]]:
    """One server start of a capture: start ``backend`` recording into ``trace`` (an old file there is
    removed first: :func:`with_trace`), warm up, run the grid
    and the workload phase, stop it. Returns (warm-up steps, output lengths decoded by the workload).

    Raises:
        RuntimeError/TimeoutError: the server did not come up.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    b = with_trace(backend, trace)
    print(f"[capture]{label} starting real vLLM for {b.name} (trace: {trace})")
    with started_backend(b, log_file, name=f"capture/{b.name}", grace_s=60) as (url, proc):
        waited = wait_healthy(url, proc)
        print(f"[capture]{label} server healthy after {waited:.0f} s; warming up")
        n_warm = warm_up_server(url, b.model_name, plan, resolve_model(b.model), trace.with_suffix(""), trace)
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as progress:
            asyncio.run(run_grid(url, b.model_name, plan, progress=progress))
        lens: list[int] = []
        if plan.workload_requests and plan.workload_rates:
            lens = run_workload(url, b.model_name, plan, resolve_model(b.model), trace.with_suffix(""))
        # the recorder's periodic flush, not the server's stop, must put the last steps on disk: once
        # vLLM 0.32's engine core leaves its busy loop it resets SIGTERM to the default action, and the
        # API server's process manager then SIGTERMs it (and, with --shutdown-timeout 0, SIGKILLs it)
        # during its teardown, where the executor's shutdown flush runs: without this wait the grid's
        # last cell (or all of it) went missing from one start's trace in CI's run of stop 34 and in
        # both test captures run here on 2026-12-07
        wait_trace_flushed(trace)
    return n_warm, lens


#: vLLM arguments whose value is a secret (their values are never written into a profile).
_SECRET_ARGS = ("--api-key", "--hf-token", "--ssl-keyfile")


def shareable_backend(backend: BackendConfig) -> dict:
    """The backend's settings as a profile header may carry them (profiles are meant to be shared):
    ``env`` as its variable names only (``env_names``), and the values of secret vLLM arguments
    (:data:`_SECRET_ARGS`) in ``extra_args`` replaced by ``"<redacted>"``."""
    d = backend.model_dump(exclude={"env"})
    d["env_names"] = sorted(backend.env)
    args, out = list(backend.extra_args), []
    for i, a in enumerate(args):
        name = a.split("=", 1)[0]
        if name in _SECRET_ARGS and "=" in a:
            out.append(f"{name}=<redacted>")
        elif i > 0 and args[i - 1] in _SECRET_ARGS:
            out.append("<redacted>")
        else:
            out.append(a)
    d["extra_args"] = out
    return d


#: Adaptive pooling of server starts (``capture`` without a fixed ``starts``): at least MIN_STARTS,
#: then one more until the pooled offset's standard error is within TOLERANCE_PCT, at most MAX_STARTS.
MIN_STARTS, MAX_STARTS, TOLERANCE_PCT = 2, 5, 1.0


def capture(backend: BackendConfig, out: str | Path, plan: SweepPlan, trace: str | Path | None = None,
            warmup_steps: int | None = None, log_file: str | Path | None = None, starts: int | None = None,
            min_starts: int = MIN_STARTS, max_starts: int = MAX_STARTS,
            tolerance_pct: float = TOLERANCE_PCT) -> Profile:
    """Start ``backend`` (mode real) with the ProfilingExecutor, warm up, sweep, stop it; on several
    server starts; build one profile from every start's trace and save it to ``out``.

    Server starts: one start of vLLM runs the same step shapes a few % faster or slower than the
    next, throughout, and a profile carries the mean offset of the starts it pooled
    (:mod:`profiles.spread`). So starts are pooled by evidence: after ``min_starts`` starts, each
    start's offset is measured (the oracle built from the other starts, scored on its steps) and
    printed, and starts are added until the pooled offset's standard error
    (``sd(offsets) / sqrt(starts)``) is within ``tolerance_pct``, or ``max_starts`` is reached
    (said so). ``starts``: a fixed count instead (no stopping rule; offsets still measured).
    The profile's ``meta["start_spread"]`` keeps the offsets, their sd and the standard error.
    Start k uses seeds shifted by ``START_SEED_STRIDE * k`` and records into :func:`start_trace`
    (its server log likewise). ``warmup_steps``: leading steps to drop from each start's trace;
    None (default) drops exactly that start's warm-up steps, counted from its trace when its
    warm-up ends.

    Raises:
        ValueError: the backend is not in real mode, or a start count below 1 / a cap below the minimum.
        RuntimeError/TimeoutError: a server did not come up.
    """
    from profiles.spread import describe_spread, spread_summary, start_offsets
    if backend.mode != "real":
        raise ValueError(f"capture needs a real backend; {backend.name!r} has mode = {backend.mode!r}")
    if starts is not None and starts < 1:
        raise ValueError(f"capture needs at least one server start (got starts={starts})")
    if starts is None and not 1 <= min_starts <= max_starts:
        raise ValueError(f"need 1 <= min_starts <= max_starts (got {min_starts}, {max_starts})")
    lo, hi = (starts, starts) if starts is not None else (min_starts, max_starts)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    trace = Path(trace or out.with_suffix(".trace.jsonl"))
    traces, warm, lens, parts, offsets = [], [], [], [], []
    k = 0
    while k < hi:
        t = start_trace(trace, k)
        label = f" start {k + 1} (of {lo}{'' if lo == hi else f'-{hi}'}):"
        plan_k = replace(plan, capture_seed=plan.capture_seed + START_SEED_STRIDE * k)
        log_k = start_trace(Path(log_file), k) if log_file else None
        n_warm, lens_k = capture_start(backend, t, plan_k, log_k, label)
        traces.append(t)
        warm.append(n_warm if warmup_steps is None else warmup_steps)
        lens += lens_k
        parts.append({c: v[warm[-1]:] for c, v in read_trace_columns(t)[1].items()})
        k += 1
        if k < 2:
            continue
        offsets = start_offsets(parts)
        summary = spread_summary(offsets)
        print(f"[capture] after {k} starts, each start's offset (the oracle of the other starts on its steps): "
              + ", ".join(f"start {i + 1} {o:+.1f}%" for i, o in enumerate(offsets))
              + f"; sd {summary['sd_pct']:.1f}%, standard error of the pooled offset {summary['se_pct']:.1f}%")
        if k >= lo and starts is None and summary["se_pct"] <= tolerance_pct:
            print(f"[capture] the pooled offset's standard error is within {tolerance_pct:g}%: {k} starts")
            break
    cap_reached = starts is None and k >= hi and bool(offsets) and spread_summary(offsets)["se_pct"] > tolerance_pct
    spread = spread_summary(offsets, tolerance_pct if starts is None else None, cap_reached)
    if not offsets:
        spread = {"starts": k, "offsets_pct": [], "sd_pct": None, "se_pct": None, "range_pct": None}
    if cap_reached:
        print(f"[capture] reached the cap of {hi} starts with the pooled offset's standard error at "
              f"{spread['se_pct']:.1f}% (> {tolerance_pct:g}%): this host's start-to-start spread "
              f"(sd {spread['sd_pct']:.1f}%) limits how closely any one profile matches a given start")
    prof = build_profile(traces, warmup_steps=warm, output_lengths=lens or None,
                         meta={"capture": {"plan": plan.__dict__, "starts": k,
                                           "backend": shareable_backend(backend)},
                               "start_spread": spread})
    prof.save(out)
    print(f"[capture] {prof.num_steps} steps from {k} server start(s) -> {out} "
          f"({out.stat().st_size / 1024:.0f} KiB); {describe_spread(spread)}")
    return prof
