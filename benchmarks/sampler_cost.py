"""What vLLM's sampler costs per step: all-greedy batches vs batches that sample.

vLLM V1's ``Sampler.sample`` (``vllm/v1/sample/sampler.py``) returns the
argmax when every request in the batch is greedy (temperature 0) and
otherwise applies the temperature, a float32 softmax over the vocabulary
and an exponential-race draw to every row of the batch. With a 131k-token
vocabulary that is work per request per step, on the same cores as the
forward pass of a CPU host. Capture's grid used to run greedy only while
the Locust workload (and every validation run) samples at vLLM's default
temperature 1.0, so the profile mixed two costs under one step shape.

One real server of ``profiles/fidelity-cpu.toml`` (ProfilingExecutor trace
on) runs the decode probe of ``benchmarks/restart_noise.py`` (C streamed
completions of a 256-token prompt decoding 96 tokens, C in 1, 2, 4, 8, 16)
in passes that alternate temperature 0 and 1 on the same server start (so
start-to-start speed and drift drop out). Printed: median decode step (ms)
per C and temperature, and the difference per request in the batch.

    python benchmarks/sampler_cost.py --passes 2   # ~5 min
"""
from __future__ import annotations

import asyncio
import random

import numpy as np

from _common import probe_cli

from gateway.launch import started_backend, wait_healthy
from emugate.capture import send_bursts, steps_since, with_trace
from restart_noise import CONCURRENCY, OUTPUT_LEN, PROMPT_LEN


def main() -> None:
    a, out, real_b, _ = probe_cli(__doc__, "sampler-cost", "probe passes per temperature (alternating)")
    trace = out / "sampler.trace.jsonl"
    b = with_trace(real_b, trace)
    cells = [(c, PROMPT_LEN, OUTPUT_LEN) for c in CONCURRENCY]
    lat: dict[float, dict[int, list[float]]] = {t: {c: [] for c in CONCURRENCY} for t in (0.0, 1.0)}
    with started_backend(b, out / "server.log") as (url, proc):
        wait_healthy(url, proc)
        asyncio.run(send_bursts(url, b.model_name, cells, random.Random(99), temperature=1.0))  # warm-up
        n0 = len(steps_since(trace)["latency_us"])
        for p in range(a.passes):
            for t in (0.0, 1.0) if p % 2 == 0 else (1.0, 0.0):
                asyncio.run(send_bursts(url, b.model_name, cells, random.Random(p * 10 + int(t)), temperature=t))
                cols = steps_since(trace, n0)
                n0 += len(cols["latency_us"])
                dec = cols["prefill_tokens"] == 0
                for c in CONCURRENCY:
                    m = dec & (cols["num_reqs"] == c)
                    assert ((cols["random_rows"][m] > 0) == (t > 0)).all(), "trace disagrees on the sampling mode"
                    lat[t][c] += (cols["latency_us"][m] / 1e3).tolist()
                print(f"pass {p + 1}/{a.passes} temperature {t:g} done", flush=True)
    print("\nmedian decode step, ms (steps)")
    print(f"{'C':>4} {'greedy':>14} {'temperature 1':>16} {'difference':>11} {'per request':>12}")
    for c in CONCURRENCY:
        g, r = np.median(lat[0.0][c]), np.median(lat[1.0][c])
        print(f"{c:4d} {g:8.1f} ({len(lat[0.0][c]):3d}) {r:10.1f} ({len(lat[1.0][c]):3d}) {r - g:+10.1f} "
              f"{(r - g) / c:+11.2f}")


if __name__ == "__main__":
    main()
