"""Speculative decoding in emulate mode: accepted tokens as configured and as vLLM counts them, and
TPOT against the same profile without speculation.

    python benchmarks/spec_decode.py                      # n-gram, k = 3, acceptance 0.8,0.6,0.5
    python benchmarks/spec_decode.py --acceptance 0.9,0.8,0.7 --rate 2

Two emulated H100 Llama-3.1-8B servers in turn (bundled profile ``h100-sxm_llama-3.1-8b``): one
plain (with ``--no-async-scheduling`` when the method needs sync scheduling, as n-gram does, so both
run the same scheduling mode), one with ``--speculative-config`` (``--method``, ``--k``) and
``EMUGATE_SPEC_ACCEPTANCE``.
Each serves the same Locust ShareGPT run (``--rate``, ``--num-prompts``, ``--seed``). Printed: the
configured mean accepted drafts per verification step (``sum_i prod_{j<=i} a_j``) against vLLM's
``vllm:spec_decode_num_accepted_tokens_total / vllm:spec_decode_num_drafts_total``, per-position
acceptance, and TPOT / ITL / E2EL / output throughput with and without speculation.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import httpx

from _common import ROOT, emulated_server

from profiles.assets import resolve_model_dir

MODEL = "llama-3.1-8b"
PROFILE = "h100-sxm_llama-3.1-8b"


def metric_sum(text: str, name: str) -> dict[str, float]:
    """{labels: value} of one metric in a Prometheus exposition."""
    out = {}
    for ln in text.splitlines():
        if ln.startswith(name + "{") or ln.startswith(name + " "):
            key, _, val = ln.rpartition(" ")
            out[key[len(name):]] = float(val)
    return out


def run(label: str, out: Path, spec: dict | None, acceptance: str, a) -> dict:
    flags = []
    if spec:
        flags += ["--speculative-config", json.dumps(spec)]
    elif a.method == "ngram":
        flags += ["--no-async-scheduling"]  # vLLM runs n-gram speculation with sync scheduling: compare like with like
    with emulated_server(flags, env={"EMUGATE_SPEC_ACCEPTANCE": acceptance}, profile=PROFILE, model=MODEL,
                         name=f"spec-{label}", max_model_len=8192, log_file=out / f"{label}.log",
                         timeout_s=600) as (url, _):
        res = out / f"{label}.json"
        p = subprocess.run([sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless",
                            "-H", url, "--model", MODEL, "--request-rate", str(a.rate), "--num-prompts",
                            str(a.num_prompts), "--seed", str(a.seed), "--result-json", str(res), "--only-summary",
                            "--loglevel", "WARNING", "--tokenizer", str(resolve_model_dir(MODEL))],
                           capture_output=True, text=True)
        if p.returncode != 0:
            raise SystemExit(f"load run failed:\n{p.stderr[-2000:]}")
        d = json.loads(res.read_text())
        d["metrics"] = httpx.get(url + "/metrics", timeout=30).text
        return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", default="ngram")
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--acceptance", default="0.8,0.6,0.5")
    ap.add_argument("--rate", type=float, default=4.0)
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "spec-decode"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {"method": a.method, "num_speculative_tokens": a.k}
    if a.method == "ngram":
        spec.update(prompt_lookup_max=4, prompt_lookup_min=2)
    plain = run("plain", out, None, a.acceptance, a)
    sd = run("spec", out, spec, a.acceptance, a)
    rates = [float(x) for x in a.acceptance.split(",")]
    rate = lambda i: rates[min(i, len(rates) - 1)]  # noqa: E731
    exp, p = 0.0, 1.0
    for i in range(a.k):
        p *= rate(i)
        exp += p
    m = sd["metrics"]
    drafts = sum(metric_sum(m, "vllm:spec_decode_num_drafts_total").values())
    acc = sum(metric_sum(m, "vllm:spec_decode_num_accepted_tokens_total").values())
    pos = [v for _, v in sorted(metric_sum(m, "vllm:spec_decode_num_accepted_tokens_per_pos_total").items())]
    lines = [f"# Speculative decoding ({a.method}, k={a.k}, acceptance {a.acceptance}), emulated H100 Llama-3.1-8B, "
             f"ShareGPT {a.num_prompts} requests at {a.rate:g} req/s", "",
             f"mean accepted drafts per verification step: configured {exp:.3f}, measured {acc / max(drafts, 1):.3f} "
             f"({acc:.0f} accepted / {drafts:.0f} drafts)",
             "per-position acceptance (conditional): configured " + ", ".join(f"{rate(i):.2f}" for i in range(a.k))
             + "; measured " + ", ".join(f"{(pos[i] / (pos[i - 1] if i else drafts)):.3f}" for i in range(len(pos))),
             "", "| | without | with speculation | change |", "|---|---:|---:|---:|"]
    for key, name in (("mean_tpot_ms", "mean TPOT (ms)"), ("median_tpot_ms", "median TPOT (ms)"),
                      ("mean_itl_ms", "mean ITL (ms)"), ("mean_ttft_ms", "mean TTFT (ms)"),
                      ("mean_e2el_ms", "mean E2EL (ms)"), ("output_throughput", "output throughput (tok/s)")):
        x, y = plain[key], sd[key]
        lines.append(f"| {name} | {x:.2f} | {y:.2f} | {(y - x) / x * 100:+.1f} % |")
    md = "\n".join(lines) + "\n"
    (out / "spec_decode.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
