"""Gateway soak: many concurrent streams for minutes through ``python -m gateway``; errors, RSS, open fds.

The gateway launches ``--replicas`` emulated replicas (bundled CPU profile,
``--max-num-seqs`` each, a KV pool large enough that nothing is preempted);
``--streams`` client workers (aiohttp, this process) each send streamed chat
requests back to back for ``--seconds``: ``max_tokens`` drawn from 32-256,
``ignore_eos``, ``stream_options.include_usage``. A request counts as an error
unless it answers 200, ends with ``data: [DONE]``, carries exactly
``max_tokens`` content events and a usage chunk saying so.

Every ``--sample-s`` the gateway process's RSS (``/proc/PID/status`` VmRSS)
and open file descriptors (``/proc/PID/fd``) are read; the first sample is
taken after ``--warmup-s`` of load (pools and caches filled), the last at the
end of the load.

    python benchmarks/gateway_soak.py --streams 500 --seconds 600
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import time
from pathlib import Path

import aiohttp

from _common import MODEL, PROFILE, start_gateway, wait_healthy


def rss_fds(pid: int) -> tuple[float, int]:
    """(RSS in MiB, open file descriptors) of ``pid``."""
    rss_kb = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1))
    return rss_kb / 1024, len(os.listdir(f"/proc/{pid}/fd"))


async def worker(i: int, session: aiohttp.ClientSession, url: str, stop_at: float, stats: dict) -> None:
    rng = random.Random(i)
    while time.monotonic() < stop_at:
        n = rng.randint(32, 256)
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"soak {i} {rng.random()}"}],
                "max_tokens": n, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        content, usage, done = 0, None, False
        try:
            async with session.post(url + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    stats["errors"].append(f"HTTP {r.status}: {(await r.text())[:200]}")
                    continue
                async for line in r.content:
                    if not line.startswith(b"data: "):
                        continue
                    if line.startswith(b"data: [DONE]"):
                        done = True
                        continue
                    doc = json.loads(line[6:])
                    if "error" in doc:
                        stats["errors"].append(f"SSE error: {doc['error']}")
                        break
                    if doc.get("usage"):
                        usage = doc["usage"]
                    if doc["choices"] and doc["choices"][0]["delta"].get("content"):
                        content += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            stats["errors"].append(repr(e))
            continue
        if not done or usage is None or usage["completion_tokens"] != n or content != n:
            stats["errors"].append(f"incomplete: done={done} content={content} usage={usage} asked={n}")
        else:
            stats["ok"] += 1
            stats["tokens"] += n


async def sampler(pid: int, every_s: float, stop_at: float, samples: list) -> None:
    while time.monotonic() < stop_at:
        samples.append((time.monotonic(), *rss_fds(pid)))
        await asyncio.sleep(every_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=500, help="concurrent client streams")
    ap.add_argument("--seconds", type=float, default=600.0, help="load duration (s)")
    ap.add_argument("--warmup-s", type=float, default=60.0, help="load before the first RSS/fd sample (s)")
    ap.add_argument("--sample-s", type=float, default=30.0, help="RSS/fd sampling period (s)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--max-num-seqs", type=int, default=256, help="per replica")
    a = ap.parse_args()
    url, gw, _ = start_gateway("soak", f'[[backends]]\nname = "emu"\nmodel = "{MODEL}"\nmode = "emulate"\n'
                                       f'profile = "{PROFILE}"\nreplicas = {a.replicas}\nmax_model_len = 2048\n'
                                       f'extra_args = ["--max-num-seqs", "{a.max_num_seqs}", '
                                       '"--num-gpu-blocks-override", "2048"]\n', ("--log-level", "warning"))
    try:
        print(f"gateway ready in {wait_healthy(url, gw, timeout_s=300, path='/ready'):.0f} s; "
              f"{a.streams} streams for {a.seconds:.0f} s", flush=True)
        stats = {"ok": 0, "tokens": 0, "errors": []}
        samples: list = []

        async def run():
            conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
            async with aiohttp.ClientSession(connector=conn, timeout=timeout) as s:
                t0 = time.monotonic()
                stop_at = t0 + a.seconds
                tasks = [asyncio.create_task(worker(i, s, url, stop_at, stats)) for i in range(a.streams)]

                async def progress():
                    await asyncio.sleep(a.warmup_s)
                    smp = asyncio.create_task(sampler(gw.pid, a.sample_s, stop_at, samples))
                    while time.monotonic() < stop_at:
                        await asyncio.sleep(60)
                        print(f"  {time.monotonic() - t0:5.0f} s: {stats['ok']} ok, {len(stats['errors'])} errors, "
                              f"gateway RSS {rss_fds(gw.pid)[0]:.0f} MiB", flush=True)
                    await smp
                await asyncio.gather(progress(), *tasks)
                return time.monotonic() - t0
        wall = asyncio.run(run())
        time.sleep(5)  # connections the client just closed leave the gateway
        rss_after, fds_after = rss_fds(gw.pid)
    finally:
        gw.stop()
    (_, rss0, fd0), (_, rss1, fd1) = samples[0], samples[-1]
    print(f"requests: {stats['ok']} complete, {len(stats['errors'])} errors; {stats['tokens'] / wall:.0f} output "
          f"tok/s over {wall:.0f} s")
    for e in stats["errors"][:5]:
        print("  error:", e)
    growth = (rss1 - rss0) / rss0 * 100
    print(f"gateway RSS: {rss0:.1f} MiB after warm-up -> {rss1:.1f} MiB at the end ({growth:+.1f}%, "
          f"{len(samples)} samples), "
          f"max {max(s[1] for s in samples):.1f} MiB; idle 5 s later {rss_after:.1f} MiB")
    print(f"gateway open fds: {fd0} after warm-up -> {fd1} at the end of the load (max "
          f"{max(s[2] for s in samples)}); idle 5 s later {fds_after}")


if __name__ == "__main__":
    main()
