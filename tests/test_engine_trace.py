"""Engine-side figures (issue 14): the step trace's engine columns, their arithmetic, and validate's checks.

The unit tests pin the arithmetic (trace reading, figures, host CPU
records, validate's same-hardware and disjoint-rate checks). The e2e tests
drive a real vLLM engine (emulated forward pass): into preemption on a
1024-token KV pool, checking that the trace counts what vLLM's own
``vllm:num_preemptions_total`` counts; and through validate's pause /
resume of the servers it is not driving.
"""
from __future__ import annotations

import json
import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, vllm_server, wait_for
from emugate.engine_trace import ENGINE_KEYS, engine_figures, format_figures
from emugate.validate import driven_alone, engine_lines, profile_problem, shared_rates, write_reports
from gateway.launch import group_members
from profiles.build import read_trace, read_trace_columns
from profiles.hostinfo import host_cpu, same_cpu

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile

processor\t: 1
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""


def test_host_cpu_reads_model_and_isa(tmp_path):
    f = tmp_path / "cpuinfo"
    f.write_text(CPUINFO)
    h = host_cpu(f)
    assert h["model_name"] == "Intel(R) Xeon(R) Processor"
    assert h["isa"] == ["avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"] and h["logical_cpus"] >= 1
    assert same_cpu(h, dict(h)) and not same_cpu(h, {**h, "isa": ["avx2"]}) and not same_cpu(h, None)
    assert host_cpu(tmp_path / "missing")["model_name"] == "unknown"


def test_validate_refuses_a_cpu_profile_from_another_or_unnamed_cpu():
    here = {"model_name": "Intel(R) Xeon(R) Processor", "logical_cpus": 2, "isa": ["avx2", "amx_bf16"]}
    epyc = {"model_name": "AMD EPYC 9B14", "logical_cpus": 2, "isa": ["avx2", "avx512f"]}
    assert "does not name" in profile_problem({"device_type": "cpu"}, here)
    msg = profile_problem({"device_type": "cpu", "host_cpu": epyc}, here)
    assert "AMD EPYC 9B14" in msg and "Xeon" in msg
    assert profile_problem({"device_type": "cpu", "host_cpu": dict(here)}, here) is None
    assert profile_problem({"device_type": "cuda", "device_name": "NVIDIA H100"}, here) is None


def test_shared_rates_flags_validation_rates_the_capture_ran_at():
    meta = {"capture": {"plan": {"workload_rates": [0.4, 1.1, 2.0]}}}
    assert shared_rates(meta, [0.5, 1.1, 1.5, 2.0]) == [1.1, 2.0]
    assert shared_rates(meta, [0.5, 0.75, 1.0, 1.25, 1.5]) == []
    assert shared_rates({}, [1.0]) == []


def _chunk(names, rows):
    return json.dumps({"type": "steps", "columns": names, "rows": rows})


def test_read_trace_columns_zero_fills_columns_an_older_chunk_lacks(tmp_path):
    base = ["num_tokens", "num_reqs", "prefill_tokens", "decode_reqs", "prefill_reqs", "context_tokens",
            "attn_work", "latency_us", "host_gap_us"]
    t = tmp_path / "t.jsonl"
    t.write_text("\n".join([
        json.dumps({"type": "fingerprint", "fingerprint": {"device_type": "cpu"}}),
        _chunk(base, [[5, 1], [2, 1], [4, 0], [1, 1], [1, 0], [0, 10], [8, 10], [900, 80], [0, 5]]),
        "{broken",
        _chunk(base + ["preempted_reqs", "recomputed_tokens"],
               [[300], [3], [296], [2], [1], [40], [9000], [2000], [7], [1], [256]]),
    ]))
    fp, cols, _ = read_trace_columns(t)
    assert fp == {"device_type": "cpu"} and len(cols["latency_us"]) == 3
    assert cols["preempted_reqs"].tolist() == [0, 0, 1] and cols["recomputed_tokens"].tolist() == [0, 0, 256]
    _, prof_cols, _ = read_trace(t)  # the profile's view: its own columns only
    assert "preempted_reqs" not in prof_cols and prof_cols["latency_us"].tolist() == [900, 80, 2000]


def test_engine_figures_sum_the_window():
    cols = {"num_tokens": np.array([300, 4, 4, 130]), "num_reqs": np.array([3, 4, 4, 5]),
            "prefill_tokens": np.array([296, 0, 0, 126]), "latency_us": np.array([2000, 40, 60, 1000]),
            "host_gap_us": np.array([0, 1000, 0, 0]), "preempted_reqs": np.array([0, 1, 0, 0]),
            "resumed_reqs": np.array([0, 0, 0, 1]), "recomputed_tokens": np.array([0, 0, 0, 120]),
            "cached_tokens": np.array([0, 0, 0, 6])}
    f = engine_figures(cols)
    assert f["steps"] == 4 and f["busy_s"] == pytest.approx(0.0041) and f["mean_batch"] == 4.0
    assert (f["preemptions"], f["resumed"], f["recomputed_tokens"], f["cached_tokens"]) == (1, 1, 120, 6)
    assert f["recompute_steps"] == 1 and f["recompute_step_ms"] == pytest.approx(1.0)
    assert set(f) == {k for k, _, _ in ENGINE_KEYS}
    table = "\n".join(format_figures({"real": f, "emulated": f}))
    assert "| preemptions | 1 | 1 |" in table


def test_validate_report_carries_engine_figures(tmp_path):
    run = {k: 10.0 for k in ("output_throughput",)}
    run.update({f"{s}_{m}_ms": 100.0 for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "median", "p99")})
    fig = {k: 1.0 for k, _, _ in ENGINE_KEYS}
    rows = [{"rate": 1.25, "burst": 1.0, "real": {**run, "engine": {**fig, "preemptions": 18}},
             "emu": {**run, "engine": {**fig, "preemptions": 20}},
             "real2": {**run, "engine": {**fig, "preemptions": 17}},
             "cmp": {k: (0.0, 0.0) for k in run}}]
    assert any("18 / 20 / 17" in line for line in engine_lines(rows))
    write_reports(rows, tmp_path)
    assert "18 / 20 / 17" in (tmp_path / "validate.md").read_text()


def _preemptions_total(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "vllm:num_preemptions"
               for s in fam.samples if s.name == "vllm:num_preemptions_total")


@pytest.mark.e2e
def test_trace_counts_vllms_preemptions_and_the_recomputation_they_cause(tmp_path):
    """Six 250+250-token requests on a 1024-token KV pool (64 blocks of 16, plus vLLM's null block):
    vLLM must preempt. The trace's per-step preemptions equal vLLM's own counter, every preempted
    request resumes, and the resumed requests recompute KV they had computed before (but never more
    than they had)."""
    trace = tmp_path / "emu.trace.jsonl"
    env = {"EMUGATE_STEP_MS": "3", "EMUGATE_TRACE": str(trace)}
    args = ["--distributed-executor-backend", "emu_executor.EmulatedProfilingExecutor", "--max-model-len", "1024",
            "--block-size", "16", "--num-gpu-blocks-override", "65", "--dtype", "bfloat16"]
    with vllm_server("engine-trace", args, env=env, emulate=False) as (url, _, _):
        before = _preemptions_total(url)
        rng = random.Random(3)

        def one(i: int) -> int:
            prompt = " ".join(rng.choice(["alpha", "beta", "gamma", "delta"]) + str(i) for _ in range(120))
            r = httpx.post(url + "/v1/completions", timeout=300, json={
                "model": MODEL, "prompt": prompt, "max_tokens": 250, "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.json()["usage"]["prompt_tokens"]
        with ThreadPoolExecutor(6) as ex:
            prompt_tokens = list(ex.map(one, range(6)))
        preempted = _preemptions_total(url) - before
        assert preempted > 0, "the 1024-token pool should have forced preemptions"

        def flushed():
            cols = read_trace_columns(trace)[1] if trace.exists() else {}
            return cols and int(cols["preempted_reqs"].sum()) >= preempted
        wait_for(flushed, 15, what="the trace's step chunks (flushed every 2 s)")
        n_busy, prev = -1, 0
        while n_busy != prev:  # every step of the six flushed: the count holds over a flush period
            prev = n_busy
            time.sleep(2.5)
            n_busy = len(read_trace_columns(trace)[1]["latency_us"])
        r = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": MODEL, "prompt": "one greedy request", "max_tokens": 6, "ignore_eos": True, "temperature": 0})
        assert r.status_code == 200, r.text
        wait_for(lambda: len(read_trace_columns(trace)[1]["latency_us"]) >= n_busy + 6, 15,
                 what="the greedy request's steps in the trace")
    cols = read_trace_columns(trace)[1]
    # the six requests sample at vLLM's default temperature (1.0): every row takes the random path;
    # the lone greedy request's steps take none
    assert (cols["random_rows"][:n_busy] == cols["num_reqs"][:n_busy]).all()
    assert (cols["random_rows"][n_busy:] == 0).all() and (cols["num_reqs"][n_busy:] == 1).all()
    cols = {k: v[:n_busy] for k, v in cols.items()}
    f = engine_figures(cols)
    assert f["preemptions"] == preempted and f["resumed"] == preempted
    assert f["recomputed_tokens"] > 0 and f["recompute_steps"] > 0
    # a resumed request recomputes at most what it had: its prompt plus the 250 tokens it may have decoded
    assert f["recomputed_tokens"] <= preempted * (max(prompt_tokens) + 250)
    assert all(len(v) == len(cols["latency_us"]) for v in cols.values())
    assert Path(trace).stat().st_size > 0


def test_oracle_says_which_steps_its_profile_covered():
    from profiles.assets import resolve_profile
    from profiles.format import Profile
    from profiles.oracle import ConstantOracle, FeatureOracle, StepFeatures, profile_features
    prof = Profile.load(resolve_profile("cpu-xeon-amx-2c_mistral-h1024-l8"))
    oracle = FeatureOracle(prof)
    feats = profile_features(prof)
    assert np.mean([oracle.covers(f) for f in feats]) > 0.9  # nearly every recorded step sits in a populated cell
    far = StepFeatures(num_tokens=60000, num_reqs=900, prefill_tokens=59000, decode_reqs=0, prefill_reqs=900,
                       context_tokens=0, attn_work=10**10)
    assert not oracle.covers(far) and oracle.predict_us(far) > 0
    assert not ConstantOracle(1000.0).covers(feats[0])


def _states(pgid: int) -> set[str]:
    """``/proc`` process states (R, S, T, ...) of the live members of process group ``pgid``."""
    out = set()
    for pid in group_members([pgid]):
        try:
            out.add(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0])
        except OSError:
            pass
    return out


@pytest.mark.e2e
def test_validate_pauses_servers_it_is_not_driving_and_they_serve_again():
    """``driven_alone`` resumes a paused vLLM server (API server and engine core), which then
    serves; after the block the whole group is stopped again (state T) and a request gets no
    answer; a paused server still stops gracefully (SIGCONT before SIGTERM), not by SIGKILL."""
    body = {"model": MODEL, "prompt": "hello there", "max_tokens": 8, "ignore_eos": True}
    with vllm_server("pause-resume", ["--max-model-len", "1024"], step_ms=2) as (url, proc, _):
        members = group_members([proc.pid])
        assert len(members) >= 2, "expected the API server and the engine core in the group"
        proc.pause()
        wait_for(lambda: _states(proc.pid) == {"T"}, 10, what="every process of the group stopped")
        with pytest.raises(httpx.TimeoutException):
            httpx.post(url + "/v1/completions", json=body, timeout=2)
        with driven_alone(url, proc):
            assert "T" not in _states(proc.pid)
            for _ in range(3):
                r = httpx.post(url + "/v1/completions", json=body, timeout=60)
                assert r.status_code == 200, r.text
                assert r.json()["usage"]["completion_tokens"] == 8
        wait_for(lambda: _states(proc.pid) == {"T"}, 10, what="the group paused again after the block")
        code = proc.stop(grace_s=30)
        assert code is not None and code != -9, f"a paused server should stop on SIGTERM, got {code}"
        assert group_members([proc.pid]) == []
