"""Staging chaos: a steady ShareGPT load through a two-replica emulated H100 fleet while a fault
scenario slows one replica x3, then crashes it, then shrinks the other's KV pool.

    python benchmarks/chaos.py --rate 6 --seconds 300

The scenario is the config's own (``[[backends.faults.engine]]``, times from the gateway's start);
the load starts at a known gateway uptime, so each fault's window is placed on the load's clock.
Prints, per 30-s window: TTFT and TPOT p50/p99 (ms), requests completed, errors by kind,
preemptions, and requests served by each replica (from the replicas' own ``vllm:*`` counters
through the gateway's /metrics, sampled every 2 s); writes ``chaos.json`` and a PNG timeline with
the fault windows shaded (``--out``).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from _common import ROOT

from gateway.launch import ServerProcess, free_port, wait_healthy

#: (kind, replica, start s after the load starts, duration s, parameters)
SCENARIO = [("slow", 1, 30, 60, {"factor": 3.0}),
            ("crash", 1, 120, None, {}),
            ("kv_pressure", 0, 180, 60, {"fraction": 0.003})]


def scrape(url: str) -> dict:
    """Per replica: preemptions, successes, KV usage, running requests (vLLM's own metrics)."""
    out: dict = collections.defaultdict(dict)
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            rep = s.labels.get("replica")
            if rep is None:
                continue
            if s.name == "vllm:num_preemptions_total":
                out[rep]["preempt"] = out[rep].get("preempt", 0) + s.value
            elif s.name == "vllm:request_success_total":
                out[rep]["success"] = out[rep].get("success", 0) + s.value
            elif s.name == "vllm:kv_cache_usage_perc":
                out[rep]["kv"] = s.value
    return dict(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=6.0, help="requests/s")
    ap.add_argument("--seconds", type=float, default=300.0, help="seconds of load")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--load-at", type=float, default=120.0,
                    help="gateway uptime (s) at which the load starts: after both replicas are ready")
    ap.add_argument("--out", default=str(ROOT / "runs" / "chaos"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    engine = "\n".join(
        f'[[backends.faults.engine]]\nkind = "{k}"\nreplicas = [{r}]\nat_s = {args.load_at + t0:g}\n'
        + (f"duration_s = {d:g}\n" if d else "") + "".join(f"{p} = {v!r}\n" for p, v in params.items())
        for k, r, t0, d, params in SCENARIO)
    cfg = out / "fleet.toml"
    cfg.write_text(f"""[gateway]
port = {port}
admin_keys = ["chaos-admin"]
[[backends]]
name = "llama"
model = "llama-3.1-8b"
profile = "h100-sxm_llama-3.1-8b"
replicas = 2
[backends.faults]
{engine}""")
    log = out / "gateway.log"
    gw = ServerProcess("chaos-gw", [sys.executable, "-m", "gateway", "--config", str(cfg)],
                       {**os.environ, "PYTHONUNBUFFERED": "1"}, log=open(os.devnull, "w"), log_file=log)
    gw.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, gw, timeout_s=600, path="/ready")
        while not all(s == "ready" for s in httpx.get(url + "/health").json()["models"]["llama-3.1-8b"]):
            time.sleep(0.5)
        up = httpx.get(url + "/admin/faults", headers={"Authorization": "Bearer chaos-admin"}).json()["uptime_s"]
        gw_start = time.monotonic() - up
        if up > args.load_at:
            raise SystemExit(f"the replicas took {up:.0f} s to be ready, past the load's start "
                             f"({args.load_at:g} s): raise --load-at")
        time.sleep(gw_start + args.load_at - time.monotonic())
        t_load = time.monotonic()
        samples: list[tuple[float, dict]] = []
        stop = threading.Event()

        def sampler():
            while not stop.is_set():
                try:
                    samples.append((time.monotonic() - t_load, scrape(url)))
                except Exception:  # noqa: BLE001 - a scrape during a restart
                    pass
                stop.wait(2.0)

        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        from loadtests.runner import run_locust
        from profiles.assets import resolve_model_dir
        doc = run_locust(url, "llama-3.1-8b", out / "load.json", rate=args.rate,
                         num_prompts=int(args.rate * args.seconds), seed=args.seed,
                         tokenizer=str(resolve_model_dir("llama-3.1-8b")), ignore_eos=False,
                         allow_failures=True)
        time.sleep(4)
        stop.set()
        th.join()
    finally:
        gw.stop(grace_s=30)

    # ---- per-window figures
    starts = np.array(doc["start_times"]) - t_load
    ttft = np.array(doc["ttfts"]) * 1000
    lat = np.array(doc["latencies"]) * 1000
    outl = np.array(doc["output_lens"])
    errs = doc["errors"]
    win = 30.0
    n_win = int(np.ceil(max(starts.max(), samples[-1][0]) / win))
    rows = []

    def counter_delta(rep: str, key: str, a: float, b: float) -> float:
        """Sum of positive increments of a per-replica counter within [a, b) (a restart resets it)."""
        vals = [s.get(rep, {}).get(key) for t, s in samples if a <= t < b + 2]
        tot, prev = 0.0, None
        for v in vals:
            if v is None:
                prev = None
                continue
            if prev is not None and v >= prev:
                tot += v - prev
            prev = v
        return tot

    for w in range(n_win):
        a, b = w * win, (w + 1) * win
        m = (starts >= a) & (starts < b)
        ok = m & np.array([not e for e in errs])
        tpot = np.where(outl > 1, (lat - ttft) / np.maximum(outl - 1, 1), np.nan)[ok]
        kinds = collections.Counter(e.split(":")[0][:40] for e, mm in zip(errs, m) if mm and e)
        rows.append({
            "window": f"{a:.0f}-{b:.0f} s", "sent": int(m.sum()), "completed": int(ok.sum()),
            "ttft_p50": float(np.percentile(ttft[ok], 50)) if ok.any() else None,
            "ttft_p99": float(np.percentile(ttft[ok], 99)) if ok.any() else None,
            "tpot_p50": float(np.nanpercentile(tpot, 50)) if len(tpot) else None,
            "tpot_p99": float(np.nanpercentile(tpot, 99)) if len(tpot) else None,
            "errors": dict(kinds),
            "preemptions": sum(counter_delta(r, "preempt", a, b) for r in ("0", "1")),
            "served_r0": counter_delta("0", "success", a, b), "served_r1": counter_delta("1", "success", a, b),
            "faults": [f"{k} r{r}" for k, r, t0, d, _ in SCENARIO if t0 < b and (d is None and a <= t0 or
                                                                             d is not None and t0 + d > a)],
        })
    (out / "chaos.json").write_text(json.dumps({"args": vars(args), "scenario": SCENARIO, "windows": rows,
                                                "completed": doc["completed"], "failed": doc["failed"]}, indent=1))
    print(f"{doc['completed']} completed, {doc['failed']} failed; scenario "
          + "; ".join(f"{k} replica {r} at {t0} s" + (f" for {d} s" if d else "") for k, r, t0, d, _ in SCENARIO))
    print("| window | faults on | sent | done | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | errors | preemptions "
          "| served r0 / r1 |")
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    fmt1 = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    for r in rows:
        print(f"| {r['window']} | {', '.join(r['faults']) or '-'} | {r['sent']} | {r['completed']} | "
              f"{fmt(r['ttft_p50'])} / {fmt(r['ttft_p99'])} | {fmt1(r['tpot_p50'])} / {fmt1(r['tpot_p99'])} | "
              f"{', '.join(f'{k}: {v}' for k, v in r['errors'].items()) or '0'} | {r['preemptions']:.0f} | "
              f"{r['served_r0']:.0f} / {r['served_r1']:.0f} |")
    _png(rows, out / "chaos.png", win)
    print(f"wrote {out / 'chaos.json'} and {out / 'chaos.png'}")


def _png(rows, path: Path, win: float) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    x = np.arange(len(rows)) * win + win / 2
    fig, axes = plt.subplots(4, 1, figsize=(10, 10), sharex=True)
    get = lambda k: [np.nan if r[k] is None else r[k] for r in rows]  # noqa: E731
    axes[0].plot(x, get("ttft_p50"), "o-", label="TTFT p50")
    axes[0].plot(x, get("ttft_p99"), "o-", label="TTFT p99")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms")
    axes[1].plot(x, get("tpot_p50"), "o-", label="TPOT p50")
    axes[1].plot(x, get("tpot_p99"), "o-", label="TPOT p99")
    axes[1].set_ylabel("ms")
    axes[2].bar(x - 4, [r["served_r0"] for r in rows], 8, label="served by replica 0")
    axes[2].bar(x + 4, [r["served_r1"] for r in rows], 8, label="served by replica 1")
    axes[2].set_ylabel("requests")
    axes[3].bar(x - 4, [sum(r["errors"].values()) for r in rows], 8, label="errors", color="tab:red")
    axes[3].bar(x + 4, [r["preemptions"] for r in rows], 8, label="preemptions", color="tab:purple")
    axes[3].set_xlabel("seconds into the load")
    colors = {"slow": "tab:orange", "crash": "tab:red", "kv_pressure": "tab:purple"}
    for ax in axes:
        for k, _r, t0, d, _ in SCENARIO:
            if d:
                ax.axvspan(t0, t0 + d, color=colors[k], alpha=0.12)
            else:
                ax.axvline(t0, color=colors[k], ls="--")
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    axes[0].set_title("chaos scenario: " + "; ".join(f"{k} r{r} at {t0} s" for k, r, t0, _, _ in SCENARIO),
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
