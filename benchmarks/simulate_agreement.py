"""Does virtual time agree with real time? ``emugate simulate`` against the real-time emulated server.

    python benchmarks/simulate_agreement.py --rates 4,12,24,32 --num-prompts 400 --runs 2 \\
        --extra-args "--max-num-seqs 48 --num-gpu-blocks-override 800 --max-model-len 4096"

Per rate: ``--runs`` real-time runs (each a fresh emulated vLLM OpenAI server: the same profile,
seed and engine arguments, its emulated executor recording every step; driven by the Locust
ShareGPT workload, chat, ``ignore_eos``), then the same workload and seed in ``emugate simulate``.
Prints, per rate and metric, the real runs, the simulated run, the simulated run's difference from
the real runs' mean (%), and the real runs' own spread (max - min over their mean, %): means of
TTFT, TPOT, ITL and E2EL, output throughput, steps and preemptions.

What virtual time leaves out is the API server and client path (HTTP, chat template and
tokenization in the API server, ZMQ, detokenization, SSE). It is measured here from vLLM's own
histograms of the same real runs: vLLM's TTFT (from the request's arrival in the API server to its
first token in the output processor) and the engine's queue and prefill times, beside the client's
TTFT; the "outside the engine" column is client TTFT minus (queue + prefill).

The default engine arguments cap the batch and the KV pool so that the knee (and preemption) falls
at rates this host emulates in real time; the simulation is run with the same arguments.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import sys
import time
from pathlib import Path

import httpx

from _common import ROOT

from gateway.launch import ServerProcess, free_port, wait_healthy
from profiles.assets import resolve_model_dir, resolve_profile

METRICS = [("mean_ttft_ms", "TTFT"), ("mean_tpot_ms", "TPOT"), ("mean_itl_ms", "ITL"), ("mean_e2el_ms", "E2EL"),
           ("output_throughput", "output tok/s"), ("steps", "steps"), ("preemptions", "preemptions")]
HISTOGRAMS = ("vllm:time_to_first_token_seconds", "vllm:request_queue_time_seconds",
              "vllm:request_prefill_time_seconds", "vllm:e2e_request_latency_seconds")


def scrape(url: str) -> dict[str, float]:
    """Sums and counts of vLLM's request histograms (``name_sum``/``name_count``) from /metrics."""
    text = httpx.get(url + "/metrics", timeout=10).text
    out: dict[str, float] = {}
    for h in HISTOGRAMS:
        for suffix in ("_sum", "_count"):
            m = re.search(rf"^{re.escape(h + suffix)}(?:{{[^}}]*}})? ([0-9.eE+-]+)$", text, re.M)
            out[h + suffix] = float(m.group(1)) if m else float("nan")
    return out


def hist_means(before: dict, after: dict) -> dict[str, float]:
    """Mean (ms) of each histogram over the run (delta sums over delta counts)."""
    res = {}
    for h in HISTOGRAMS:
        n = after[h + "_count"] - before[h + "_count"]
        res[h] = (after[h + "_sum"] - before[h + "_sum"]) / n * 1000 if n > 0 else float("nan")
    return res


def real_run(args, rate: float, run: int, out_dir: Path) -> dict:
    """One real-time run on a fresh emulated server; returns its result JSON plus engine figures."""
    from emugate.engine_trace import engine_figures
    from loadtests.runner import run_locust
    from profiles.build import read_trace_columns
    trace = out_dir / f"r{rate:g}-real{run}.steps.jsonl"
    trace.unlink(missing_ok=True)
    port = free_port()
    model_dir = resolve_model_dir(args.model)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", args.model, "--host", "127.0.0.1", "--port", str(port),
            "--distributed-executor-backend", "emu_executor.profiling.EmulatedProfilingExecutor",
            *shlex.split(args.extra_args)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMUGATE_")}
    env.update(HF_HUB_OFFLINE="1", EMUGATE_PROFILE=str(resolve_profile(args.profile)), EMUGATE_SEED=str(args.seed),
               EMUGATE_TRACE=str(trace))
    proc = ServerProcess(f"agree-{rate:g}-{run}", argv, env, log=open(os.devnull, "w"),
                         log_file=out_dir / f"r{rate:g}-real{run}.server.log")
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600)
        before = scrape(url)
        doc = run_locust(url, args.model, out_dir / f"r{rate:g}-real{run}.json", rate=rate,
                         num_prompts=args.num_prompts, seed=args.seed, tokenizer=str(model_dir), ignore_eos=True)
        doc["vllm_hist_ms"] = hist_means(before, scrape(url))
    finally:
        proc.stop(grace_s=15)
    time.sleep(0.5)
    _, cols, _ = read_trace_columns(trace)
    eng = engine_figures(cols)
    doc["steps"], doc["preemptions"] = eng["steps"], eng["preemptions"]
    return doc


def sim_run(fleet, args, rate: float, out_dir: Path) -> dict:
    """The same workload and seed in virtual time."""
    from emugate.simulate import result_doc, sharegpt_workload
    wl = sharegpt_workload(str(resolve_model_dir(args.model)), num_prompts=args.num_prompts, request_rate=rate,
                           seed=args.seed, endpoint="chat", ignore_eos=True)
    run = fleet.run(wl, seed=args.seed)
    doc = result_doc(run, wl, args.model, detailed=False)
    doc["steps"], doc["preemptions"] = doc["num_steps"], doc["num_preemptions"]
    (out_dir / f"r{rate:g}-sim.json").write_text(json.dumps(doc, indent=1))
    return doc


def pct(a: float, b: float) -> float:
    return (a - b) / b * 100 if b else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default="h100-sxm_llama-3.1-8b")
    ap.add_argument("--model", default="llama-3.1-8b")
    ap.add_argument("--rates", default="4,12,24,32", help="comma-separated requests/s")
    ap.add_argument("--num-prompts", type=int, default=400)
    ap.add_argument("--runs", type=int, default=2, help="real-time runs per rate (their spread is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra-args", default="--max-num-seqs 48 --num-gpu-blocks-override 800 --max-model-len 4096",
                    help="vLLM engine arguments of both modes")
    ap.add_argument("--out", default=str(ROOT / "runs" / "simulate-agreement"))
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = [float(r) for r in args.rates.split(",")]

    from emugate.simulate import Fleet, quiet_vllm
    from emugate.simulate_cli import build_parser, fleet_config, prepare_env
    quiet_vllm()
    cfg = fleet_config(build_parser().parse_args(["--profile", args.profile, "--model", args.model]))
    prepare_env(cfg)
    fleet = Fleet(cfg, extra_args=shlex.split(args.extra_args))
    rows = []
    for rate in rates:
        sim = sim_run(fleet, args, rate, out_dir)
        reals = [real_run(args, rate, i + 1, out_dir) for i in range(args.runs)]
        rows.append({"rate": rate, "sim": sim, "real": reals})
        print(f"rate {rate:g}: sim TTFT {sim['mean_ttft_ms']:.1f} ms, TPOT {sim['mean_tpot_ms']:.2f}; real "
              + "; ".join(f"TTFT {r['mean_ttft_ms']:.1f} TPOT {r['mean_tpot_ms']:.2f}" for r in reals)
              + f" (sim {sim['sim_speedup']:.0f}x real time)", flush=True)
    fleet.shutdown()

    lines = [f"# simulate vs real-time emulation: {args.profile}, {args.num_prompts} ShareGPT chat requests "
             f"(ignore_eos) per run, seed {args.seed}, engine args `{args.extra_args}`", "",
             "Each cell: simulated value, its difference from the mean of the real-time runs, and in brackets the "
             "real-time runs' own spread (max - min over their mean).", "",
             "| rate (req/s) | " + " | ".join(label for _, label in METRICS) + " |",
             "|---:|" + "---:|" * len(METRICS)]
    for row in rows:
        cells = []
        for key, _ in METRICS:
            vals = [r[key] for r in row["real"]]
            mean = statistics.mean(vals)
            spread = (max(vals) - min(vals)) / mean * 100 if mean else 0.0
            s = row["sim"][key]
            cells.append(f"{s:.4g}: {pct(s, mean):+.1f} % ({spread:.1f} %)")
        lines.append(f"| {row['rate']:g} | " + " | ".join(cells) + " |")
    lines += ["", "Where real-time TTFT goes (means, ms; vLLM's histograms of the same runs):", "",
              "| rate | client TTFT | vLLM TTFT (API server arrival -> first token) | engine queue | engine prefill "
              "| outside the engine (client - queue - prefill) | simulated TTFT |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        for i, r in enumerate(row["real"]):
            h = r["vllm_hist_ms"]
            q, p = h["vllm:request_queue_time_seconds"], h["vllm:request_prefill_time_seconds"]
            lines.append(f"| {row['rate']:g} (run {i + 1}) | {r['mean_ttft_ms']:.1f} | "
                         f"{h['vllm:time_to_first_token_seconds']:.1f} | {q:.1f} | {p:.1f} | "
                         f"{r['mean_ttft_ms'] - q - p:.1f} | {row['sim']['mean_ttft_ms']:.1f} |")
    speed = [row["sim"]["sim_speedup"] for row in rows]
    lines += ["", f"Simulated seconds per wall second: {', '.join(f'{s:.0f}x' for s in speed)}."]
    md = "\n".join(lines) + "\n"
    (out_dir / "agreement.md").write_text(md)
    (out_dir / "agreement.json").write_text(json.dumps(
        {"args": vars(args), "rows": [{"rate": r["rate"], "sim": {k: r["sim"][k] for k, _ in METRICS},
                                       "real": [{**{k: x[k] for k, _ in METRICS}, "vllm_hist_ms": x["vllm_hist_ms"]}
                                                for x in r["real"]]} for r in rows]}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
