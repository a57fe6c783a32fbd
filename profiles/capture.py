"""Capture: run a real vLLM with the ProfilingExecutor, sweep the load grid, build a profile.

The sweep has two phases, both over the completions API with ``ignore_eos``:

1. **grid**: for each concurrency C (1, 2, 4, ... up to ``max_concurrency``)
   and prompt length L (16, 64, 256, 1024 tokens, with C*L within
   ``token_budget``), C requests of L random *token ids* (unique, so the
   prefix cache never hits) are sent together and decode ``grid_output``
   tokens. This fills the (scheduled tokens x running requests) grid for
   prefill-containing and decode-only steps at several context lengths.
2. **workload**: ShareGPT requests (``loadtests.dataset``, seed
   ``capture_seed`` — validation uses other seeds, so no request is both
   captured and validated) at a Poisson ``rate``, each decoding its dataset
   completion length, *streamed* as clients do: the mixed prefill/decode
   steps of real serving, under the API server's real per-token load.

Output lengths: a dummy-weights model's EOS timing is meaningless, so when
fewer than 100 requests end naturally the profile records the tokenized
ShareGPT completion lengths instead (``meta.output_lengths_source``).
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from gateway.config import BackendConfig
from gateway.launch import ServerProcess, free_port, vllm_command, wait_healthy
from profiles.build import build_profile
from profiles.format import Profile


@dataclass
class SweepPlan:
    """What the capture sends. Counts are requests, lengths tokens, rate requests/s."""

    concurrency: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    prompt_lens: list[int] = field(default_factory=lambda: [16, 64, 256, 1024])
    token_budget: int = 16384
    grid_output: int = 24
    repeats: int = 1
    workload_requests: int = 200
    workload_rate: float = 1.0
    capture_seed: int = 1000

    def grid(self) -> list[tuple[int, int]]:
        return [(c, l) for _ in range(self.repeats) for c in self.concurrency for l in self.prompt_lens
                if c * l <= self.token_budget]


async def _post(client: httpx.AsyncClient, model: str, prompt, max_tokens: int, stream: bool = False) -> None:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}
    if not stream:
        r = await client.post("/v1/completions", json=body)
        r.raise_for_status()
        return
    # streamed like real clients: the API server's per-token SSE work shares the
    # host with the engine, and on a small CPU host that shows in the step times
    async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        async for _ in r.aiter_raw():
            pass


async def run_sweep(base_url: str, model: str, plan: SweepPlan, tokenizer_dir: str | None,
                    vocab_lo: int = 1000, vocab_hi: int = 100000, progress=None) -> list[int]:
    """Drive the two phases against ``base_url``; returns the workload's dataset output lengths."""
    rng = random.Random(plan.capture_seed)
    grid = plan.grid()
    sample = []
    if plan.workload_requests and tokenizer_dir:
        from loadtests.arrivals import arrival_times
        from loadtests.dataset import get_tokenizer, sample_sharegpt
        tok = get_tokenizer(tokenizer_dir)
        sample = sample_sharegpt(tok, plan.workload_requests, seed=plan.capture_seed)
    total = len(grid) + len(sample)
    task = progress.add_task("capture sweep", total=total) if progress else None
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
    async with httpx.AsyncClient(base_url=base_url, timeout=3600, limits=limits) as client:
        # warm-up (JIT compilation of new shapes, allocator, caches): its steps are
        # dropped by build_profile's warmup_steps
        for c, l in [(4, 512), (1, 64), (8, 128), (2, 1024)]:
            await asyncio.gather(*(_post(client, model, [rng.randrange(vocab_lo, vocab_hi) for _ in range(l)], 48)
                                   for _ in range(c)))
        for c, l in grid:
            prompts = [[rng.randrange(vocab_lo, vocab_hi) for _ in range(l)] for _ in range(c)]
            await asyncio.gather(*(_post(client, model, p, plan.grid_output) for p in prompts))
            if progress:
                progress.update(task, advance=1, description=f"grid C={c} L={l}")
        if sample:
            times = arrival_times(len(sample), plan.workload_rate, 1.0, seed=plan.capture_seed)
            t0 = time.perf_counter()

            async def one(req, at):
                await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
                await _post(client, model, req.prompt, req.expected_output_len, stream=True)
                if progress:
                    progress.update(task, advance=1, description="ShareGPT workload")

            await asyncio.gather(*(one(r, t) for r, t in zip(sample, times)))
    return [r.expected_output_len for r in sample]


def capture(backend: BackendConfig, out: str | Path, plan: SweepPlan, trace: str | Path | None = None,
            warmup_steps: int = 200, log_file: str | Path | None = None) -> Profile:
    """Start ``backend`` (mode real) with the ProfilingExecutor, sweep, stop it, build and save.

    Raises:
        ValueError: the backend is not in real mode.
        RuntimeError/TimeoutError: the server did not come up.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    if backend.mode != "real":
        raise ValueError(f"capture needs a real backend; {backend.name!r} has mode = {backend.mode!r}")
    out = Path(out)
    trace = Path(trace or out.with_suffix(".trace.jsonl"))
    trace.unlink(missing_ok=True)
    b = backend.model_copy(update={"capture_trace": str(trace), "replicas": 1, "ports": None})
    port = free_port()
    argv, env = vllm_command(b, port)
    quiet = open(os.devnull, "w") if log_file else None  # server log goes to log_file only
    proc = ServerProcess(f"capture/{b.name}", argv, env, log=quiet, log_file=log_file)
    print(f"[capture] starting real vLLM for {b.name} on port {port} (trace: {trace})")
    proc.start()
    try:
        waited = wait_healthy(f"http://127.0.0.1:{port}", proc)
        print(f"[capture] server healthy after {waited:.0f} s; sweeping")
        from gateway.launch import resolve_model
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn()) as progress:
            lens = asyncio.run(run_sweep(f"http://127.0.0.1:{port}", b.model_name, plan,
                                         resolve_model(b.model), progress=progress))
    finally:
        proc.stop(grace_s=60)
    prof = build_profile([trace], warmup_steps=warmup_steps, output_lengths=lens or None,
                         meta={"capture": {"plan": plan.__dict__, "backend": b.model_dump()}})
    prof.save(out)
    print(f"[capture] {prof.num_steps} steps -> {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return prof
