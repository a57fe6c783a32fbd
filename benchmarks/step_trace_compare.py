"""Real vs emulated, step by step: the same Locust workload on both, each recording a step trace.

For one (request rate, burstiness) point of ``profiles/fidelity-cpu.toml``:
start the real backend with the ProfilingExecutor and the emulated one with
the EmulatedProfilingExecutor (``capture_trace`` on each), warm each up, drive
the validation workload (seed 7, not the capture's), and print:

* client metrics (mean TTFT / TPOT / ITL ms, output tok/s) of both runs;
* the engine timeline of both: steps, busy seconds, the ITL the step
  periods imply (sum over steps of decode requests x step period / decode
  tokens: it equals the client's mean ITL when the API server keeps up);
* the oracle's error on the *real* steps: for every real step the mean of
  30 oracle draws for its features vs its measured time, per batch-size
  bucket (decode), for prefill-containing steps and for steps that
  recomputed KV after a preemption;
* the engine figures of both runs (:mod:`emugate.engine_trace`: steps,
  mean batch, preemptions, recomputed and prefix-cached tokens);
* mean TPOT per output-length bucket, real vs emulated (short requests
  are the ones a preemption or a long prefill step hurts most).

This separates "the oracle mispredicts steps" from "the emulated engine's
schedule drifts away from the real one". One run takes ~6 min on 2 cores.

    python benchmarks/step_trace_compare.py --rate 1.5 --num-prompts 60
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from _common import ROOT, fidelity_pair

from gateway.launch import resolve_model, started_backend, wait_healthy
from loadtests.runner import run_locust
from emugate.capture import steps_since, with_trace
from profiles.assets import resolve_profile
from profiles.format import Profile
from profiles.oracle import build_oracle, profile_features
from emugate.engine_trace import engine_figures, format_figures, tpot_by_length
from emugate.validate import warm_up

BUCKETS = [(1, 4), (4, 8), (8, 16), (16, 24), (24, 1 << 20)]


def run_traced(backend, out: Path, a) -> tuple[dict, dict[str, np.ndarray]]:
    """Serve ``backend`` with a step trace, warm up, run the point; (result JSON, measured-run step columns)."""
    trace = out / f"{backend.name}.trace.jsonl"
    b = with_trace(backend, trace)
    tok = resolve_model(b.model)
    with started_backend(b, out / f"{b.name}.log") as (url, proc):
        wait_healthy(url, proc)
        warm_up(url, b.model_name, tok, out / f"{b.name}-warmup.json", 16, a.seed + 500)
        n0 = len(steps_since(trace)["latency_us"])
        res = run_locust(url, b.model_name, out / f"{b.name}.json", rate=a.rate, burstiness=a.burstiness,
                         num_prompts=a.num_prompts, seed=a.seed, tokenizer=tok)
        cols = steps_since(trace, n0)
    return res, {k: v.astype(np.int64) for k, v in cols.items()}


def timeline(c: dict[str, np.ndarray]) -> dict[str, float]:
    """Steps, busy seconds and implied mean ITL (ms) of a trace's step columns."""
    period = c["latency_us"] + np.r_[c["host_gap_us"][1:], 0]
    dec = c["decode_reqs"]
    return {"steps": len(period), "busy_s": period.sum() / 1e6,
            "implied_itl_ms": float((dec * period).sum() / max(dec.sum(), 1) / 1e3)}


def oracle_error(c: dict[str, np.ndarray], oracle, draws: int = 30) -> list[tuple[str, int, float]]:
    """(bucket, steps, % error of the mean oracle draw vs measured) per decode batch bucket and prefill."""
    lat = c["latency_us"].astype(float)
    feats = profile_features(Profile({}, dict(c), np.zeros(0, np.uint32), {}))
    pred = np.array([np.mean([oracle.sample_us(f) for _ in range(draws)]) for f in feats])
    dec, nr = c["prefill_tokens"] == 0, c["num_reqs"]
    rows = [("all", len(lat), pred.sum() / lat.sum() - 1)]
    for lo, hi in BUCKETS:
        m = dec & (nr >= lo) & (nr < hi)
        if m.any():
            label = f"decode {lo}-{hi - 1 if hi < 1 << 20 else ''} reqs"
            rows.append((label, int(m.sum()), pred[m].sum() / lat[m].sum() - 1))
    for label, m in (("prefill-containing", ~dec), ("with recomputation", c.get("recomputed_tokens", 0 * lat) > 0)):
        if m.any():
            rows.append((label, int(m.sum()), pred[m].sum() / lat[m].sum() - 1))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "profiles" / "fidelity-cpu.toml"))
    ap.add_argument("--rate", type=float, default=1.5, help="request rate, req/s")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--num-prompts", type=int, default=60)
    ap.add_argument("--seed", type=int, default=7, help="workload seed (the bundled capture used 1000-1002)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "step-trace-compare"))
    a = ap.parse_args()
    out = Path(a.out)
    real_b, emu_b = fidelity_pair(a.config, out)
    runs = {}
    for b in (real_b, emu_b):
        print(f"[step-trace-compare] {b.name} ({b.mode}) at {a.rate} req/s, burstiness {a.burstiness} ...", flush=True)
        runs[b.mode] = run_traced(b, out, a)
    print("\n" + "\n".join(format_figures({"real": engine_figures(runs["real"][1]),
                                             "emulated": engine_figures(runs["emulate"][1])})))
    print("\nmean TPOT by output length (ms): real / emulated")
    for (lab, n, r), (_, _, e) in zip(tpot_by_length(runs["real"][0]), tpot_by_length(runs["emulate"][0])):
        print(f"  {lab:16} {n:4d} requests  {r:8.1f} {e:8.1f}  {100 * (e / r - 1):+6.1f}%")
    oracle = build_oracle(Profile.load(resolve_profile(emu_b.profile)), emu_b.oracle)
    print(f"\n{'':24} {'real':>10} {'emulated':>10} {'err %':>8}")
    for k in ("mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "output_throughput"):
        r, e = runs["real"][0][k], runs["emulate"][0][k]
        print(f"{k:24} {r:10.1f} {e:10.1f} {100 * (e / r - 1):+8.1f}")
    tr, te = timeline(runs["real"][1]), timeline(runs["emulate"][1])
    for k in tr:
        print(f"{'engine ' + k:24} {tr[k]:10.1f} {te[k]:10.1f} {100 * (te[k] / tr[k] - 1):+8.1f}")
    print(f"\noracle ({emu_b.oracle}) on the real run's steps: mean of 30 draws vs measured")
    for name, n, err in oracle_error(runs["real"][1], oracle):
        print(f"  {name:24} {n:6d} steps  {100 * err:+6.1f}%")
    (out / "summary.json").write_text(json.dumps({"real": tr, "emulated": te}, indent=1))
    for mode, (_, cols) in runs.items():
        np.savez_compressed(out / f"{mode}-steps.npz", **cols)


if __name__ == "__main__":
    main()
