"""Emulator timing: how late do emulated steps end vs their scheduled end?

Starts an emulated server (fixed 20 ms step, so steps chain back to back),
drives N concurrent streaming requests (default 256, ignore_eos, 256 output
tokens each), stops the server, and reads the lateness of every step's
Future (actual resolution time - scheduled end) that the executor logs at
shutdown (EMUGATE_TIMING_LOG). Prints p50/p99/max lateness in ms.

    python benchmarks/emulator_timing.py [--concurrency 256] [--step-ms 20]
"""
from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import aiohttp

from _common import MODEL, emulated_server, pct


async def drive(url: str, n: int, tokens: int) -> int:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        async def one(i):
            body = {"model": MODEL, "prompt": f"req {i}", "max_tokens": tokens, "ignore_eos": True, "stream": True}
            got = 0
            async with s.post(url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=900)) as r:
                async for _ in r.content:
                    got += 1
            return got
        return sum(await asyncio.gather(*(one(i) for i in range(n))))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--step-ms", type=float, default=20.0)
    a = ap.parse_args()
    log = Path(tempfile.mkdtemp()) / "lateness.txt"
    with emulated_server(["--max-num-seqs", "1024"], env={"EMUGATE_TIMING_LOG": str(log)},
                         step_ms=a.step_ms, name="bench-timing") as (url, _):
        t0 = time.perf_counter()
        lines = asyncio.run(drive(url, a.concurrency, a.tokens))
        wall = time.perf_counter() - t0
    late_ms = [float(x) / 1000 for x in log.read_text().split()]
    steady = late_ms[20:]  # skip the first steps (server warm-up)
    print(f"{a.concurrency} concurrent streams x {a.tokens} tokens, step {a.step_ms} ms: "
          f"{len(late_ms)} steps in {wall:.1f} s ({lines} SSE lines)")
    print(f"step end lateness (ms): p50 {pct(steady, 50):.3f}  p99 {pct(steady, 99):.3f}  "
          f"p99.9 {pct(steady, 99.9):.3f}  max {max(steady):.3f}")


if __name__ == "__main__":
    main()
