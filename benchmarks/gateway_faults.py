"""Faults under load: kill -9 a replica N times, then kill -9 the gateway itself.

The gateway launches two emulated replicas (bundled CPU profile). Under a
steady load of ``--streamers`` streaming and ``--callers`` non-streaming
clients (aiohttp, this process), every ``--every-s`` one replica's process
group is SIGKILLed (alternating), ``--kills`` times. Reported:

* requests lost before their first byte (non-200 or a connection error with
  no response head): the gateway should have retried them on the other
  replica, so 0;
* streams cut: streams that ended with an SSE ``error`` event, and how long
  after the kill that event reached the client (each within 1 s);
* any other failure (a stream that ended without ``[DONE]`` or an error);
* time from each kill until the killed replica is ready again (restart).

Finally the gateway itself is SIGKILLed, and every process of every replica
process group it started is looked for 5 s later (its reaper should have
ended them all).

    python benchmarks/gateway_faults.py --kills 5
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import time

import aiohttp
import numpy as np

from _common import MODEL, PROFILE, start_gateway, wait_healthy
from gateway.launch import group_members


async def streamer(i, s, url, stop, res):
    rng = random.Random(i)
    while not stop.is_set():
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"f{i} {rng.random()}"}],
                "max_tokens": rng.randint(50, 200), "ignore_eos": True, "stream": True}
        t0 = time.monotonic()
        try:
            async with s.post(url + "/v1/chat/completions", json=body) as r:
                if r.status != 200:
                    res["lost"].append((t0, f"HTTP {r.status} {(await r.text())[:120]}"))
                    continue
                done = False
                async for line in r.content:
                    if line.startswith(b"data: [DONE]"):
                        done = True
                    elif line.startswith(b'data: {"error"'):
                        res["cut"].append((time.monotonic(), json.loads(line[6:])["error"]["message"][:120]))
                        done = True
                        break
                if not done:
                    res["other"].append((t0, "stream ended without [DONE] or an error event"))
                else:
                    res["ok"] += 1
        except aiohttp.ClientResponseError as e:
            res["lost"].append((t0, repr(e)))
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            res["other"].append((t0, repr(e)))


async def caller(i, s, url, stop, res):
    rng = random.Random(1000 + i)
    while not stop.is_set():
        body = {"model": MODEL, "prompt": f"c{i} {rng.random()}", "max_tokens": 8, "ignore_eos": True}
        t0 = time.monotonic()
        try:
            async with s.post(url + "/v1/completions", json=body) as r:
                text = await r.text()
                if r.status != 200:
                    res["lost"].append((t0, f"HTTP {r.status} {text[:120]}"))
                else:
                    res["ok"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            res["lost"].append((t0, repr(e)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=5)
    ap.add_argument("--every-s", type=float, default=10.0,
                    help="load time between a replica's recovery and the next kill (s)")
    ap.add_argument("--streamers", type=int, default=16)
    ap.add_argument("--callers", type=int, default=4)
    a = ap.parse_args()
    url, gw, log = start_gateway("faults", f'[[backends]]\nname = "emu"\nmodel = "{MODEL}"\nmode = "emulate"\n'
                                           f'profile = "{PROFILE}"\nreplicas = 2\nmax_model_len = 2048\n'
                                           'extra_args = ["--num-gpu-blocks-override", "1024"]\n')
    wait_healthy(url, gw, timeout_s=300, path="/ready")
    res = {"ok": 0, "lost": [], "cut": [], "other": []}
    kills: list[tuple[float, str]] = []
    recover: list[float] = []

    def pids() -> dict[str, int]:
        return {n: int(p) for n, p in re.findall(r"started (emu/\d) \(pid (\d+)", log.read_text())}

    async def health(s) -> list[str]:
        async with s.get(url + "/health") as r:
            return (await r.json())["models"][MODEL]

    async def run():
        conn = aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)
        async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=300)) as s:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(streamer(i, s, url, stop, res)) for i in range(a.streamers)]
            tasks += [asyncio.create_task(caller(i, s, url, stop, res)) for i in range(a.callers)]
            for k in range(a.kills):
                await asyncio.sleep(a.every_s)
                name = f"emu/{k % 2}"
                pid = pids()[name]
                t_kill = time.monotonic()
                os.killpg(pid, signal.SIGKILL)
                kills.append((t_kill, name))
                while pids()[name] == pid or (await health(s))[k % 2] != "ready":
                    await asyncio.sleep(0.2)
                recover.append(time.monotonic() - t_kill)
                print(f"kill {k + 1}: {name} (pid {pid}) ready again after {recover[-1]:.1f} s", flush=True)
            await asyncio.sleep(a.every_s)
            stop.set()
            await asyncio.gather(*tasks)
    asyncio.run(run())
    pgids = {int(p) for p in re.findall(r"started \S+ \(pid (\d+)", log.read_text())}
    os.kill(gw.pid, signal.SIGKILL)
    t0 = time.monotonic()
    while group_members(pgids) and time.monotonic() - t0 < 5:
        time.sleep(0.05)
    left = group_members(pgids)
    gone_after = time.monotonic() - t0
    gw.stop(grace_s=1)
    delays = []
    for t_err, _ in res["cut"]:
        before = [t for t, _ in kills if t <= t_err]
        delays.append(t_err - max(before) if before else float("nan"))
    print(f"requests completed: {res['ok']}; lost before the first byte: {len(res['lost'])}; streams cut with an SSE "
          f"error event: {len(res['cut'])}; other failures: {len(res['other'])}")
    for _, e in (res["lost"] + res["other"])[:5]:
        print("  failure:", e)
    if delays:
        print(f"error event after the kill: median {np.median(delays) * 1000:.0f} ms, max {max(delays) * 1000:.0f} ms "
              f"({sum(d <= 1.0 for d in delays)}/{len(delays)} within 1 s)")
    print(f"replica ready again after a kill: {', '.join(f'{r:.1f}' for r in recover)} s")
    print(f"gateway SIGKILLed: {len(left)} vLLM processes left after {gone_after:.1f} s "
          f"(of {len(pgids)} replica process groups started)")


if __name__ == "__main__":
    main()
