"""Where a validate sweep's error comes from, per point, from the run JSONs and step traces it saved.

For each (rate, burstiness) of ``emugate profile validate --out DIR``:

* mean TPOT per output-length bucket: real, emulated, real again (ms);
* the oracle's error on the real runs' own steps (mean of 30 draws vs the
  measured service time), per point and pooled over all points, per decode batch bucket, prefill-containing steps
  and steps that recomputed KV after a preemption, and the share of those
  steps whose grid cell the profile populated (the rest are extrapolated
  from neighbouring cells): "the profile's step
  times are off" shows here, "the emulated scheduler decided otherwise"
  shows in the engine figures (validate.md) instead;

and, over all points, how many prompts it takes for the two real starts to
agree: |real2 - real1| / mean of mean TTFT, TPOT, ITL, E2EL over the first N
requests of each run (in arrival order), for several N; and per point the
*paired* spread: both real runs serve the same requests, so the standard
error of a mean metric's real-vs-real difference is sd(per-request
difference) / sqrt(N), and N95(x%) = (1.96 sd / (x% of the mean))^2 is the
number of prompts for which two starts agree within x% 95% of the time
(requests near saturation are not independent, so read it as a lower bound).

    python benchmarks/fidelity_diagnosis.py runs/validate [--profile runs/validate/captured.emuprof.zst]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import ROOT, fidelity_pair

from emugate.engine_trace import request_tpots_ms, tpot_by_length
from emugate.validate import rows_from_dir
from profiles.build import read_trace_columns
from profiles.format import Profile
from profiles.oracle import build_oracle, profile_features
from step_trace_compare import oracle_error


def window(res: dict, cache: dict, all_random: bool = False) -> dict[str, np.ndarray] | None:
    """The step columns of one run (``res["trace_window"]``), or None for runs without one.

    ``all_random``: the trace was recorded before the ``random_rows`` column existed (read as
    zeros) and every request sampled at temperature > 0, as validate's Locust workload does
    (vLLM's default temperature 1.0): every step's rows take the random path."""
    w = res.get("trace_window")
    if not w:
        return None
    path, a, b = w
    if path not in cache:
        cache[path] = read_trace_columns(path)[1]
    cols = {k: v[a:b] for k, v in cache[path].items()}
    if all_random:
        cols["random_rows"] = cols["num_reqs"].copy()
    return cols


def prefix_metrics(res: dict, n: int) -> dict[str, float]:
    """Mean TTFT, TPOT, ITL and E2EL (ms) over the first ``n`` requests by start time."""
    order = np.argsort(res["start_times"])[:n]
    ttft = [res["ttfts"][i] for i in order if res["output_lens"][i] > 0]
    tpot = request_tpots_ms(res)[order] / 1e3
    tpot = tpot[~np.isnan(tpot)]
    itl = [x for i in order for x in res["itls"][i]]
    e2el = [res["latencies"][i] for i in order if res["output_lens"][i] > 0]
    return {k: 1e3 * float(np.mean(v)) for k, v in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2el", e2el))}


def per_request(res: dict) -> dict[str, np.ndarray]:
    """Per-request TTFT, TPOT and E2EL (ms), NaN where a request has no value; in plan order."""
    ok = np.array([n > 0 for n in res["output_lens"]])
    out = {"ttft": np.array(res["ttfts"], float) * 1e3, "tpot": request_tpots_ms(res),
           "e2el": np.array(res["latencies"], float) * 1e3}
    return {k: np.where(ok, v, np.nan) for k, v in out.items()}


#: Agreement targets (%), ours: TPOT/E2EL 3, TTFT 7 (README Fidelity).
TARGETS = {"ttft": 7.0, "tpot": 3.0, "e2el": 3.0}


def paired_spread(r: dict) -> dict[str, tuple[float, float]]:
    """{metric: (real-vs-real standard error, % of the mean; N95 for the target)}.

    Only the request-level part of the spread: a start that runs a few % slower
    throughout (BASELINES.md, ``benchmarks/restart_noise.py``) shifts every request
    alike and adds to the real-vs-real difference on top of it.
    """
    a, b = per_request(r["real"]), per_request(r["real2"])
    out = {}
    for k, target in TARGETS.items():
        m = ~(np.isnan(a[k]) | np.isnan(b[k]))
        ref = (a[k][m] + b[k][m]) / 2
        mean = ref.mean()
        sd = np.std(b[k][m] - a[k][m], ddof=1)
        se = sd / np.sqrt(m.sum()) / mean * 100
        n95 = (1.96 * sd / (target / 100 * mean)) ** 2
        out[k] = (se, n95)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="a validate --out folder")
    ap.add_argument("--profile", default=None, help="the profile the emulated runs used "
                                                    "(default: OUT/captured.emuprof.zst or the fidelity config's)")
    ap.add_argument("--prefixes", default="20,40,60,80", help="request counts for the real-vs-real agreement")
    ap.add_argument("--traces-all-random", action="store_true",
                    help="traces recorded before the random_rows column: count every step's requests as sampling "
                         "randomly (true of validate's Locust workload, which samples at vLLM's default temperature)")
    a = ap.parse_args()
    out = Path(a.out)
    rows = rows_from_dir(out)
    prof_path = a.profile or out / "captured.emuprof.zst"
    if not a.profile and not Path(prof_path).exists():  # validate used the config's profile, captured nothing
        prof_path = fidelity_pair(ROOT / "profiles" / "fidelity-cpu.toml", out)[1].profile
        print(f"profile: {prof_path} (the fidelity config's; {out} holds no captured.emuprof.zst)")
    oracle = build_oracle(Profile.load(prof_path), "feature")
    cache: dict = {}
    pooled: list[dict[str, np.ndarray]] = []
    for r in rows:
        print(f"\n== rate {r['rate']} req/s, burstiness {r['burst']}")
        by = {n: tpot_by_length(r[n]) for n in ("real", "emu", "real2")}
        print("  mean TPOT by output length (ms): real / emulated / real again")
        for i, (lab, cnt, v) in enumerate(by["real"]):
            print(f"    {lab:14} {cnt:4d} req  {v:7.1f} {by['emu'][i][2]:7.1f} {by['real2'][i][2]:7.1f}")
        for name in ("real", "real2"):
            cols = window(r[name], cache, a.traces_all_random)
            if cols is None or not len(cols["latency_us"]):
                continue
            pooled.append(cols)
            errs = ", ".join(f"{lab} {100 * e:+.1f}% ({n})" for lab, n, e in oracle_error(cols, oracle))
            feats = profile_features(Profile({}, dict(cols), np.zeros(0, np.uint32), {}))
            covered = np.mean([oracle.covers(f) for f in feats]) * 100
            print(f"  oracle on {name}'s steps: {errs}; {covered:.1f}% of the steps in a populated cell")
        ps = paired_spread(r)
        print("  paired real-vs-real standard error of the mean / prompts for agreement within the target (95%): "
              + ", ".join(f"{k} {se:.1f}% / {n95:.0f} ({TARGETS[k]:.0f}%)" for k, (se, n95) in ps.items()))
    if pooled:
        names = set.intersection(*(set(c) for c in pooled))
        allc = {k: np.concatenate([c[k] for c in pooled]) for k in names}
        print(f"\noracle on every real step of every point ({len(allc['latency_us'])} steps, "
              f"{len(pooled)} runs; mean draw vs measured, summed):")
        print("  " + ", ".join(f"{lab} {100 * e:+.1f}% ({n})" for lab, n, e in oracle_error(allc, oracle)))
    prefixes = [int(x) for x in a.prefixes.split(",")]
    print("\nreal-vs-real agreement over the first N requests, |real2 - real1| / mean, % (median / max over points)")
    print(f"  {'N':>4} " + " ".join(f"{k:>14}" for k in ("ttft", "tpot", "itl", "e2el")))
    for n in prefixes:
        d: dict[str, list[float]] = {k: [] for k in ("ttft", "tpot", "itl", "e2el")}
        for r in rows:
            if len(r["real"]["start_times"]) < n:
                continue
            m1, m2 = prefix_metrics(r["real"], n), prefix_metrics(r["real2"], n)
            for k in d:
                d[k].append(abs(m2[k] - m1[k]) / ((m1[k] + m2[k]) / 2) * 100)
        if d["tpot"]:
            print(f"  {n:>4} " + " ".join(f"{np.median(v):6.1f} / {max(v):5.1f}" for v in d.values()))


if __name__ == "__main__":
    main()
