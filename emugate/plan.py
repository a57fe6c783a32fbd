"""``emugate plan``: size a fleet under an SLO by bisection over simulated runs.

For each candidate backend (a profile with its engine settings: an H100, H200, A100 or L40S
profile, each perhaps at several ``max_num_seqs``), the planner finds the highest request rate one
replica sustains while every SLO holds (its **goodput**, req/s), by bisection over
:mod:`emugate.simulate` runs of the same requests at different rates. Then:

* replicas for the target rate: ``ceil(target x (1 + headroom) / goodput)``, checked by simulating
  that many replicas behind the gateway's routing at the target rate (and one more added while the
  check fails);
* GPU-hours per million output tokens of that fleet at the target rate:
  ``replicas x GPUs per replica / (output tokens/s x 3600 / 1e6)``;
* the spread of the goodput over seeds (each seed is a different ShareGPT sample and arrival
  sequence and different step-time draws), reported as min / median / max;
* sensitivity: for a synthesized profile, the goodput again with every step time scaled by
  ``1 - e`` and ``1 + e``, ``e`` the profile's published median decode error (its error band);
* aiconfigurator's own answer for the same case (:func:`aiconfigurator_estimate`), side by side.

Bisection. An SLO is ``metric:pNN:ms`` over a run's requests (the metric's NN-th percentile as
``vllm bench serve`` computes it must be <= ms). A rate passes when every SLO holds and every
request completed. The search doubles the rate from ``start`` until a failure brackets the
goodput, then halves the bracket until it is narrower than ``tolerance`` (relative). It assumes
the SLO metrics grow with the rate, as they do for an open-loop workload on one replica; the points
are all kept and plotted, so a violation shows.
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

from emugate.simulate import Fleet, RunResult, SimulationError, Workload

#: The first probe: this many requests at this rate (req/s) hardly overlap on any GPU, so an SLO they
#: miss is one no load level meets (the plan says so instead of bisecting towards zero).
FLOOR_REQUESTS = 50
FLOOR_RATE = 0.05

#: SLO metrics (vLLM's names) and the percentiles a plan may use.
SLO_METRICS = ("ttft", "tpot", "itl", "e2el")


@dataclass(frozen=True)
class SLO:
    """One service-level objective: ``metric``'s ``percentile``-th percentile <= ``limit_ms`` (ms)."""

    metric: str
    percentile: float
    limit_ms: float

    @classmethod
    def parse(cls, text: str) -> "SLO":
        """``ttft:p99:2000`` (or ``ttft:2000``, the p99) -> SLO.

        Raises:
            SimulationError: an unknown metric, a percentile outside (0, 100], a limit <= 0.
        """
        parts = [p.strip() for p in text.split(":")]
        try:
            if len(parts) == 2:
                metric, pct, limit = parts[0], 99.0, float(parts[1])
            elif len(parts) == 3:
                metric, pct, limit = parts[0], float(parts[1].lower().removeprefix("p")), float(parts[2])
            else:
                raise ValueError
        except ValueError:
            raise SimulationError(f"--slo {text!r}: write METRIC:pNN:MS, e.g. ttft:p99:2000 or tpot:p90:50") from None
        metric = metric.lower()
        if metric not in SLO_METRICS:
            raise SimulationError(f"--slo {text!r}: metric must be one of {', '.join(SLO_METRICS)}")
        if not 0 < pct <= 100:
            raise SimulationError(f"--slo {text!r}: percentile must be in (0, 100]")
        if not limit > 0:
            raise SimulationError(f"--slo {text!r}: the limit (ms) must be > 0")
        return cls(metric, pct, limit)

    @property
    def key(self) -> str:
        """The result-JSON key of the measured value (``p99_ttft_ms``)."""
        p = str(int(self.percentile)) if float(self.percentile).is_integer() else str(self.percentile)
        return f"p{p}_{self.metric}_ms"

    def __str__(self) -> str:
        return f"{self.metric.upper()} {self.key.split('_')[0]} <= {self.limit_ms:g} ms"


@dataclass
class Point:
    """One simulated run at ``rate`` (req/s): the SLO values (ms), whether all held, throughput."""

    rate: float
    seed: int
    scale: float
    values: dict[str, float]
    ok: bool
    completed: int
    failed: int
    output_throughput: float  # tokens/s
    duration_s: float
    wall_s: float
    replicas: int = 1
    stopped: bool = False  # ended as soon as an SLO could no longer hold (values then partial)
    broken: str | None = None  # the metric whose SLO stopped the run


def evaluate(fleet: Fleet, workload: Workload | Callable[[float], Workload], rate: float, slos: Sequence[SLO],
             seed: int, scale: float = 1.0) -> Point:
    """Simulate ``workload`` (or ``workload(rate)``: the request set for that rate) at ``rate`` req/s
    through ``fleet``, step times x ``scale``, and check the SLOs."""
    from loadtests.metrics import calculate_metrics
    wl = (workload(rate) if callable(workload) else workload).at_rate(rate)
    breaker = slo_breaker(slos, len(wl.arrivals))
    run: RunResult = fleet.run(wl, seed=seed, latency_scale=scale, stop=breaker)
    pcts = sorted({s.percentile for s in slos} | {50.0, 90.0, 99.0})
    m = calculate_metrics(run.results, run.duration_s, pcts)
    values = {s.key: float(m[s.key]) for s in slos}
    ok = not run.stopped and m["failed"] == 0 and all(values[s.key] <= s.limit_ms for s in slos)
    return Point(rate, seed, scale, values, ok, m["completed"], m["failed"], float(m["output_throughput"]),
                 run.duration_s, run.wall_s, len(fleet.replicas), run.stopped,
                 getattr(breaker, "fired", None) if run.stopped else None)


def slo_breaker(slos: Sequence[SLO], n: int) -> Callable:
    """A ``stop`` predicate for :meth:`Fleet.run` that fires once an SLO can no longer hold over ``n``
    requests: a percentile p of n values (numpy's linear interpolation, as vLLM) exceeds L whenever
    at least ``n - floor((n - 1) p / 100)`` values exceed L. TTFT, TPOT (over all n: vLLM's TPOT list
    holds at most n) and E2EL are watched; ITL is not (its count is unknown until the end)."""
    need = {s.metric: (s.limit_ms / 1000.0, n - math.floor((n - 1) * s.percentile / 100)) for s in slos
            if s.metric in ("ttft", "tpot", "e2el")}
    if not need:
        return None
    seen = dict.fromkeys(need, 0)

    def stop(r) -> bool:
        if not r.success:
            return False
        for metric, (limit, k) in need.items():
            if metric == "ttft":
                v = r.ttft
            elif metric == "e2el":
                v = r.latency
            else:
                v = (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else 0.0
            if v > limit:
                seen[metric] += 1
                if seen[metric] >= k:
                    stop.fired = metric
                    return True
        return False

    stop.fired = None  # the metric whose SLO could no longer hold, once the run is stopped
    return stop


def bisect_goodput(probe: Callable[[float], Point], start: float, tolerance: float = 0.03,
                   factor: float = 2.0, max_rate: float = 5000.0) -> tuple[float, list[Point]]:
    """Highest passing rate (req/s): multiply ``start`` by ``factor`` until a run fails (or divide
    until one passes), then halve the bracket to a relative width ``tolerance``. 0.0 when even
    ``start / 64`` fails. Returns (goodput, every point run).

    Raises:
        SimulationError: ``max_rate`` passes (the SLO does not bind).
    """
    points: list[Point] = []

    def run(rate: float) -> bool:
        p = probe(rate)
        points.append(p)
        return p.ok

    lo, hi = 0.0, None
    r = start
    if run(r):
        lo = r
        while hi is None:
            r *= factor
            if r > max_rate:
                raise SimulationError(f"one replica meets the SLO even at {max_rate:g} req/s: the SLO does not bind")
            if run(r):
                lo = r
            else:
                hi = r
    else:
        hi = r
        while lo == 0.0:
            r /= factor
            if r < start / 64:
                return 0.0, points
            if run(r):
                lo = r
            else:
                hi = r
    while (hi - lo) / hi > tolerance:
        mid = (lo + hi) / 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, points


@dataclass
class CandidateResult:
    """The plan's answer for one candidate (module docstring). Rates in req/s."""

    name: str
    profile: str
    gpus_per_replica: int
    estimate: bool
    error_band_pct: float | None
    goodput: float  # median over seeds
    goodput_by_seed: dict[int, float]
    limiting_slo: str
    replicas: int
    fleet_check: Point | None
    gpu_hours_per_m_tokens: float | None
    sensitivity: dict[str, float] = field(default_factory=dict)  # "-e%"/"+e%" -> goodput
    aiconfigurator: dict | None = None
    points: list[Point] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) goodput over seeds."""
        v = list(self.goodput_by_seed.values())
        return (min(v), max(v)) if v else (0.0, 0.0)


def _limiting(points: Sequence[Point], slos: Sequence[SLO], goodput: float) -> str:
    """The SLO broken first just above the goodput (the failing point nearest above it)."""
    above = sorted((p for p in points if not p.ok and p.rate > goodput and p.scale == 1.0), key=lambda p: p.rate)
    if not above:
        return "-"
    p = above[0]
    if p.stopped and p.broken:
        # the run was stopped once this SLO could no longer hold (its requests after that: not run)
        return " / ".join(str(s) for s in slos if s.metric == p.broken)
    worst = max(slos, key=lambda s: p.values[s.key] / s.limit_ms)
    return str(worst) if p.failed == 0 else f"{p.failed} requests failed"


def error_band_pct(profile) -> float | None:
    """The profile's published median step-time error (%): decode's, else TPOT's, else None (a
    recorded profile)."""
    band = (profile.meta or {}).get("error_band") or {}
    for k in ("decode", "tpot", "mixed", "prefill"):
        if k in band and band[k].get("median") is not None:
            return float(band[k]["median"])
    return None


def plan_candidate(name: str, make_fleet: Callable[[int], Fleet], workload_for: Callable[[int, int], Workload],
                   slos: Sequence[SLO], *, target_rate: float, seeds: Sequence[int], headroom: float = 0.2,
                   tolerance: float = 0.03, start_rate: float = 1.0, duration_s: float = 90.0,
                   min_prompts: int = 500, sensitivity: bool = True,
                   log: Callable[[str], None] = lambda s: None) -> CandidateResult:
    """Goodput (per seed), replicas, fleet check, GPU-hours and sensitivity for one candidate.

    Args:
        make_fleet: replicas -> a Fleet of the candidate's backend (one replica for the bisection).
        workload_for: (seed, n) -> the first ``n`` requests of that seed's request set (the same
            requests at every rate; re-timed by :func:`evaluate`).
        duration_s, min_prompts: a run at rate r sends ``max(min_prompts, r x duration_s)`` requests,
            so every run lasts long enough for a queue to build when the rate is beyond capacity.
        seeds: the first one's bisection starts at ``start_rate``; later ones start at its answer.
    """
    t0 = time.perf_counter()
    fleet = make_fleet(1)
    fleet.cache_renders = True
    prof = fleet.replicas[0].executor.profile
    band = error_band_pct(prof) if prof is not None else None
    tp = fleet.replicas[0].core.vllm_config.parallel_config.world_size
    estimate = bool((prof.meta or {}).get("estimate")) if prof is not None else False

    def sized(seed: int, replicas: int = 1) -> Callable[[float], Workload]:
        return lambda rate: workload_for(seed, max(min_prompts * replicas, math.ceil(rate * duration_s)))

    by_seed: dict[int, float] = {}
    points: list[Point] = []
    floor = evaluate(fleet, workload_for(seeds[0], FLOOR_REQUESTS), FLOOR_RATE, slos, seeds[0])
    points.append(floor)
    if not floor.ok:
        worst = max(slos, key=lambda s: floor.values[s.key] / s.limit_ms)
        why = (f"unattainable: even isolated requests ({FLOOR_RATE:g} req/s) give {worst.key} "
               f"{floor.values[worst.key]:.0f} ms > {worst.limit_ms:g}")
        log(f"[plan] {name}: {why}")
        fleet.shutdown()
        return CandidateResult(name, str(fleet.replicas[0].backend.profile), tp, estimate, band, 0.0,
                               {s: 0.0 for s in seeds}, why, 0, None, None, points=points,
                               wall_s=time.perf_counter() - t0)
    g_first = None
    for seed in seeds:
        start = start_rate if g_first is None else max(g_first, 1e-3)
        g, pts = bisect_goodput(lambda r, seed=seed: evaluate(fleet, sized(seed), r, slos, seed), start, tolerance,
                                factor=2.0 if g_first is None else 1.25)
        by_seed[seed] = g
        points += pts
        g_first = g if g_first is None else g_first
        log(f"[plan] {name}: seed {seed}: goodput {g:.2f} req/s per replica ({len(pts)} runs, "
            f"{sum(p.wall_s for p in pts):.0f} s wall)")
    goodput = statistics.median(by_seed.values())
    res = CandidateResult(name, str(fleet.replicas[0].backend.profile), tp, estimate, band, goodput, by_seed,
                          _limiting(points, slos, goodput), 0, None, None, points=points)
    if sensitivity and band and goodput > 0:
        for sign in (-1, 1):
            scale = 1 + sign * band / 100
            g, pts = bisect_goodput(lambda r, scale=scale: evaluate(fleet, sized(seeds[0]), r, slos, seeds[0], scale),
                                    goodput, tolerance, factor=1.25)
            res.sensitivity[f"{sign * band:+.1f}%"] = g
            points += pts
            log(f"[plan] {name}: step times x{scale:.3f}: goodput {g:.2f} req/s")
    fleet.shutdown()
    if goodput > 0:
        n = max(1, math.ceil(target_rate * (1 + headroom) / goodput))
        while True:
            f = make_fleet(n)
            p = evaluate(f, sized(seeds[0], n), target_rate, slos, seeds[0])
            f.shutdown()
            points.append(p)
            log(f"[plan] {name}: {n} replicas at {target_rate:g} req/s: "
                + ", ".join(f"{k} {v:.0f} ms" for k, v in p.values.items())
                + (" (meets the SLO)" if p.ok else " (misses the SLO)"))
            if p.ok or n >= 64:
                break
            n += 1
        res.replicas, res.fleet_check = n, p
        if p.output_throughput > 0:
            res.gpu_hours_per_m_tokens = n * tp / (p.output_throughput * 3600 / 1e6)
    res.wall_s = time.perf_counter() - t0
    return res


# --------------------------------------------------------------------------- aiconfigurator
#: Why aiconfigurator's answer and the simulated one differ, in general (stated beside the numbers).
AIC_DIFFERENCES = (
    "aiconfigurator (find_best_agg_result_under_constraints) models a steady state of one fixed batch with every "
    "request at the mean input and output length; the simulation runs vLLM's scheduler over ShareGPT's length "
    "distribution with Poisson arrivals, so queueing and long prompts set its tail",
    "aiconfigurator checks its mean TTFT and TPOT against the limits; the plan checks the percentiles the SLO names "
    "(p99 by default), which a tail exceeds long before a mean does",
    "step times: aiconfigurator sums kernel times (no host, sampler or scheduler time); the synthesized profiles "
    "scale them by the fitted step-time model (profiles/stepmodel.py) and add host terms",
    "capacity: the simulation's KV pool and max_num_seqs are the profile's (preemption when the pool runs out); "
    "aiconfigurator sizes the batch by its own memory estimate",
)


def aiconfigurator_estimate(fingerprint: dict, isl: int, osl: int, ttft_ms: float, tpot_ms: float,
                            max_batch_size: int = 512) -> dict:
    """aiconfigurator-core's best aggregated-serving point for one replica under mean TTFT/TPOT limits
    (ms), at mean input/output lengths ``isl``/``osl`` (tokens): ``{"req_s", "tokens_s_per_gpu", "batch",
    "ttft_ms", "tpot_ms", "system", "version"}``; ``{"skipped": reason}`` when it cannot answer (the
    synth extra missing, a recorded profile with no aiconfigurator system, or no feasible point).

    Source: ``aiconfigurator_core.sdk.backends`` (``find_best_agg_result_under_constraints``), PyPI
    aiconfigurator-core 0.12.0.
    """
    system, model, version = (fingerprint.get("aic_system"), fingerprint.get("aic_model"),
                              fingerprint.get("aic_backend_version"))
    if not (system and model and version):
        return {"skipped": "a recorded profile (no aiconfigurator system in its fingerprint)"}
    try:
        import logging
        logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
        from aiconfigurator_core.sdk.backends.factory import get_backend
        from aiconfigurator_core.sdk.config import ModelConfig, RuntimeConfig
        from aiconfigurator_core.sdk.models import get_model
        from aiconfigurator_core.sdk.perf_database import get_database
    except ImportError:
        return {"skipped": 'aiconfigurator-core is not installed (pip install -e ".[synth]")'}
    try:
        from aiconfigurator_core.sdk import common
        tp = int(fingerprint.get("tensor_parallel_size", 1))
        mc = ModelConfig(tp_size=tp)
        if fingerprint.get("weight_dtype") == "fp8":
            mc.gemm_quant_mode = common.GEMMQuantMode.fp8
        db = get_database(system, "vllm", version)
        m = get_model(model, mc, "vllm")
        rc = RuntimeConfig(batch_size=1, isl=int(isl), osl=int(osl), ttft=float(ttft_ms), tpot=float(tpot_ms))
        s = get_backend("vllm").find_best_agg_result_under_constraints(m, db, rc, top_k=1,
                                                                       max_batch_size=int(max_batch_size))
        df = s.get_summary_df()
    except Exception as e:  # its own errors: unsupported model, no data
        return {"skipped": f"aiconfigurator-core could not answer: {e}"}
    if df is None or len(df) == 0:
        return {"skipped": "aiconfigurator-core found no point within the limits"}
    row = df.iloc[0]
    return {"req_s": float(row["seq/s"]), "tokens_s_per_gpu": float(row["tokens/s/gpu"]), "batch": int(row["bs"]),
            "ttft_ms": float(row["ttft"]), "tpot_ms": float(row["tpot"]), "system": system, "version": version,
            "isl": int(isl), "osl": int(osl)}


# --------------------------------------------------------------------------- report
def markdown(results: Sequence[CandidateResult], slos: Sequence[SLO], target_rate: float, headroom: float,
             workload: str, seeds: Sequence[int], wall_s: float) -> str:
    """The plan as a markdown report: the table, then what each number means and where it came from."""
    lines = [f"# Capacity plan: {workload}", "",
             f"Target {target_rate:g} req/s; SLO: " + "; ".join(str(s) for s in slos)
             + f"; headroom {headroom:.0%}; seeds {', '.join(map(str, seeds))}; plan wall time {wall_s:.0f} s.", "",
             "| candidate | GPUs/replica | goodput/replica (req/s), median [min-max over seeds] | limited by | "
             "replicas | fleet at target: " + ", ".join(s.key for s in slos) + " | GPU-h per M output tokens | "
             "goodput if step times are off by the profile's error | aiconfigurator (req/s/replica) |",
             "|---|---:|---:|---|---:|---|---:|---|---:|"]
    for r in results:
        lo, hi = r.spread
        chk = ", ".join(f"{r.fleet_check.values[s.key]:.0f}" for s in slos) if r.fleet_check else "-"
        if r.fleet_check is not None:
            chk += " (ok)" if r.fleet_check.ok else " (MISSES)"
        sens = ", ".join(f"{k}: {v:.1f}" for k, v in r.sensitivity.items()) or "- (recorded profile)"
        aic = r.aiconfigurator or {}
        aic_s = f"{aic['req_s']:.1f} (batch {aic['batch']})" if "req_s" in aic else aic.get("skipped", "-")
        gh = f"{r.gpu_hours_per_m_tokens:.3f}" if r.gpu_hours_per_m_tokens else "-"
        est = " (ESTIMATE)" if r.estimate else ""
        lines.append(f"| {r.name}{est} | {r.gpus_per_replica} | {r.goodput:.2f} [{lo:.2f}-{hi:.2f}] | {r.limiting_slo} "
                     f"| {r.replicas} | {chk} | {gh} | {sens} | {aic_s} |")
    lines += ["", "How to read it:",
              "- goodput: the highest rate one replica sustains with every SLO met and no request failing, by "
              "bisection over simulated runs (emugate/plan.py); each seed is another ShareGPT sample, arrival "
              "sequence and step-time draw.",
              "- replicas: ceil(target x (1 + headroom) / goodput), then checked by simulating that many replicas "
              "behind the gateway's routing at the target rate (one more is added while the check misses).",
              "- GPU-hours per million output tokens: replicas x GPUs per replica / output tokens per hour of that "
              "fleet at the target rate (millions).",
              "- ESTIMATE: a synthesized profile; its published error band gives the sensitivity column (goodput "
              "with every step time scaled by 1 - e and 1 + e).",
              "- aiconfigurator differs because:"]
    lines += [f"  - {d}" for d in AIC_DIFFERENCES]
    return "\n".join(lines) + "\n"


def write_png(results: Sequence[CandidateResult], slos: Sequence[SLO], path: str, title: str = "") -> str:
    """Latency against rate per candidate (one panel per SLO; one replica, first seed, profile step
    times), the SLO lines (dashed), each candidate's goodput (star) and the rates that missed the SLO
    (x, drawn above the line: those runs stop once the SLO can no longer hold)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(slos), figsize=(6 * len(slos), 4.5), squeeze=False)
    for ax, slo in zip(axes[0], slos):
        for r in results:
            seed0 = next(iter(r.goodput_by_seed), None)
            pts = sorted((p for p in r.points if p.scale == 1.0 and p.seed == seed0 and p.replicas == 1
                          and p.failed == 0 and not p.stopped and p.rate != FLOOR_RATE), key=lambda p: p.rate)
            if not pts:
                continue
            line, = ax.plot([p.rate for p in pts], [p.values[slo.key] for p in pts], "o-", ms=3, label=r.name)
            miss = [p.rate for p in r.points if p.scale == 1.0 and p.seed == seed0 and p.replicas == 1
                    and not p.ok and p.rate != FLOOR_RATE]
            if miss:  # runs that missed the SLO (stopped as soon as it could no longer hold): x above the line
                ax.plot(miss, [slo.limit_ms * 1.3] * len(miss), "x", color=line.get_color(), ms=7)
            g = r.goodput_by_seed.get(seed0, 0.0)
            at = [p for p in pts if p.rate == g]
            if at:
                ax.plot([g], [at[0].values[slo.key]], "*", ms=14, color=line.get_color())
        ax.axhline(slo.limit_ms, ls="--", color="k", lw=1)
        ax.set_xlabel("request rate per replica (req/s)")
        ax.set_ylabel(f"{slo.key} (ms)")
        ax.set_yscale("log")
        ax.set_title(str(slo))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(results: Sequence[CandidateResult], slos: Sequence[SLO], **meta) -> dict:
    """The plan as a JSON document (every point included)."""
    return {**meta, "slos": [asdict(s) for s in slos], "aiconfigurator_differences": list(AIC_DIFFERENCES),
            "candidates": [asdict(r) for r in results]}


def say(msg: str) -> None:
    """Progress line on stderr."""
    print(msg, file=sys.stderr, flush=True)
