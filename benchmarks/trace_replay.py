"""Replay a real trace through the gateway, record it there, and replay the recording.

    python benchmarks/trace_replay.py --trace ../shared/traces/mooncake/conversation_trace.jsonl \\
        --duration 1200 --time-scale 0.5

1. The gateway (``--replicas`` emulated H100 Llama-3.1-8B servers behind ``--routing``; one by
   default; ``record_trace`` on) serves the trace's first
   ``--duration`` seconds, time-scaled by ``--time-scale``, sent by the Locust driver
   (``--trace``): TTFT, TPOT, ITL, E2EL p50/p99, throughput, the backend's prefix-cache hit rate
   against the trace's ideal one, requests clipped to ``max_model_len``.
2. The gateway restarts (an empty prefix cache, no recording) and the Locust driver replays the
   trace the gateway recorded (at its own timestamps, which are already the scaled ones).
3. The same trace window in ``emugate simulate`` (virtual time) for reference.

Prints both runs side by side (the record-and-replay agreement: hit rate in percentage points,
mean TTFT in %) and writes everything under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import ROOT

from gateway.launch import ServerProcess, free_port, wait_healthy
from profiles.assets import resolve_model_dir

MODEL = "llama-3.1-8b"


def gateway(out: Path, port: int, record: Path | None, replicas: int, routing: str) -> ServerProcess:
    cfg = out / ("record.toml" if record else "replay.toml")
    cfg.write_text(f"""[gateway]
port = {port}
request_timeout_s = 3600
idle_timeout_s = 1800
routing = "{routing}"
{f'record_trace = "{record}"' if record else ''}
[[backends]]
name = "h100"
model = "{MODEL}"
profile = "h100-sxm_llama-3.1-8b"
replicas = {replicas}
""")
    p = ServerProcess(cfg.stem, [sys.executable, "-m", "gateway", "--config", str(cfg)],
                      {**os.environ, "PYTHONUNBUFFERED": "1"}, log=open(os.devnull, "w"),
                      log_file=out / f"{cfg.stem}.gateway.log")
    p.start()
    wait_healthy(f"http://127.0.0.1:{port}", p, timeout_s=600, path="/ready")
    return p


def locust(url: str, out: Path, trace: Path, fmt: str | None, time_scale: float, duration: float | None,
           seed: int) -> dict:
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless", "-H", url,
           "--model", MODEL, "--trace", str(trace), "--time-scale", str(time_scale), "--seed", str(seed),
           "--result-json", str(out), "--only-summary", "--loglevel", "WARNING",
           "--tokenizer", str(resolve_model_dir(MODEL))]
    if fmt:
        cmd += ["--trace-format", fmt]
    if duration:
        cmd += ["--trace-duration", str(duration)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0 or not out.exists():
        raise SystemExit(f"load run failed:\n{p.stderr[-3000:]}")
    print(p.stderr.strip().splitlines()[0] if p.stderr.strip() else "", flush=True)
    return json.loads(out.read_text())


def lru_hit_rates(trace: Path, duration_s: float, capacities: dict[str, int]) -> dict[str, float]:
    """Prefix-cache hit rate of an LRU cache of ``capacities[label]`` trace blocks over the trace's first
    ``duration_s`` (hash ids as Mooncake defines them), beside the ideal (infinite cache) one: how much
    of the ideal reuse a KV pool of that size can keep."""
    from collections import OrderedDict

    from loadtests.trace import read_trace, window
    reqs = [r.hash_ids for r in window(read_trace(trace), 0.0, duration_s).requests]
    out = {}
    for label, cap in capacities.items():
        cache: OrderedDict = OrderedDict()
        hit = tot = 0
        for ids in reqs:
            for b in ids:
                tot += 1
                if b in cache:
                    hit += 1
                    cache.move_to_end(b)
                else:
                    cache[b] = None
                    if len(cache) > cap:
                        cache.popitem(last=False)
        out[label] = hit / max(tot, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trace", default=str(ROOT.parent / "shared" / "traces" / "mooncake" / "conversation_trace.jsonl"))
    ap.add_argument("--duration", type=float, default=1200.0, help="seconds of the trace (from its start)")
    ap.add_argument("--time-scale", type=float, default=1.0, help="0.5 = twice as fast")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replicas", type=int, default=1, help="emulated H100 servers behind the gateway")
    ap.add_argument("--routing", default="prefix_affinity",
                    choices=["least_outstanding", "kv_aware", "prefix_affinity", "session_affinity"])
    ap.add_argument("--skip-simulate", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "runs" / "trace-replay"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "recorded.jsonl"
    recorded.unlink(missing_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"

    t0 = time.monotonic()
    gw = gateway(out, port, recorded, args.replicas, args.routing)
    try:
        first = locust(url, out / "original.json", Path(args.trace), None, args.time_scale, args.duration, args.seed)
    finally:
        gw.stop(grace_s=30)
    print(f"original run: {time.monotonic() - t0:.0f} s wall", flush=True)
    gw = gateway(out, port, None, args.replicas, args.routing)
    try:
        second = locust(url, out / "replayed.json", recorded, "emugate", 1.0, None, args.seed)
    finally:
        gw.stop(grace_s=30)

    sim = None
    if not args.skip_simulate:
        sim_out = out / "simulated.json"
        p = subprocess.run([sys.executable, "-m", "emugate.cli", "simulate", "--profile", "h100-sxm_llama-3.1-8b",
                            "--model", MODEL, "--trace", args.trace, "--trace-duration", str(args.duration),
                            "--time-scale", str(args.time_scale), "--seed", str(args.seed), "--quiet",
                            "--replicas", str(args.replicas), "--routing", args.routing,
                            "--no-detailed", "--result-json", str(sim_out)], capture_output=True, text=True)
        if p.returncode == 0:
            sim = json.loads(sim_out.read_text())
        else:
            print(f"simulate failed: {p.stderr[-1500:]}", file=sys.stderr)

    cols = [("original (trace via gateway, recorded)", first), ("replay of the recording", second)]
    if sim is not None:
        cols.append(("simulate (virtual time)", sim))
    rows = [("requests completed / failed", lambda d: f"{d['completed']} / {d['failed']}")]
    for m in ("ttft", "tpot", "itl", "e2el"):
        rows.append((f"{m.upper()} p50 / p99 (ms)",
                     lambda d, m=m: f"{d[f'median_{m}_ms']:.1f} / {d[f'p99_{m}_ms']:.1f}"))
        rows.append((f"mean {m.upper()} (ms)", lambda d, m=m: f"{d[f'mean_{m}_ms']:.1f}"))
    rows += [("output throughput (tok/s)", lambda d: f"{d['output_throughput']:.0f}"),
             ("request throughput (req/s)", lambda d: f"{d['request_throughput']:.2f}"),
             ("backend prefix-cache hit rate", lambda d: "-" if d.get("prefix_cache_hit_rate") is None
              else f"{d['prefix_cache_hit_rate']:.1%}"),
             ("trace's ideal hit rate", lambda d: "-" if d.get("trace_ideal_hit_rate") is None
              else f"{d['trace_ideal_hit_rate']:.1%}"),
             ("requests over max_model_len (clipped)", lambda d: str(d.get("over_max_model_len", "-")))]
    lines = [f"# Trace replay: {args.trace}, first {args.duration:g} s, time scale {args.time_scale:g}, "
             f"{args.replicas} x emulated H100 Llama-3.1-8B, routing {args.routing}", "",
             "| | " + " | ".join(c for c, _ in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, fn in rows:
        lines.append(f"| {label} | " + " | ".join(fn(d) for _, d in cols) + " |")
    h1, h2 = first.get("prefix_cache_hit_rate"), second.get("prefix_cache_hit_rate")
    agree = [f"record-and-replay: hit rate {h1:.1%} vs {h2:.1%} ({(h2 - h1) * 100:+.1f} pp)" if h1 is not None
             and h2 is not None else "record-and-replay: hit rate unavailable",
             f"mean TTFT {first['mean_ttft_ms']:.1f} vs {second['mean_ttft_ms']:.1f} ms "
             f"({(second['mean_ttft_ms'] - first['mean_ttft_ms']) / first['mean_ttft_ms'] * 100:+.1f} %)"]
    lines += ["", "; ".join(agree)]
    from loadtests.trace import read_trace
    from profiles.assets import resolve_profile
    from profiles.format import Profile
    fp = Profile.load(str(resolve_profile("h100-sxm_llama-3.1-8b"))).fingerprint
    block = read_trace(Path(args.trace)).block_size
    per = int(fp["num_kv_blocks"]) * int(fp["block_size"]) // block
    caps = {"one replica's KV pool": per, f"{args.replicas} replicas' pools as one cache": per * args.replicas}
    lru = lru_hit_rates(Path(args.trace), args.duration, caps)
    lines += ["", "Why the backends' hit rate sits below the trace's ideal one (an infinite cache): an LRU cache "
              f"of {block}-token blocks over the same requests keeps "
              + ", ".join(f"{v:.1%} with {k} ({caps[k]} blocks)" for k, v in lru.items()) + "."]
    md = "\n".join(lines) + "\n"
    (out / "trace_replay.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
