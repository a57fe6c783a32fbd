"""How much does a real server's step time change between server starts, vs within one server?

The fidelity check compares an emulator built from one real server process
(the capture) with other real server processes (validation). If the same
step shape runs at a different speed in each process, that spread is part
of the noise floor, and the real-vs-real noise of two runs on *one* server
(what ``validate`` reports beside every error) does not show it.

For each of ``--restarts`` fresh starts of the real backend of
``profiles/fidelity-cpu.toml`` (ProfilingExecutor trace on), after a short
warm-up, ``--passes`` passes of a fixed decode probe run: for each
concurrency C in 1, 2, 4, 8, 16, C streamed completions of a 256-token
random prompt decode 96 tokens together (``ignore_eos``). Prompts are the
same across starts (seeded by pass) and differ between passes (no prefix
cache hits). Printed: the median decode-only step latency (ms) per C, per
start and pass, then the spread between passes of one start and between
starts (max-min over their mean, %).

    python benchmarks/restart_noise.py --restarts 4 --passes 2   # ~6 min
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from pathlib import Path

import numpy as np

from _common import ROOT

from gateway.config import load_config
from gateway.launch import started_backend, wait_healthy
from emugate.capture import send_bursts, steps_since, with_trace

CONCURRENCY = (1, 2, 4, 8, 16)
PROMPT_LEN, OUTPUT_LEN = 256, 96


def _medians(cols: dict[str, np.ndarray]) -> dict[int, float]:
    """Median decode-only step latency (ms) per running-request count in CONCURRENCY."""
    dec = cols["prefill_tokens"] == 0
    return {c: float(np.median(cols["latency_us"][dec & (cols["num_reqs"] == c)]) / 1e3) for c in CONCURRENCY}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "profiles" / "fidelity-cpu.toml"))
    ap.add_argument("--backend", default="cpu-real")
    ap.add_argument("--restarts", type=int, default=4)
    ap.add_argument("--passes", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "runs" / "restart-noise"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    backend = load_config(a.config).backend(a.backend)
    table: list[tuple[int, int, dict[int, float]]] = []
    probe = [(c, PROMPT_LEN, OUTPUT_LEN) for c in CONCURRENCY]  # one pass, in order
    for s in range(a.restarts):
        trace = out / f"start{s}.trace.jsonl"
        b = with_trace(backend, trace)
        t0 = time.perf_counter()
        with started_backend(b, out / f"start{s}.log") as (url, proc):
            wait_healthy(url, proc)
            asyncio.run(send_bursts(url, b.model_name, probe, random.Random(99)))  # warm-up pass, not measured
            for p in range(a.passes):
                n0 = len(steps_since(trace)["latency_us"])
                asyncio.run(send_bursts(url, b.model_name, probe, random.Random(p)))
                table.append((s, p, _medians(steps_since(trace, n0))))
                print(f"start {s} pass {p}: " + "  ".join(f"C={c} {m:.1f}" for c, m in table[-1][2].items())
                      + f"   ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\nmedian decode step (ms) per concurrency C")
    print("start pass | " + " | ".join(f"C={c}" for c in CONCURRENCY))
    for s, p, m in table:
        print(f"{s:5d} {p:4d} | " + " | ".join(f"{m[c]:5.1f}" for c in CONCURRENCY))

    def spread(vals):
        return (max(vals) - min(vals)) / np.mean(vals) * 100
    within = {c: np.mean([spread([m[c] for s2, _, m in table if s2 == s]) for s in range(a.restarts)])
              for c in CONCURRENCY}
    between = {c: spread([np.mean([m[c] for s2, _, m in table if s2 == s]) for s in range(a.restarts)])
               for c in CONCURRENCY}
    print("spread within one start (mean of max-min, %): " + "  ".join(f"C={c} {v:.1f}" for c, v in within.items()))
    print("spread between starts (max-min of start means, %): "
          + "  ".join(f"C={c} {v:.1f}" for c, v in between.items()))


if __name__ == "__main__":
    main()
