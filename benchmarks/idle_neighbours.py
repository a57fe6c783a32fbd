"""Do idle vLLM servers beside a real one slow its steps? (an open lead of the CPU fidelity work)

``validate`` keeps three servers up (two starts of the real backend and the
emulated one) and drives one at a time, while ``capture`` runs the real
backend alone. If an idle neighbour costs the measured server CPU time on a
2-core host, every validation step runs slower than the profile says. (It
does, by 1.0-3.8%; since then ``validate`` pauses the servers it is not
driving: ``gateway.launch.ServerProcess.pause``.)

One real server of ``profiles/fidelity-cpu.toml`` (ProfilingExecutor trace
on) runs the decode probe of ``benchmarks/restart_noise.py`` (C streamed
completions of a 256-token prompt decoding 96 tokens, C in 1, 2, 4, 8, 16)
in three phases on the *same* server start, so start-to-start speed drops
out: alone, then with an idle real and an idle emulated server started
beside it (after they are healthy), then alone again once they are stopped.
Printed: median decode step (ms) per C and phase, and the change with
neighbours against the mean of the two alone phases.

    python benchmarks/idle_neighbours.py --passes 2   # ~5 min
"""
from __future__ import annotations

import asyncio
import contextlib
import random
from pathlib import Path

import numpy as np

from _common import probe_cli

from gateway.launch import started_backend, wait_healthy
from emugate.capture import send_bursts, steps_since, with_trace
from restart_noise import CONCURRENCY, OUTPUT_LEN, PROMPT_LEN, _medians


def probe(url: str, model: str, trace: Path, passes: int, seed0: int) -> dict[int, float]:
    """Median decode step (ms) per C over ``passes`` probe passes (fresh prompts each pass)."""
    cells = [(c, PROMPT_LEN, OUTPUT_LEN) for c in CONCURRENCY]
    n0 = len(steps_since(trace)["latency_us"])
    for p in range(passes):
        asyncio.run(send_bursts(url, model, cells, random.Random(seed0 + p)))
    return _medians(steps_since(trace, n0))


def main() -> None:
    a, out, real_b, emu_b = probe_cli(__doc__, "idle-neighbours", "probe passes per phase")
    b_trace = out / "measured.trace.jsonl"
    b = with_trace(real_b, b_trace)
    res: dict[str, dict[int, float]] = {}
    with started_backend(b, out / "measured.log") as (url, proc):
        wait_healthy(url, proc)
        asyncio.run(send_bursts(url, b.model_name, [(c, PROMPT_LEN, OUTPUT_LEN) for c in CONCURRENCY],
                                random.Random(99)))  # warm-up pass, not measured
        res["alone"] = probe(url, b.model_name, b_trace, a.passes, 0)
        print("alone:           " + "  ".join(f"C={c} {m:.1f}" for c, m in res["alone"].items()), flush=True)
        with contextlib.ExitStack() as stack:
            for name, nb in (("idle-real", real_b), ("idle-emulated", emu_b)):
                u, p = stack.enter_context(started_backend(nb, out / f"{name}.log", name=name))
                wait_healthy(u, p)
            res["with neighbours"] = probe(url, b.model_name, b_trace, a.passes, 100)
            print("with neighbours: " + "  ".join(f"C={c} {m:.1f}" for c, m in res["with neighbours"].items()),
                  flush=True)
        res["alone again"] = probe(url, b.model_name, b_trace, a.passes, 200)
        print("alone again:     " + "  ".join(f"C={c} {m:.1f}" for c, m in res["alone again"].items()), flush=True)
    print("\nchange with idle neighbours vs the mean of the two alone phases, %: " + "  ".join(
        f"C={c} {100 * (res['with neighbours'][c] / np.mean([res['alone'][c], res['alone again'][c]]) - 1):+.1f}"
        for c in CONCURRENCY))


if __name__ == "__main__":
    main()
