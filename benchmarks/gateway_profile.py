"""Where the gateway's CPU goes per request: py-spy samples of the gateway process under load.

Same set-up as ``gateway_overhead.py`` (an emulated vLLM at a fixed step, the gateway attached
with ``--no-launch``), driven at ``--rate`` req/s of non-streaming chat (max_tokens=1) through
the gateway only, while ``py-spy record --nonblocking`` samples the gateway for ``--seconds``.
Prints the gateway's CPU time per request (from ``/proc/PID/stat``) and the functions with the
most samples, by self time and inclusive time, as % of the samples in which the process ran
(idle samples excluded).

    python benchmarks/gateway_profile.py [--rate 200] [--seconds 20] [--top 25]

Needs ``py-spy`` (``pip install py-spy``).
"""
from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp

from _common import MODEL, PROFILE, ServerProcess, emulated_server, free_port, wait_healthy


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def drive(url: str, rate: float, seconds: float) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    rng = random.Random(5)
    done = 0

    async def one(s):
        nonlocal done
        async with s.post(url + "/v1/chat/completions", json=body) as r:
            await r.read()
            done += r.status == 200

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=3.0)) as s:
        tasks, t = [], time.perf_counter()
        end = t + seconds
        while t < end:
            t += rng.expovariate(rate)
            await asyncio.sleep(max(0.0, t - time.perf_counter()))
            tasks.append(asyncio.create_task(one(s)))
        await asyncio.gather(*tasks)
    return done


def summarize(raw: Path, top: int) -> None:
    """Aggregate py-spy's raw (collapsed) stacks: self and inclusive samples per function."""
    self_, incl, total = Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        n = int(n)
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")[1:]]
        if not frames:
            continue
        total += n
        self_[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"{total} samples with the gateway on a CPU")
    for title, c in (("self", self_), ("inclusive", incl)):
        print(f"  top {top} by {title} time:")
        for f, n in c.most_common(top):
            print(f"    {n / total * 100:5.1f}%  {f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--step-ms", type=float, default=5.0)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    if not shutil.which("py-spy"):
        sys.exit("py-spy is not installed: pip install py-spy")
    with emulated_server(step_ms=a.step_ms, name="bench-gw-backend") as (direct, _):
        port = int(direct.rsplit(":", 1)[1])
        gport = free_port()
        tmp = Path(tempfile.mkdtemp())
        cfg = tmp / "gw.toml"
        cfg.write_text(f'[gateway]\nport = {gport}\n[[backends]]\nname = "emu"\nmodel = "{MODEL}"\n'
                       f'mode = "emulate"\nprofile = "{PROFILE}"\nports = [{port}]\n')
        gw = ServerProcess("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg), "--no-launch",
                                       "--log-level", "warning"], dict(os.environ), log=open(os.devnull, "w"))
        gw.start()
        try:
            url = f"http://127.0.0.1:{gport}"
            wait_healthy(url, gw, timeout_s=60, path="/ready")
            asyncio.run(drive(url, 50.0, 3.0))  # warm-up
            raw = tmp / "gateway.raw"
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(gw.pid), "--duration", str(int(a.seconds)),
                                    "--rate", "1000", "--nonblocking", "--format", "raw", "-o", str(raw)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            c0 = cpu_s(gw.pid)
            n = asyncio.run(drive(url, a.rate, a.seconds))
            c1 = cpu_s(gw.pid)
            spy.wait(60)
        finally:
            gw.stop()
    print(f"{n} requests at {a.rate:g} req/s through the gateway: gateway CPU {(c1 - c0) / max(n, 1) * 1e3:.3f} ms "
          f"per request ({(c1 - c0) / a.seconds * 100:.0f}% of one core)")
    summarize(raw, a.top)


if __name__ == "__main__":
    main()
