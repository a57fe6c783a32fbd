"""``emugate simulate`` and ``emugate plan`` on vLLM's real engine core (e2e tier: vLLM in-process,
and one real emulated vLLM server to compare with)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest

from conftest import ROOT, vllm_server

pytestmark = pytest.mark.e2e

PROFILE = "h100-sxm_llama-3.1-8b"
MODEL = "llama-3.1-8b"


@pytest.fixture(scope="module")
def fleet_cfg():
    from emugate.simulate_cli import build_parser, fleet_config, prepare_env
    args = build_parser().parse_args(["--profile", PROFILE, "--model", MODEL])
    cfg = fleet_config(args)
    prepare_env(cfg)
    return cfg


@pytest.fixture(scope="module")
def workload():
    from emugate.simulate import sharegpt_workload
    from profiles.assets import resolve_model_dir
    return sharegpt_workload(str(resolve_model_dir(MODEL)), num_prompts=60, request_rate=8.0, seed=4)


@pytest.fixture(scope="module")
def fleet(fleet_cfg):
    from emugate.simulate import Fleet
    f = Fleet(fleet_cfg)
    yield f
    f.shutdown()


def test_runs_are_reproducible_and_seeded(fleet, workload):
    a = fleet.run(workload, seed=4)
    b = fleet.run(workload, seed=4)  # the same engine, reset: identical to a fresh one
    c = fleet.run(workload, seed=5)
    assert all(r.success for r in a.results) and len(a.results) == 60
    assert [r.ttft for r in a.results] == [r.ttft for r in b.results]
    assert [r.output_tokens for r in a.results] == [r.output_tokens for r in b.results]
    assert a.totals()["steps"] == b.totals()["steps"] > 0
    assert [r.ttft for r in a.results] != [r.ttft for r in c.results]
    # the clock never runs backwards: every token after its request's arrival, ITLs positive
    for r in a.results:
        assert r.ttft > 0 and r.latency >= r.ttft and all(g > 0 for g in r.itl)
        assert len(r.itl) == r.output_tokens - 1


def test_ignore_eos_decodes_exactly_max_tokens_and_scaling_slows_steps(fleet_cfg):
    from emugate.simulate import Fleet, sharegpt_workload
    from profiles.assets import resolve_model_dir
    # 200 s apart: requests never overlap, so the batches are the same at both scales
    # and the busy time scales exactly; overlapping requests would batch more when steps are slower
    wl = sharegpt_workload(str(resolve_model_dir(MODEL)), num_prompts=20, request_rate=0.005, seed=1,
                           endpoint="completions", ignore_eos=True)
    f = Fleet(fleet_cfg)
    try:
        base = f.run(wl, seed=0)
        slow = f.run(wl, seed=0, latency_scale=2.0)
    finally:
        f.shutdown()
    assert [r.output_tokens for r in base.results] == [a.source.request.expected_output_len for a in wl.arrivals]
    assert slow.totals()["busy_s"] == pytest.approx(2 * base.totals()["busy_s"], rel=0.05)
    assert sum(r.latency for r in slow.results) > 1.5 * sum(r.latency for r in base.results)


def test_replicas_are_chosen_by_the_gateways_routing(fleet_cfg):
    from emugate.simulate import Fleet, sharegpt_workload
    from profiles.assets import resolve_model_dir
    wl = sharegpt_workload(str(resolve_model_dir(MODEL)), num_prompts=90, request_rate=30.0, seed=2)
    f = Fleet(fleet_cfg, replicas=3)
    try:
        run = f.run(wl, seed=0)
    finally:
        f.shutdown()
    assert sum(run.routed.values()) == 90 and all(20 <= n <= 40 for n in run.routed.values()), run.routed
    assert all(r.success for r in run.results)
    assert sum(v["steps"] for v in run.replicas.values()) == run.totals()["steps"]


def test_prefix_affinity_keeps_a_shared_prompt_on_one_replica(fleet_cfg):
    from emugate.simulate import Arrival, Fleet, Workload

    class _Req:
        def __init__(self, i):
            self.prompt = ("You are a helpful assistant. " * 20) + f"Question {i % 2}: what is {i}?"
            self.prompt_len, self.expected_output_len = 150, 8

    class _Plan:
        def __init__(self, i):
            self.index, self.request = i, _Req(i)

    arrivals = [Arrival(i, i * 0.05, 150, _Plan(i)) for i in range(24)]
    wl = Workload(arrivals, "completions", True, "shared prefix", 20.0, 1.0, 0, "tok", key="shared")
    cfg = fleet_cfg.model_copy(update={"gateway": fleet_cfg.gateway.model_copy(update={"routing": "prefix_affinity"})})
    f = Fleet(cfg, replicas=3)
    try:
        run = f.run(wl, seed=0)
    finally:
        f.shutdown()
    assert sorted(run.routed.values()) == [0, 0, 24]  # the first 256 characters are the same for all
    assert run.totals()["prefix_cache_hits"] > 0


def test_simulate_cli_writes_a_vllm_result_that_compare_reads(tmp_path):
    out = tmp_path / "sim.json"
    cmd = [sys.executable, "-m", "emugate.cli", "simulate", "--profile", PROFILE, "--model", MODEL,
           "--request-rate", "6", "--num-prompts", "30", "--seed", "3", "--result-json", str(out), "--quiet",
           "--goodput", "ttft:2000", "tpot:50"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    for k in ("duration", "completed", "request_throughput", "output_throughput", "mean_ttft_ms", "p99_tpot_ms",
              "mean_itl_ms", "median_e2el_ms", "request_goodput", "input_lens", "itls", "num_steps",
              "num_preemptions", "sim_speedup"):
        assert k in doc, k
    assert doc["completed"] == 30 and doc["simulated"] is True
    assert any("ESTIMATE" in n for n in doc["profile_notes"])  # a synthesized profile says so
    assert "x real time" in p.stderr
    c = subprocess.run([sys.executable, "-m", "emugate.cli", "compare", str(out), str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert c.returncode == 0 and "ttft" in (c.stdout + c.stderr).lower()


def test_isolated_requests_match_the_real_time_emulated_server_step_for_step(tmp_path, fleet_cfg):
    """The same profile and seed in real time (vLLM's OpenAI server, emulated executor recording its steps)
    and in virtual time: requests sent one at a time take the same steps and produce the same number of
    tokens; the server's prompt token counts equal the simulator's rendering of the same bodies."""
    from emugate.engine_trace import engine_figures
    from emugate.simulate import Arrival, Fleet, Workload
    from profiles.assets import resolve_profile
    from profiles.build import read_trace_columns
    trace = tmp_path / "steps.jsonl"
    env = {"EMUGATE_PROFILE": str(resolve_profile(PROFILE)), "EMUGATE_TRACE": str(trace), "EMUGATE_SEED": "0"}
    prompts = ["Tell me about the history of the bicycle in three paragraphs.",
               "Write a haiku about rain. " * 30, "What is 2+2?", "Summarize: " + "lorem ipsum dolor " * 120]
    bodies = [{"model": MODEL, "messages": [{"role": "user", "content": t}], "max_completion_tokens": 64,
               "stream": True, "stream_options": {"include_usage": True}} for t in prompts]
    served = []
    with vllm_server("sim-vs-emulated", ["--distributed-executor-backend",
                                         "emu_executor.profiling.EmulatedProfilingExecutor"],
                     env=env, emulate=False, model=MODEL) as (url, _, _):
        for b in bodies:
            usage = None
            with httpx.stream("POST", url + "/v1/chat/completions", json=b, timeout=120) as r:
                assert r.status_code == 200
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        ev = json.loads(line[6:])
                        usage = ev.get("usage") or usage
            served.append(usage)
            time.sleep(0.5)
        time.sleep(3)  # the recorder's flusher writes every 2 s; the server is stopped without a final flush
    _, cols, _ = read_trace_columns(trace)
    real_steps = engine_figures(cols)["steps"]

    class _Plan:
        def __init__(self, i):
            self.index = i

    arrivals = [Arrival(i, 100.0 * i, served[i]["prompt_tokens"], _Plan(i)) for i in range(len(bodies))]
    wl = Workload(arrivals, "chat", False, "isolated", 0.01, 1.0, 0, "tok", key="isolated")
    wl.body = lambda a, model: bodies[a.index]  # the exact bodies the server got
    f = Fleet(fleet_cfg)
    try:
        front = f.replicas[0].front
        assert [len(front.render(b)[0]["prompt_token_ids"]) for b in bodies] == [u["prompt_tokens"] for u in served]
        run = f.run(wl, seed=0)
    finally:
        f.shutdown()
    assert [r.output_tokens for r in run.results] == [u["completion_tokens"] for u in served]
    # the same steps, up to one per request: with async scheduling the real server's step at a
    # request's end depends on wall-clock timing (whether the next step was already scheduled)
    assert abs(run.totals()["steps"] - real_steps) <= len(bodies), (run.totals()["steps"], real_steps)
    assert run.totals()["steps"] >= sum(u["completion_tokens"] for u in served)  # one token per request per step


def test_plan_end_to_end_and_an_slo_nobody_meets(tmp_path):
    base = [sys.executable, "-m", "emugate.cli", "plan", "--profile", PROFILE, "--model", MODEL, "--target-rate",
            "6", "--num-prompts", "40", "--duration", "4", "--seeds", "0,1", "--tolerance", "0.25", "--jobs", "1",
            "--no-aiconfigurator"]
    out = tmp_path / "plan"
    p = subprocess.run([*base, "--slo", "ttft:p99:2000", "--slo", "tpot:p99:50", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads((out / "plan.json").read_text())
    c = doc["candidates"][0]
    assert c["goodput"] > 0 and c["replicas"] >= 1 and c["fleet_check"]["ok"]
    assert set(c["goodput_by_seed"]) == {"0", "1"} and c["sensitivity"]  # a synthesized profile: its band
    assert (out / "plan.png").stat().st_size > 10_000 and "| candidate |" in (out / "plan.md").read_text()
    bad = subprocess.run([*base, "--slo", "tpot:p99:0.5", "--out", str(tmp_path / "bad"), "--no-sensitivity"],
                         cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert bad.returncode == 3 and "Traceback" not in bad.stderr
    assert "unattainable" in bad.stderr and "no candidate meets the SLO" in bad.stderr
