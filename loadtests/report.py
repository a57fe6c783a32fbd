"""End-of-run reports: vLLM-format JSON and a PNG (latency CDFs, throughput over time)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from loadtests.metrics import METRIC_NAMES, RequestResult


def write_json(doc: dict, path: str | Path) -> Path:
    """Write atomically (temp + rename): a crashed run leaves no half-written report."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(p)
    return p


def summary_table(m: dict, percentiles: list[float]) -> str:
    """A text table like vLLM's benchmark printout."""
    lines = [f"{'Successful requests:':<40} {m['completed']}", f"{'Failed requests:':<40} {m['failed']}",
             f"{'Benchmark duration (s):':<40} {m['duration']:.2f}",
             f"{'Total input tokens:':<40} {m['total_input_tokens']}",
             f"{'Total generated tokens:':<40} {m['total_output_tokens']}",
             f"{'Request throughput (req/s):':<40} {m['request_throughput']:.2f}",
             f"{'Output token throughput (tok/s):':<40} {m['output_throughput']:.2f}"]
    if m.get("request_goodput") is not None:
        lines.append(f"{'Request goodput (req/s):':<40} {m['request_goodput']:.2f}")
    for key, name in METRIC_NAMES.items():
        lines.append(f"{'Mean ' + name + ' (ms):':<40} {m[f'mean_{key}_ms']:.2f}")
        lines.append(f"{'Median ' + name + ' (ms):':<40} {m[f'median_{key}_ms']:.2f}")
        for p in percentiles:
            pw = str(int(p)) if int(p) == p else str(p)
            lines.append(f"{'P' + pw + ' ' + name + ' (ms):':<40} {m[f'p{pw}_{key}_ms']:.2f}")
    return "\n".join(lines)


def write_png(results: list[RequestResult], path: str | Path, title: str = "") -> Path:
    """Four latency CDFs (TTFT, TPOT, ITL, E2EL; ms) and output tokens/s per second."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ok = [r for r in results if r.success]
    series = {
        "TTFT": [r.ttft * 1000 for r in ok],
        "TPOT": [(r.latency - r.ttft) / (r.output_tokens - 1) * 1000 for r in ok if r.output_tokens > 1],
        "ITL": [g * 1000 for r in ok for g in r.itl],
        "E2EL": [r.latency * 1000 for r in ok],
    }
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for ax, (name, vals) in zip(axes, series.items()):
        if vals:
            v = np.sort(vals)
            ax.plot(v, np.arange(1, len(v) + 1) / len(v))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("CDF")
        ax.grid(alpha=0.3)
        ax.set_title(name)
    ax = axes[4]
    if ok:
        t0 = min(r.start_time for r in ok)
        times = []
        for r in ok:
            t = r.start_time + r.ttft
            times.append(t)
            for g in r.itl:
                t += g
                times.append(t)
        n = int(np.ceil(max(times) - t0)) + 1
        counts = np.bincount(np.array([int(t - t0) for t in times]), minlength=n)
        ax.plot(np.arange(len(counts)), counts)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("throughput over time")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    p = Path(path)
    fig.savefig(p, dpi=90)
    plt.close(fig)
    return p
