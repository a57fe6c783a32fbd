"""Virtual time and the planner's arithmetic (unit tier: no vLLM), and the simulate/plan commands'
answers to bad input (refused before any engine is built)."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from emu_executor.timing import SimulatedDevice, SimulatedFuture, VirtualClock
from emu_executor.tokens import SyntheticTokens
from emugate.plan import SLO, Point, bisect_goodput, slo_breaker
from emugate.simulate import Arrival, SimulationError, Workload, iter_models
from loadtests.metrics import RequestResult


# ------------------------------------------------------------------ virtual clock
def test_simulated_device_runs_steps_back_to_back_after_host_gaps():
    clock = VirtualClock()
    dev = SimulatedDevice(clock)
    assert dev.submit(0.010) == pytest.approx(0.010)          # idle device: starts now (0)
    assert dev.submit(0.005, host_gap_s=0.002) == pytest.approx(0.017)  # queued behind it, after the gap
    clock.now = 0.100                                          # the engine came back late: now wins
    assert dev.submit(0.004, host_gap_s=0.002) == pytest.approx(0.104)
    assert dev.busy_s == pytest.approx(0.019)


def test_simulated_future_moves_the_clock_to_the_step_end_only_forwards():
    clock = VirtualClock(1.0)
    made = []
    f = SimulatedFuture(1.5, lambda: made.append(1) or "out", clock)
    assert not f.done()
    assert f.result() == "out" and clock.now == 1.5 and f.done()
    assert f.result() == "out" and made == [1]  # built once
    g = SimulatedFuture(1.2, lambda: "late", clock)  # already past its end: the clock does not go back
    assert g.done() and g.result() == "late" and clock.now == 1.5


def test_simulated_future_surfaces_errors():
    f = SimulatedFuture(0.1, lambda: 1 / 0, VirtualClock())
    with pytest.raises(ZeroDivisionError):
        f.result()


# ------------------------------------------------------------------ reseeding = a fresh instance
class _SP:
    def __init__(self, seed=None):
        self.seed, self.ignore_eos, self.min_tokens, self.logprobs = seed, False, 0, None
        self.prompt_logprobs, self.structured_outputs = None, None


def _lengths(tokens: SyntheticTokens, n: int = 50) -> list[int]:
    return [tokens.new_request(_SP()).target_len for _ in range(n)]


def test_synthetic_tokens_reseed_equals_a_fresh_instance():
    lens = np.array([5, 50, 200, 800, 1500])
    fresh = SyntheticTokens(32000, 2, output_lengths=lens, seed=7)
    reused = SyntheticTokens(32000, 2, output_lengths=lens, seed=1)
    _lengths(reused, 13)  # consumed by an earlier run
    reused.reseed(7)
    assert _lengths(reused) == _lengths(fresh)
    reused.reseed(8)
    assert _lengths(reused) != _lengths(SyntheticTokens(32000, 2, output_lengths=lens, seed=7))


def test_oracle_reseed_equals_a_fresh_oracle():
    from profiles.assets import resolve_profile
    from profiles.format import Profile
    from profiles.oracle import build_oracle, profile_features
    prof = Profile.load(resolve_profile("cpu-xeon-amx-2c_mistral-h1024-l8"))
    feats = profile_features(prof)[:200]
    fresh = build_oracle(prof, "feature", seed=5)
    reused = build_oracle(prof, "feature", seed=1)
    [reused.sample_us(f) for f in feats[:31]]
    reused.reseed(5)
    assert [reused.sample_us(f) for f in feats] == [fresh.sample_us(f) for f in feats]
    assert [reused.sample_gap_us(f) for f in feats] == [fresh.sample_gap_us(f) for f in feats]


# ------------------------------------------------------------------ workloads
def _workload(n=20, rate=4.0, seed=3):
    arrivals = [Arrival(i, i / rate, 100 + i, source=None) for i in range(n)]
    return Workload(arrivals, "chat", False, f"test {n} requests at {rate} req/s", rate, 1.0, seed, "tok", key="k")


def test_workload_at_rate_keeps_the_requests_and_draws_vllms_arrivals():
    from loadtests.arrivals import arrival_times
    w = _workload()
    w2 = w.at_rate(10.0)
    assert [a.index for a in w2.arrivals] == [a.index for a in w.arrivals]
    assert [a.prompt_len for a in w2.arrivals] == [a.prompt_len for a in w.arrivals]
    assert [a.at for a in w2.arrivals] == arrival_times(20, 10.0, 1.0, 3)
    assert w2.key == w.key and w2.request_rate == 10.0
    assert len(w.head(5).arrivals) == 5 and w.head(5).key == w.key
    with pytest.raises(SimulationError, match="must be > 0"):
        w.at_rate(0)


def test_trace_workload_at_rate_scales_its_timestamps():
    w = _workload(rate=4.0)
    w.builder = object()  # a trace: keeps its shape
    w2 = w.at_rate(8.0)
    assert [a.at for a in w2.arrivals] == pytest.approx([a.at / 2 for a in w.arrivals])


def test_model_weights_parse():
    assert list(iter_models(["a", "b=0.25"])) == [("a", 1.0), ("b", 0.25)]
    for bad in (["a=x"], ["a=0"], ["a=-1"]):
        with pytest.raises(SimulationError):
            list(iter_models(bad))


# ------------------------------------------------------------------ SLOs and bisection
def test_slo_parse_and_key():
    s = SLO.parse("ttft:p99:2000")
    assert (s.metric, s.percentile, s.limit_ms, s.key) == ("ttft", 99.0, 2000.0, "p99_ttft_ms")
    assert SLO.parse("TPOT:50").key == "p99_tpot_ms"
    assert SLO.parse("e2el:p90:8000").key == "p90_e2el_ms"
    assert SLO.parse("itl:p99.9:100").key == "p99.9_itl_ms"
    for bad in ("ttft", "latency:p99:10", "ttft:p0:10", "ttft:p101:10", "ttft:p99:0", "ttft:p99:x", "a:b:c:d"):
        with pytest.raises(SimulationError):
            SLO.parse(bad)


def _probe(threshold: float, calls: list):
    def probe(rate: float) -> Point:
        calls.append(rate)
        return Point(rate, 0, 1.0, {}, rate <= threshold, 1, 0, 1.0, 1.0, 0.0)
    return probe


@pytest.mark.parametrize("start", [0.5, 10.0, 37.0, 200.0])
def test_bisection_brackets_the_goodput_within_tolerance(start):
    calls: list[float] = []
    g, pts = bisect_goodput(_probe(37.3, calls), start, tolerance=0.02)
    assert g <= 37.3 and (37.3 - g) / 37.3 <= 0.02
    assert len(pts) == len(calls) and len(calls) < 20


def test_bisection_reports_zero_and_unbounded():
    assert bisect_goodput(_probe(0.001, []), 10.0)[0] == 0.0
    with pytest.raises(SimulationError, match="does not bind"):
        bisect_goodput(_probe(1e9, []), 10.0, max_rate=1000)


def _res(ttft_s: float, tpot_s: float = 0.01, n: int = 11) -> RequestResult:
    return RequestResult(prompt_len=10, output_tokens=n, success=True, ttft=ttft_s, latency=ttft_s + tpot_s * (n - 1))


@pytest.mark.parametrize("n,p", [(100, 99.0), (1000, 99.0), (57, 90.0), (10, 50.0)])
def test_slo_breaker_fires_only_when_the_percentile_must_fail(n, p):
    rng = random.Random(n)
    limit = 1.0  # s
    stop = slo_breaker([SLO("ttft", p, limit * 1000)], n)
    vals: list[float] = []
    for _ in range(n):
        v = rng.choice([0.2, 0.5, 1.5, 3.0])
        vals.append(v)
        if stop(_res(v)):
            # whatever the remaining requests measure, the percentile is already over the limit
            rest = [0.0] * (n - len(vals))
            assert np.percentile(vals + rest, p) > limit
            return
    # never fired: the run was never doomed for certain
    exceed = sum(v > limit for v in vals)
    assert exceed < n - math.floor((n - 1) * p / 100)


def test_slo_breaker_watches_tpot_and_ignores_itl():
    stop = slo_breaker([SLO("tpot", 50.0, 20.0)], 4)  # median TPOT <= 20 ms over 4: 3 above it decide
    assert not stop(_res(0.1, tpot_s=0.05))
    assert not stop(_res(5.0, tpot_s=0.01))  # a slow TTFT is not a TPOT miss
    assert not stop(_res(0.1, tpot_s=0.05))
    assert stop(_res(0.1, tpot_s=0.05))
    assert stop.fired == "tpot"
    assert slo_breaker([SLO("itl", 99.0, 10.0)], 100) is None


def test_a_stopped_run_is_limited_by_the_slo_that_stopped_it_not_by_its_unsimulated_requests():
    from emugate.plan import _limiting
    slos = [SLO("ttft", 99.0, 2000.0), SLO("tpot", 99.0, 50.0)]
    ok = Point(10.0, 0, 1.0, {"p99_ttft_ms": 40.0, "p99_tpot_ms": 20.0}, True, 500, 0, 1.0, 1.0, 0.1)
    # stopped early: 300 requests never simulated count as failed; partial values below both limits
    stopped = Point(20.0, 0, 1.0, {"p99_ttft_ms": 90.0, "p99_tpot_ms": 45.0}, False, 200, 300, 1.0, 1.0, 0.1,
                    stopped=True, broken="tpot")
    assert _limiting([ok, stopped], slos, 10.0) == str(slos[1])
    failed = Point(20.0, 0, 1.0, {"p99_ttft_ms": 90.0, "p99_tpot_ms": 45.0}, False, 490, 10, 1.0, 1.0, 0.1)
    assert _limiting([ok, failed], slos, 10.0) == "10 requests failed"


# ------------------------------------------------------------------ bad input: clear message, exit code, no traceback
def _cli(capsys, mod, argv):
    rc = mod.main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_simulate_refuses_bad_input(capsys, tmp_path):
    from emugate import simulate_cli
    rc, err = _cli(capsys, simulate_cli, ["--profile", "no-such-profile", "--model", "llama-3.1-8b"])
    assert rc == 2 and "no-such-profile" in err
    rc, err = _cli(capsys, simulate_cli, ["--profile", "h100-sxm_llama-3.1-8b", "--model", "llama-3.1-8b",
                                          "--request-rate", "0"])
    assert rc == 2 and "rate" in err and "> 0" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = _cli(capsys, simulate_cli, ["--profile", "h100-sxm_llama-3.1-8b", "--model", "llama-3.1-8b",
                                          "--trace", str(empty)])
    assert rc == 2 and "empty.jsonl" in err
    rc, err = _cli(capsys, simulate_cli, ["--model", "llama-3.1-8b"])
    assert rc == 2 and "--profile" in err


def test_plan_refuses_bad_input(capsys, tmp_path):
    from emugate import plan_cli
    base = ["--model", "llama-3.1-8b", "--slo", "ttft:p99:2000"]
    rc, err = _cli(capsys, plan_cli, [*base, "--profile", "no-such-profile", "--target-rate", "20"])
    assert rc == 2 and "no-such-profile" in err
    rc, err = _cli(capsys, plan_cli, [*base, "--profile", "h100-sxm_llama-3.1-8b", "--target-rate", "0"])
    assert rc == 2 and "--target-rate" in err
    rc, err = _cli(capsys, plan_cli, ["--model", "llama-3.1-8b", "--profile", "h100-sxm_llama-3.1-8b",
                                      "--target-rate", "5", "--slo", "latency:p99:5"])
    assert rc == 2 and "metric must be" in err
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    rc, err = _cli(capsys, plan_cli, [*base, "--profile", "h100-sxm_llama-3.1-8b", "--target-rate", "5",
                                      "--trace", str(empty)])
    assert rc == 2 and "empty.jsonl" in err


def test_plan_json_round_trips(tmp_path):
    from emugate.plan import CandidateResult, to_json
    r = CandidateResult("c", "p", 1, True, 16.7, 10.0, {0: 10.0}, "TTFT p99 <= 2000 ms", 3, None, 0.2,
                        points=[Point(10.0, 0, 1.0, {"p99_ttft_ms": 5.0}, True, 10, 0, 100.0, 10.0, 1.0)])
    doc = to_json([r], [SLO("ttft", 99.0, 2000.0)], target_rate=20)
    assert json.loads(json.dumps(doc))["candidates"][0]["goodput"] == 10.0
