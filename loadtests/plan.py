"""A load plan: which requests go out when (the schedule a run executes).

``make_plan`` samples ShareGPT requests (:mod:`loadtests.dataset`) and their
arrival times (:mod:`loadtests.arrivals`) from one seed. Plans are cached
(``~/.cache/emugate/plans``, keyed by every input) because tokenizing the
dataset takes seconds. ``split_for_worker`` gives worker i of n every n-th
request, so a distributed Locust run executes the same overall schedule.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtests.dataset import CACHE_DIR, SampleRequest


@dataclass(frozen=True)
class PlanSpec:
    """Everything that determines a plan. Rates in requests/s."""

    tokenizer: str
    num_prompts: int = 200
    request_rate: float = 10.0
    burstiness: float = 1.0
    seed: int = 0
    dataset_path: str | None = None
    output_len: int | None = None
    ramp_up_strategy: str | None = None
    ramp_up_start_rps: float | None = None
    ramp_up_end_rps: float | None = None
    tokenizer_mode: str | None = None

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class PlannedRequest:
    index: int
    at: float  # scheduled send time, seconds from the start of the run
    request: SampleRequest


def plan_cache_path(spec: PlanSpec) -> Path:
    """Where :func:`make_plan` caches the plan of ``spec`` (a JSON list of [send time s, request])."""
    return CACHE_DIR / "plans" / f"{spec.key()}.json"


def make_plan(spec: PlanSpec, cache: bool = True) -> list[PlannedRequest]:
    """Requests with their scheduled send times (s), sampled and scheduled as vLLM does."""
    from loadtests.arrivals import arrival_times
    path = plan_cache_path(spec)
    if cache and path.is_file():
        rows = json.loads(path.read_text())
        return [PlannedRequest(i, at, SampleRequest(**req)) for i, (at, req) in enumerate(rows)]
    from loadtests.dataset import get_tokenizer, sample_sharegpt
    tok = get_tokenizer(spec.tokenizer, spec.tokenizer_mode)
    reqs = sample_sharegpt(tok, spec.num_prompts, spec.seed, spec.dataset_path, spec.output_len)
    # vllm bench serve seeds numpy after sampling and before the schedule
    times = arrival_times(len(reqs), spec.request_rate, spec.burstiness, spec.seed, spec.ramp_up_strategy,
                          spec.ramp_up_start_rps, spec.ramp_up_end_rps)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: workers on one host may build it at once
        tmp.write_text(json.dumps([(t, asdict(r)) for t, r in zip(times, reqs)]))
        tmp.replace(path)
    return [PlannedRequest(i, t, r) for i, (t, r) in enumerate(zip(times, reqs))]


@dataclass(frozen=True)
class TraceSpec:
    """A trace replay: the file, its window and time scale, and how lengths are fitted (seconds, tokens)."""

    path: str
    fmt: str | None = None
    time_scale: float = 1.0
    start_s: float = 0.0
    duration_s: float | None = None
    scale_inputs: float = 1.0
    max_model_len: int | None = None


@dataclass(frozen=True)
class TracePlannedRequest:
    """A trace request with its scheduled send time (s from the run's start); its prompt is built at send
    time (:class:`loadtests.trace.PromptBuilder`), so a long trace's token ids are never all in memory."""

    index: int
    at: float
    request: "object"  # loadtests.trace.TraceRequest


def make_trace_plan(spec: TraceSpec):
    """(plan, trace): the trace's requests in its window, fitted to ``max_model_len`` (:mod:`loadtests.trace`).

    Raises:
        loadtests.trace.TraceError: see :func:`loadtests.trace.read_trace` and :func:`loadtests.trace.window`.
    """
    from loadtests.trace import fit_max_model_len, read_trace, window
    trace = window(read_trace(spec.path, spec.fmt), spec.start_s, spec.duration_s, spec.time_scale)
    trace = fit_max_model_len(trace, spec.max_model_len, spec.scale_inputs)
    return [TracePlannedRequest(i, r.timestamp_s, r) for i, r in enumerate(trace.requests)], trace


def split_for_worker(plan: list[PlannedRequest], worker_index: int, worker_count: int) -> list[PlannedRequest]:
    """Worker ``worker_index`` of ``worker_count`` takes every worker_count-th request."""
    return [p for p in plan if p.index % max(1, worker_count) == worker_index]


def main(argv: list[str] | None = None) -> int:
    """``python -m loadtests.plan SPEC_JSON``: build and cache the plan of a :class:`PlanSpec` given as JSON.

    The Locust driver runs this in a child process when the plan is not cached yet: tokenizing the
    dataset takes ~10 s of CPU, and inside a Locust worker's event loop that long a pause starves its
    heartbeats, so the master drops the worker (see ``loadtests/sharegpt.py``, ``_build_plan``).
    """
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] in ("-h", "--help"):
        print(main.__doc__, file=sys.stderr)
        return 2
    make_plan(PlanSpec(**json.loads(args[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
