"""Locust workload vs ``vllm bench serve`` on the same schedule and endpoint.

Starts an emulated server (bundled profile) unless ``--url`` is given, runs
``locust -f loadtests/sharegpt.py --headless`` and then ``vllm bench serve``
(from Python: FlexibleArgumentParser + vllm.benchmarks.serve, since the CPU
wheel has no ``vllm`` console script) with the same dataset file (the
repaired ShareGPT copy), seed, rate, prompts and ignore_eos, and prints both
tables and the % difference per metric.

    python benchmarks/locust_vs_vllm_bench.py [--rate 2] [--num-prompts 80]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
from pathlib import Path

from _common import MODEL, ROOT, emulated_server, resolve_model_dir

from loadtests.runner import run_locust as _run_locust

KEYS = ["completed", "total_output_tokens", "mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms",
        "median_ttft_ms", "p99_itl_ms", "output_throughput"]


def run_vllm_bench(url: str, out: Path, a) -> dict:
    from loadtests.dataset import repaired_sharegpt_path
    code = f"""
import sys
from vllm.utils.argparse_utils import FlexibleArgumentParser
from vllm.benchmarks import serve
p = FlexibleArgumentParser(); serve.add_cli_args(p)
args = p.parse_args({[
        "--backend", "openai-chat", "--base-url", url, "--endpoint", "/v1/chat/completions", "--model", MODEL,
        "--tokenizer", str(resolve_model_dir(MODEL)), "--tokenizer-mode", "mistral",
        "--dataset-name", "sharegpt", "--dataset-path", str(repaired_sharegpt_path()),
        "--num-prompts", str(a.num_prompts), "--request-rate", str(a.rate), "--seed", str(a.seed),
        "--ignore-eos", "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
        "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99", "--disable-tqdm"]!r})
serve.main(args)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1",
                       **__import__("os").environ})
    if p.returncode != 0:
        raise SystemExit(f"vllm bench serve failed:\n{p.stderr[-3000:]}")
    return json.loads(out.read_text())


def run_locust(url: str, out: Path, a) -> dict:
    return _run_locust(url, MODEL, out, rate=a.rate, num_prompts=a.num_prompts, seed=a.seed)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default=None, help="endpoint (default: start an emulated server)")
    ap.add_argument("--rate", type=float, default=2.0)
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "locust-vs-vllm"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = contextlib.nullcontext((a.url, None)) if a.url else emulated_server(name="bench-lvb")
    with ctx as (url, _):
        run_locust(url, out / "warmup.json", argparse.Namespace(**{**vars(a), "num_prompts": 10, "seed": 99}))
        lo = run_locust(url, out / "locust.json", a)
        vb = run_vllm_bench(url, out / "vllm_bench.json", a)
    print(f"{'metric':<24} {'locust':>12} {'vllm bench':>12} {'diff':>8}")
    for k in KEYS:
        d = (lo[k] - vb[k]) / vb[k] * 100 if vb[k] else float("nan")
        print(f"{k:<24} {lo[k]:>12.2f} {vb[k]:>12.2f} {d:>+7.2f}%")
    print(f"locust send lag p99: {lo.get('send_lag_ms_p99', float('nan')):.2f} ms")


if __name__ == "__main__":
    main()
