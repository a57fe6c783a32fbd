"""Gateway overhead: the same open-loop load direct to vLLM and through the gateway.

Backend: one emulated vLLM (fixed ``--step-ms`` step, default 5 ms). Gateway: ``python -m gateway
--no-launch`` attached to it (its own process, uvloop + httptools). Client:
this process (aiohttp), Poisson arrivals at ``--rate`` req/s, targets
interleaved request by request (direct, gateway, direct, ...) so both see the
same machine state.

``--baseline REF`` also starts the gateway of git revision REF (checked out
into a temporary worktree) attached to the same backend, and interleaves three
targets (direct, gateway, baseline): before/after in one run, same machine
state. ``--floor`` adds a TCP byte splicer (``_splice_proxy.py``: no HTTP, no
features) as one more target: the lower bound of what two extra loopback hops
cost on this host. ``--litellm`` adds LiteLLM's proxy (if installed) as a
reference column. ``--rate`` is the total over all targets. Each proxy's CPU
time per request (``/proc/PID/stat``, user + system, over the non-streaming
phase) is printed beside its latency.

1. Non-streaming chat, max_tokens=1: latency p50/p99 direct vs gateway;
   added latency = gateway - direct at each percentile. Also the gateway's own
   ``emugate_added_latency_seconds`` histogram (its internal time per request).
2. Streaming chat, ``--stream-requests`` of 64 tokens at ``--stream-rate``
   (Poisson, targets alternating): mean TTFT and ITL direct vs gateway.

    python benchmarks/gateway_overhead.py [--rate 200] [--seconds 20] [--baseline REF] [--floor] [--litellm]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np

from _common import MODEL, ROOT, ServerProcess, emulated_server, free_port, pct, wait_healthy


async def nonstream(session, url, n, rate, seed=0):
    rng = random.Random(seed)
    names = list(url)
    lat = {t: [] for t in names}
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
        target = names[i % len(names)]
        tasks.append(asyncio.create_task(one(target, url[target])))
    await asyncio.gather(*tasks)
    return lat


async def streams(session, url, n, rate, seed=1):
    """Open-loop Poisson streaming requests, targets alternating (so neither set of
    requests reaches vLLM ahead of the other in a burst and joins an earlier step)."""
    rng = random.Random(seed)
    names = list(url)
    out = {t: {"ttft": [], "itl": []} for t in names}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "max_tokens": 64,
            "ignore_eos": True, "stream": True}

    async def one(target):
        try:
            await one_stream(target)
        except aiohttp.ClientError as e:
            out[target].setdefault("errors", []).append(repr(e))

    async def one_stream(target):
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
        tasks.append(asyncio.create_task(one(names[i % len(names)])))
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


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0, help="total requests/s (half to each target)")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--step-ms", type=float, default=5.0, help="emulated backend's fixed step (ms)")
    ap.add_argument("--stream-requests", type=int, default=400)
    ap.add_argument("--stream-rate", type=float, default=20.0, help="streaming requests/s (Poisson)")
    ap.add_argument("--baseline", default=None, metavar="REF",
                    help="also measure the gateway of this git revision (before/after in one run)")
    ap.add_argument("--floor", action="store_true", help="also measure a TCP byte splicer (the floor)")
    ap.add_argument("--litellm", default=None, metavar="CMD",
                    help="also measure LiteLLM's proxy started by this command (e.g. a venv's bin/litellm with the "
                         "proxy extra: pip install 'litellm[proxy]'), a reference column")
    a = ap.parse_args()
    with emulated_server(step_ms=a.step_ms, name="bench-gw-backend") as (direct, _):
        port = int(direct.rsplit(":", 1)[1])
        gport = free_port()
        tmp = Path(tempfile.mkdtemp())
        cfg = tmp / "gw.toml"
        cfg.write_text(f'[gateway]\nport = {gport}\n[[backends]]\nname = "emu"\nmodel = "{MODEL}"\n'
                       f'mode = "emulate"\nprofile = "cpu-epyc-2c_mistral-h1024-l8"\nports = [{port}]\n')
        gws = {"gateway": (ServerProcess("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg),
                                                     "--no-launch", "--log-level", "warning"], dict(os.environ),
                                         log=open(os.devnull, "w")), gport, "/ready")}
        if a.baseline:
            wt = tmp / "baseline"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(wt), a.baseline],
                           check=True, capture_output=True)
            bport = free_port()
            bcfg = tmp / "base.toml"
            bcfg.write_text(cfg.read_text().replace(f"port = {gport}", f"port = {bport}"))
            gws["baseline"] = (ServerProcess("baseline", [sys.executable, "-m", "gateway", "--config", str(bcfg),
                                                          "--no-launch", "--log-level", "warning"],
                                             {**os.environ, "PYTHONPATH": str(wt)}, log=open(os.devnull, "w"),
                                             cwd=str(wt)), bport, "/health")
        if a.floor:
            fport = free_port()
            gws["floor"] = (ServerProcess("floor", [sys.executable, str(ROOT / "benchmarks" / "_splice_proxy.py"),
                                                    str(fport), str(port)], dict(os.environ),
                                          log=open(os.devnull, "w")), fport, "/health")
        if a.litellm:
            lport = free_port()
            lcfg = tmp / "litellm.yaml"
            lcfg.write_text(f"model_list:\n  - model_name: {MODEL}\n    litellm_params:\n      model: openai/{MODEL}\n"
                            f"      api_base: {direct}/v1\n      api_key: none\n")
            gws["litellm"] = (ServerProcess("litellm", [a.litellm, "--config", str(lcfg),
                                                        "--port", str(lport), "--num_workers", "1"],
                                            {**os.environ, "LITELLM_LOG": "ERROR",  # local benchmark: no key
                                             "LITELLM_DANGEROUSLY_PERMIT_WEAK_OR_UNSET_MASTER_KEY": "true"},
                                            log=open(os.devnull, "w")),
                              lport, "/health/liveliness")
        for proc, _, _ in gws.values():
            proc.start()
        try:
            url = {"direct": direct}
            for name, (proc, p, ready) in gws.items():
                url[name] = f"http://127.0.0.1:{p}"
                wait_healthy(url[name], proc, timeout_s=180, path=ready)

            async def run():
                conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)  # under uvicorn's 5 s
                async with aiohttp.ClientSession(connector=conn) as s:
                    await nonstream(s, url, 300, 50.0, seed=99)  # warm-up every path
                    c0 = {n: cpu_s(p.pid) for n, (p, _, _) in gws.items()}
                    lat = await nonstream(s, url, int(a.rate * a.seconds), a.rate)
                    cpu = {n: (cpu_s(p.pid) - c0[n]) / len(lat[n]) * 1e3 for n, (p, _, _) in gws.items()}
                    added = {n: await scrape_added(url[n], s) for n in gws if n in ("gateway", "baseline")}
                    st = await streams(s, url, a.stream_requests, a.stream_rate)
                    return lat, added, st, cpu
            lat, added, st, cpu = asyncio.run(run())
        finally:
            for proc, _, _ in gws.values():
                proc.stop()
            if a.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "baseline")],
                               capture_output=True)
    d = lat["direct"]
    print(f"non-streaming chat, max_tokens=1, {a.rate:.0f} req/s open loop in total, "
          f"{' + '.join(f'{len(v)} {k}' for k, v in lat.items())} requests")
    print(f"  direct  : p50 {pct(d, 50):6.2f} ms  p99 {pct(d, 99):6.2f} ms")
    for n in gws:
        g = lat[n]
        print(f"  {n:8s}: p50 {pct(g, 50):6.2f} ms  p99 {pct(g, 99):6.2f} ms   added: p50 "
              f"{pct(g, 50) - pct(d, 50):+6.2f} ms  p99 {pct(g, 99) - pct(d, 99):+6.2f} ms   "
              f"CPU {cpu[n]:.3f} ms/request")
        if n in added:
            print(f"            internal time per request (its histogram, {added[n][0]:.0f} requests): "
                  f"p50 <= {added[n][1]:.2f} ms, p99 <= {added[n][2]:.2f} ms")
    for m in ("ttft", "itl"):
        dv = np.mean(st["direct"][m]) * 1000
        row = ", ".join(f"{n} {np.mean(st[n][m]) * 1000:7.2f} ms ({(np.mean(st[n][m]) * 1000 - dv) / dv * 100:+.2f}%)"
                        for n in gws)
        print(f"streaming mean {m.upper()} ({len(st['direct'][m])} direct samples): direct {dv:7.2f} ms, {row}")
    for n, v in st.items():
        if v.get("errors"):
            print(f"  {n}: {len(v['errors'])} streaming requests failed, e.g. {v['errors'][0]}")


if __name__ == "__main__":
    main()
