"""Admission before buffering: many concurrent large uploads against ``queue_limit``.

A gateway (``python -m gateway --no-launch``, ``queue_limit = --queue-limit``) fronts a slow
upstream (an aiohttp server in a subprocess that reads each body and answers 200 after
``--hold-s``). ``--clients`` clients open their connections at once and each uploads a
``--mib`` MiB JSON body (a plain client: it sends its whole body without ``Expect``). Measured:

* the gateway's resident memory: idle before the burst, and its peak during it (``VmHWM`` of
  ``/proc/PID/status``, reset-free since the process started only for this run);
* per client: the status, the time to the response head, and how many body bytes it had
  handed to its socket when the head arrived (for 429s: how little of the body was sent
  before the gateway refused it without reading it);
* the bound the gateway must keep: ``queue_limit x body size + idle``.

    python benchmarks/gateway_admission.py [--clients 100] [--queue-limit 8] [--mib 32]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import ROOT, ServerProcess, free_port, wait_healthy

UPSTREAM = r"""
import asyncio, sys
from aiohttp import web
hold = float(sys.argv[2])
async def completions(request):
    body = await request.read()
    await asyncio.sleep(hold)
    return web.json_response({"object": "text_completion", "bytes": len(body)})
async def health(request):
    return web.Response(text="ok")
app = web.Application(client_max_size=64 * 2**20)
app.add_routes([web.post("/v1/completions", completions), web.get("/health", health)])
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k + ":"] = int(v.split()[0])
    return out


async def upload(port: int, body: bytes, chunk: int = 256 * 1024) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    t0 = time.perf_counter()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n" % len(body))
    sent = 0
    head_at: dict = {}

    async def read_head():
        line = await reader.readline()
        head_at.update(t=time.perf_counter() - t0, sent=sent, status=int(line.split()[1]) if line else 0)
        length = 0
        while (h := await reader.readline()) not in (b"\r\n", b""):
            if h.lower().startswith(b"content-length:"):
                length = int(h.split(b":")[1])
        await reader.readexactly(length)

    rd = asyncio.create_task(read_head())
    try:
        for i in range(0, len(body), chunk):
            if rd.done():
                break  # answered before the body was read: stop uploading, as a client that got 429 would
            writer.write(body[i:i + chunk])
            await writer.drain()
            sent = i + chunk
        await asyncio.wait_for(asyncio.shield(rd), 120) if not rd.done() else None
    except (ConnectionError, asyncio.TimeoutError):
        pass
    writer.close()
    if not rd.done():
        rd.cancel()
    return {"status": head_at.get("status", 0), "t": head_at.get("t", float("nan")),
            "sent": head_at.get("sent", sent), "size": len(body)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--queue-limit", type=int, default=8)
    ap.add_argument("--mib", type=float, default=32.0, help="body size per upload (MiB)")
    ap.add_argument("--hold-s", type=float, default=3.0, help="how long the upstream holds each request")
    a = ap.parse_args()
    size = int(a.mib * 2**20)
    prefix = b'{"model": "up", "prompt": "'
    body = prefix + b"x" * (size - len(prefix) - 2) + b'"}'
    up_port, gw_port = free_port(), free_port()
    tmp = Path(tempfile.mkdtemp())
    (tmp / "up.py").write_text(UPSTREAM)
    up = subprocess.Popen([sys.executable, str(tmp / "up.py"), str(up_port), str(a.hold_s)])
    cfg = tmp / "gw.toml"
    cfg.write_text(f'[gateway]\nport = {gw_port}\nqueue_limit = {a.queue_limit}\nmax_body_bytes = {size}\n'
                   f'body_timeout_s = 120\n[[backends]]\nname = "up"\nmodel = "up"\nmode = "real"\n'
                   f'ports = [{up_port}]\n')
    gw = ServerProcess("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg), "--no-launch",
                                   "--log-level", "warning"], dict(os.environ), log=open(os.devnull, "w"),
                       cwd=str(ROOT))
    gw.start()
    try:
        wait_healthy(f"http://127.0.0.1:{gw_port}", gw, timeout_s=60, path="/ready")
        time.sleep(1.0)
        idle = rss_kib(gw.pid)
        samples = []

        async def run():
            async def sample():
                while True:
                    samples.append(rss_kib(gw.pid)["VmRSS:"])
                    await asyncio.sleep(0.01)
            s = asyncio.create_task(sample())
            res = await asyncio.gather(*(upload(gw_port, body) for _ in range(a.clients)))
            s.cancel()
            return res
        t0 = time.perf_counter()
        results = asyncio.run(run())
        wall = time.perf_counter() - t0
        after = rss_kib(gw.pid)
    finally:
        gw.stop()
        up.terminate()
    by = Counter(r["status"] for r in results)
    bound = a.queue_limit * size / 1024 + idle["VmRSS:"]
    print(f"{a.clients} concurrent uploads of {a.mib:g} MiB, queue_limit {a.queue_limit}, upstream holds "
          f"{a.hold_s:g} s; {wall:.1f} s in all")
    print("  statuses: " + ", ".join(f"{k}: {v}" for k, v in sorted(by.items())))
    refused = [r for r in results if r["status"] == 429]
    if refused:
        print(f"  429s: head after {statistics.median(r['t'] for r in refused) * 1000:.1f} ms median "
              f"({max(r['t'] for r in refused) * 1000:.1f} ms max); body bytes the client had sent by then: "
              f"median {statistics.median(r['sent'] for r in refused) / 2**20:.2f} MiB, max "
              f"{max(r['sent'] for r in refused) / 2**20:.2f} MiB of {a.mib:g}")
    print(f"  gateway RSS: idle {idle['VmRSS:'] / 1024:.1f} MiB; peak during the burst {after['VmHWM:'] / 1024:.1f} "
          f"MiB (sampled max {max(samples) / 1024:.1f} MiB); bound queue_limit x body + idle = "
          f"{bound / 1024:.1f} MiB -> {'within' if after['VmHWM:'] <= bound else 'OVER'}")
    print(json.dumps({"statuses": dict(by), "idle_mib": idle["VmRSS:"] / 1024, "peak_mib": after["VmHWM:"] / 1024,
                      "bound_mib": bound / 1024}))


if __name__ == "__main__":
    main()
