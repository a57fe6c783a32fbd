"""What the engine did during a load run, from its step trace: the engine-side figures of ``validate``.

A backend with ``capture_trace`` records one row per step (real:
``emu_executor.ProfilingExecutor``; emulated: ``EmulatedProfilingExecutor``):
the oracle's step features, the service time and the host gap, and the
engine columns of ``emu_executor.profiling.ENGINE_FIELDS`` (submit time,
preemptions, resumed requests, recomputed and prefix-cached tokens).
:func:`engine_figures` sums a run's window of those rows into the figures
real and emulated runs are compared on; the client metrics alone cannot
tell "the emulator's steps are too short" from "its scheduler made other
decisions".
"""
from __future__ import annotations

import numpy as np

#: Engine figures, in the order reports print them: (key, label, unit).
ENGINE_KEYS: list[tuple[str, str, str]] = [
    ("steps", "steps", ""),
    ("busy_s", "busy time", "s"),
    ("mean_batch", "mean batch (requests/step)", ""),
    ("mean_tokens", "mean scheduled tokens/step", ""),
    ("prefill_tokens", "prefill tokens (incl. recompute)", ""),
    ("preemptions", "preemptions", ""),
    ("resumed", "resumed after preemption", ""),
    ("recomputed_tokens", "recomputed tokens", ""),
    ("cached_tokens", "prefix-cache hit tokens", ""),
    ("recompute_steps", "steps with recomputation", ""),
    ("recompute_step_ms", "mean recompute-step time", "ms"),
]


def engine_figures(cols: dict[str, np.ndarray]) -> dict[str, float]:
    """Engine figures of one run's steps.

    Args:
        cols: step columns (equal-length arrays, one entry per step) as
            :func:`profiles.build.read_trace_columns` returns them, cut to the
            run's window. Columns an older recorder did not write count as 0.
    Returns:
        {key of ``ENGINE_KEYS``: value}: counts are steps, requests or
        tokens; ``busy_s`` is the sum of service time and host gap (s);
        ``recompute_step_ms`` the mean service time (ms) of steps that
        recomputed KV after a preemption (nan when there were none).
    """
    n = len(cols["latency_us"])
    z = np.zeros(n, np.int64)
    lat = cols["latency_us"].astype(np.float64)
    rec = cols.get("recomputed_tokens", z)
    m = rec > 0
    return {
        "steps": float(n),
        "busy_s": float((lat + cols.get("host_gap_us", z)).sum() / 1e6),
        "mean_batch": float(cols["num_reqs"].mean()) if n else float("nan"),
        "mean_tokens": float(cols["num_tokens"].mean()) if n else float("nan"),
        "prefill_tokens": float(cols["prefill_tokens"].sum()),
        "preemptions": float(cols.get("preempted_reqs", z).sum()),
        "resumed": float(cols.get("resumed_reqs", z).sum()),
        "recomputed_tokens": float(rec.sum()),
        "cached_tokens": float(cols.get("cached_tokens", z).sum()),
        "recompute_steps": float(m.sum()),
        "recompute_step_ms": float(lat[m].mean() / 1e3) if m.any() else float("nan"),
    }


def format_figures(runs: dict[str, dict[str, float]]) -> list[str]:
    """Markdown table lines: one row per engine figure, one column per run name."""
    names = list(runs)
    lines = ["| engine | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for key, label, unit in ENGINE_KEYS:
        cells = []
        for n in names:
            v = runs[n].get(key, float("nan"))
            cells.append("n/a" if v != v else (f"{v:,.0f}" if float(v).is_integer() and abs(v) >= 1 else f"{v:,.2f}"))
        lines.append(f"| {label}{f' ({unit})' if unit else ''} | " + " | ".join(cells) + " |")
    return lines


#: Output-length buckets (tokens, [lo, hi)) for per-request TPOT: short requests are the ones a
#: preemption or a long prefill step inside their lifetime hurts most.
LEN_BUCKETS = [(1, 16), (16, 64), (64, 256), (256, 1 << 20)]


def request_tpots_ms(res: dict) -> np.ndarray:
    """Per-request TPOT (ms) of a Locust result JSON, in its request order; NaN for a request
    without inter-token gaps (failed, or one output token).

    A request's TPOT is its mean inter-token latency, which is ``vllm bench serve``'s
    (E2EL - TTFT) / (output tokens - 1) when every chunk carries one token; ``res["itls"]`` holds seconds.
    """
    return np.array([sum(itl) / len(itl) * 1e3 if itl else np.nan for itl in res["itls"]], dtype=float)


def tpot_by_length(res: dict) -> list[tuple[str, int, float]]:
    """(output-length bucket, requests, mean TPOT ms) of a Locust result JSON's requests with an ITL."""
    tpot, lens = request_tpots_ms(res), np.asarray(res["output_lens"])
    out = []
    for lo, hi in LEN_BUCKETS:
        v = tpot[(lens >= lo) & (lens < hi) & ~np.isnan(tpot)]
        if len(v):
            out.append((f"{lo}-{hi - 1 if hi < 1 << 20 else ''} tokens", len(v), float(v.mean())))
    return out
