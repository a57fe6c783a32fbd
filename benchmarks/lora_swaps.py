"""LoRA in emulate mode: four adapters, traffic over all of them, and vLLM's ``--max-loras`` batching.

    python benchmarks/lora_swaps.py                     # max_loras 2 against 4, 160 requests at 8 req/s

One emulated H100 Llama-3.1-8B server (bundled profile ``h100-sxm_llama-3.1-8b``) per setting, with
``--enable-lora --max-lora-rank 16`` and four adapters ``a0..a3`` given by ``--lora-modules`` (each a
directory with an ``adapter_config.json`` only: emulate mode needs no weights). The same open-loop load
(Poisson arrivals at ``--rate``, seed ``--seed``; each request names a random adapter, a 64-512-word
prompt and 32-256 output tokens with ``ignore_eos``) is sent, streamed, to a server with
``--max-loras 2`` and then to one with ``--max-loras 4``. A scraper reads ``vllm:lora_requests_info``
(vLLM's scheduler: running and waiting adapters, max_lora) from ``/metrics`` every 50 ms.

Printed (and written to ``--out``/lora_swaps.md): per setting the distinct adapter sets seen, the swaps
(changes of the set between scrapes), the most adapters in flight at once, and TTFT / E2EL / output
throughput. What vLLM 0.32's gauge lists: its ``running_lora_adapters`` and ``waiting_lora_adapters``
labels both name every adapter with a request the engine has started and not finished
(``LoRARequestStates.update_scheduler_stats`` fills both dicts with the same keys, counts aside), so the
set is "adapters in flight"; a request whose adapter has no slot never starts, and its adapter is absent.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import random
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from _common import ROOT, emulated_server


MODEL = "llama-3.1-8b"
PROFILE = "h100-sxm_llama-3.1-8b"
WORDS = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone cloud".split()


def adapters(root: Path) -> dict[str, Path]:
    """Four weightless adapters (rank 8 or 16) under ``root``."""
    out = {}
    for i, rank in enumerate((8, 8, 16, 8)):
        d = root / f"a{i}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "base_model_name_or_path": MODEL}))
        out[f"a{i}"] = d
    return out


def _names(labels: dict[str, str], key: str) -> frozenset:
    """The adapter names in one comma-separated label of ``vllm:lora_requests_info``."""
    return frozenset(x for x in labels.get(key, "").strip('"').split(",") if x)


def stream_one(url: str, payload: dict) -> tuple[float, float, int]:
    """(TTFT s, E2EL s, output tokens) of one streamed completion."""
    t0 = time.perf_counter()
    ttft, n = None, 0
    with httpx.stream("POST", url + "/v1/completions", json=payload, timeout=600) as r:
        r.raise_for_status()
        for ln in r.iter_lines():
            if not ln.startswith("data: ") or ln == "data: [DONE]":
                continue
            ev = json.loads(ln[6:])
            if ev.get("choices") and ev["choices"][0].get("text"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
            if ev.get("usage"):
                n = ev["usage"]["completion_tokens"]
    return ttft or 0.0, time.perf_counter() - t0, n


def run(max_loras: int, ads: dict[str, Path], out: Path, a) -> dict:
    flags = ["--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", "16",
             "--lora-modules", *[f"{n}={p}" for n, p in ads.items()]]
    scrapes: list[tuple[frozenset, frozenset]] = []
    stop = threading.Event()

    def scrape(url: str) -> None:
        with httpx.Client(timeout=10) as c:
            while not stop.is_set():
                # vLLM sets the gauge to the current time under the label set of the moment; earlier label
                # sets stay in the exposition with older times, so the newest line is the current state
                lines = [ln for ln in c.get(url + "/metrics").text.splitlines()
                         if ln.startswith("vllm:lora_requests_info{")]
                if lines:
                    ln = max(lines, key=lambda x: float(x.rsplit(" ", 1)[1]))
                    lab = dict(kv.split("=", 1) for kv in ln[ln.index("{") + 1:ln.rindex("}")].split('",'))
                    scrapes.append((_names(lab, "running_lora_adapters"), _names(lab, "waiting_lora_adapters")))
                time.sleep(0.05)

    with emulated_server(flags, profile=PROFILE, model=MODEL, name=f"lora-{max_loras}", max_model_len=8192,
                         log_file=out / f"max_loras_{max_loras}.log", timeout_s=600) as (url, _):
        try:
            rng = random.Random(a.seed)
            plan, t = [], 0.0
            for _ in range(a.num_prompts):
                t += rng.expovariate(a.rate)
                prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(64, 512)))
                plan.append((t, {"model": f"a{rng.randrange(4)}", "prompt": prompt, "max_tokens": rng.randint(32, 256),
                                 "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}))
            watcher = threading.Thread(target=scrape, args=(url,), daemon=True)
            watcher.start()
            t0 = time.perf_counter()
            with cf.ThreadPoolExecutor(256) as ex:
                futs = []
                for at, payload in plan:
                    time.sleep(max(0.0, t0 + at - time.perf_counter()))
                    futs.append(ex.submit(stream_one, url, payload))
                res = [f.result() for f in futs]
            dur = time.perf_counter() - t0
            stop.set()
            watcher.join()
        finally:
            stop.set()
    ttft = np.array([r[0] for r in res]) * 1000
    e2el = np.array([r[1] for r in res]) * 1000
    running = [s[0] for s in scrapes]
    swaps = sum(1 for x, y in zip(running, running[1:]) if x != y and y)
    return {"max_loras": max_loras, "requests": len(res), "output_tokens": int(sum(r[2] for r in res)),
            "output_throughput": sum(r[2] for r in res) / dur,
            "ttft_mean_ms": float(ttft.mean()), "ttft_p99_ms": float(np.percentile(ttft, 99)),
            "e2el_mean_ms": float(e2el.mean()), "e2el_p99_ms": float(np.percentile(e2el, 99)),
            "scrapes": len(scrapes), "distinct_running_sets": len({r for r in running if r}),
            "swaps": swaps, "max_running": max((len(r) for r in running), default=0),
            "adapters_seen_running": sorted(set().union(*running)) if running else []}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s (Poisson)")
    ap.add_argument("--num-prompts", type=int, default=160)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ROOT / "runs" / "lora-swaps"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ads = adapters(out / "adapters")
    rows = [run(m, ads, out, a) for m in (2, 4)]
    (out / "lora_swaps.json").write_text(json.dumps(rows, indent=1))
    lines = [f"# LoRA batching, emulated H100 Llama-3.1-8B, 4 adapters, {a.num_prompts} requests at {a.rate:g} req/s "
             f"(seed {a.seed})", "",
             "| max_loras | most adapters in flight at once | adapter sets seen | swaps | scrapes | "
             "TTFT mean / p99 ms | E2EL mean / p99 ms | output tok/s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['max_loras']} | {r['max_running']} | {r['distinct_running_sets']} | {r['swaps']} | "
                     f"{r['scrapes']} | {r['ttft_mean_ms']:.1f} / {r['ttft_p99_ms']:.1f} | "
                     f"{r['e2el_mean_ms']:.0f} / {r['e2el_p99_ms']:.0f} | {r['output_throughput']:.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "lora_swaps.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
