"""Gateway overhead: the same open-loop load direct to vLLM and through the gateway.

Backend: one emulated vLLM (fixed ``--step-ms`` step, default 5 ms). Gateway: ``python -m gateway
--no-launch`` attached to it (its own process, uvloop + httptools). Client:
this process (aiohttp), Poisson arrivals at ``--rate`` req/s, targets
interleaved request by request (direct, gateway, direct, ...) so both see the
same machine state.

1. Non-streaming chat, max_tokens=1: latency p50/p99 direct vs gateway;
   added latency = gateway - direct at each percentile. Also the gateway's own
   ``emugate_added_latency_seconds`` histogram (its internal time per request).
2. Streaming chat, ``--stream-requests`` of 64 tokens at ``--stream-rate``
   (Poisson, targets alternating): mean TTFT and ITL direct vs gateway.

    python benchmarks/gateway_overhead.py [--rate 200] [--seconds 20]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from _common import MODEL, ROOT, ServerProcess, emulated_server, free_port, pct, wait_healthy


async def nonstream(session, url, n, rate, seed=0):
    rng = random.Random(seed)
    lat = {"direct": [], "gateway": []}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}

    async def one(target, base):
        t0 = time.perf_counter()
        async with session.post(base + "/v1/chat/completions", json=body) as r:
            await r.read()
            assert r.status == 200, r.status
        lat[target].append((time.perf_counter() - t0) * 1000)

    tasks = []
    t = time.perf_counter()
    for i in range(n):
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        target = "direct" if i % 2 == 0 else "gateway"
        tasks.append(asyncio.create_task(one(target, url[target])))
    await asyncio.gather(*tasks)
    return lat


async def streams(session, url, n, rate, seed=1):
    """Open-loop Poisson streaming requests, targets alternating (so neither set of
    requests reaches vLLM ahead of the other in a burst and joins an earlier step)."""
    rng = random.Random(seed)
    out = {"direct": {"ttft": [], "itl": []}, "gateway": {"ttft": [], "itl": []}}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "max_tokens": 64,
            "ignore_eos": True, "stream": True}

    async def one(target):
        st = time.perf_counter()
        last = None
        async with session.post(url[target] + "/v1/chat/completions", json=body) as r:
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                ts = time.perf_counter()
                if last is None:
                    out[target]["ttft"].append(ts - st)
                else:
                    out[target]["itl"].append(ts - last)
                last = ts

    tasks = []
    t = time.perf_counter()
    for i in range(n):
        t += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, t - time.perf_counter()))
        tasks.append(asyncio.create_task(one("direct" if i % 2 == 0 else "gateway")))
    await asyncio.gather(*tasks)
    return out


async def scrape_added(gw_url, session):
    async with session.get(gw_url + "/metrics") as r:
        text = await r.text()
    buckets = []
    for line in text.splitlines():
        if line.startswith("emugate_added_latency_seconds_bucket"):
            le = line.split('le="')[1].split('"')[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1] if buckets else 0
    def q(p):
        for le, c in buckets:
            if c >= p * total:
                return le * 1000
        return float("nan")
    return total, q(0.5), q(0.99)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="total requests/s (half to each target)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--step-ms", type=float, default=5.0, help="emulated backend's fixed step (ms)")
    ap.add_argument("--stream-requests", type=int, default=400)
    ap.add_argument("--stream-rate", type=float, default=20.0, help="streaming requests/s (Poisson)")
    a = ap.parse_args()
    with emulated_server(step_ms=a.step_ms, name="bench-gw-backend") as (direct, _):
        port = int(direct.rsplit(":", 1)[1])
        gport = free_port()
        cfg = Path(tempfile.mkdtemp()) / "gw.toml"
        cfg.write_text(f'[gateway]\nport = {gport}\n[[backends]]\nname = "emu"\nmodel = "{MODEL}"\n'
                       f'mode = "emulate"\nprofile = "cpu-epyc-2c_mistral-h1024-l8"\nports = [{port}]\n')
        gw = ServerProcess("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg), "--no-launch",
                                       "--log-level", "warning"], dict(os.environ), log=open(os.devnull, "w"))
        gw.start()
        gurl = f"http://127.0.0.1:{gport}"
        try:
            wait_healthy(gurl, gw, timeout_s=60, path="/ready")
            url = {"direct": direct, "gateway": gurl}

            async def run():
                conn = aiohttp.TCPConnector(limit=0)
                async with aiohttp.ClientSession(connector=conn) as s:
                    await nonstream(s, url, 200, 50.0, seed=99)  # warm-up both paths
                    lat = await nonstream(s, url, int(a.rate * a.seconds), a.rate)
                    total, g50, g99 = await scrape_added(gurl, s)
                    st = await streams(s, url, a.stream_requests, a.stream_rate)
                    return lat, (total, g50, g99), st
            lat, added, st = asyncio.run(run())
        finally:
            gw.stop()
    d, g = lat["direct"], lat["gateway"]
    print(f"non-streaming chat, max_tokens=1, {a.rate:.0f} req/s open loop, {len(d)}+{len(g)} requests")
    print(f"  direct : p50 {pct(d, 50):6.2f} ms  p99 {pct(d, 99):6.2f} ms")
    print(f"  gateway: p50 {pct(g, 50):6.2f} ms  p99 {pct(g, 99):6.2f} ms")
    print(f"  added  : p50 {pct(g, 50) - pct(d, 50):+6.2f} ms  p99 {pct(g, 99) - pct(d, 99):+6.2f} ms")
    print(f"  gateway-internal time per request (its histogram, {added[0]:.0f} requests): "
          f"p50 <= {added[1]:.2f} ms, p99 <= {added[2]:.2f} ms")
    for m in ("ttft", "itl"):
        dv, gv = np.mean(st["direct"][m]) * 1000, np.mean(st["gateway"][m]) * 1000
        print(f"streaming mean {m.upper()} ({len(st['direct'][m])}+{len(st['gateway'][m])} samples): "
              f"direct {dv:7.2f} ms, gateway {gv:7.2f} ms ({(gv - dv) / dv * 100:+.2f}%)")


if __name__ == "__main__":
    main()
