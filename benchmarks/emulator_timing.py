"""Emulator timing: how late do emulated steps end vs their scheduled end?

Starts an emulated server (fixed 20 ms step, so steps chain back to back),
drives N concurrent streaming requests (default 256, ignore_eos, 256 output
tokens each), stops the server, and reads the lateness of every step's
Future that the executor logs at shutdown (EMUGATE_TIMING_LOG), split in two:
the timer's own lateness (the engine was waiting; result ready how long after
the scheduled end) and the engine's (it asked for the result only after the
step had ended, because it was busy scheduling / processing outputs). Prints
p50/p99/max in ms.

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
                # raw chunks, no per-line parsing: keep the client's CPU off the cores the emulator needs
                async for chunk in r.content.iter_any():
                    got += chunk.count(b"\n\n")
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
    rows = [line.split() for line in log.read_text().splitlines() if line.strip()]
    timer = [float(v) / 1000 for k, v in rows if k == "timer"]
    consumer = [float(v) / 1000 for k, v in rows if k == "consumer"]
    print(f"{a.concurrency} concurrent streams x {a.tokens} tokens, step {a.step_ms} ms: "
          f"{len(rows)} steps in {wall:.1f} s ({lines} SSE events)")
    print(f"timer: result ready after the step's scheduled end, engine already waiting "
          f"({len(timer)} steps), ms: p50 {pct(timer, 50):.3f}  p99 {pct(timer, 99):.3f}  max {max(timer or [0]):.3f}")
    print(f"engine busy past the step's end ({len(consumer)} steps), ms: p50 {pct(consumer, 50):.3f}  "
          f"p99 {pct(consumer, 99):.3f}  max {max(consumer or [0]):.3f}")


if __name__ == "__main__":
    main()
