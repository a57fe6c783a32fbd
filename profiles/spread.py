"""Start-to-start spread of a CPU capture, and an oracle's bias on a set of real steps.

One server start of vLLM runs the same step shapes a few % faster or slower than the next,
throughout (measured with ``benchmarks/restart_noise.py`` and ``benchmarks/fidelity_diagnosis.py``:
up to ~5 % between warm starts on a 2-core Xeon, up to ~11 % on a 2-core AMD EPYC). A profile
carries the mean offset of the starts it pooled. Two quantities make that visible:

* :func:`oracle_bias`: ``sum(oracle's mean prediction) / sum(measured) - 1`` over a set of steps,
  in %: how much slower (+) or faster (-) the profile times the very steps a real server ran;
* :func:`start_offsets`: for each start of a multi-start capture, the bias on that start's steps
  of the oracle built from the *other* starts (leave one out): each start's own offset.

:func:`spread_summary` turns the offsets into what the profile stores and what ``capture`` uses
to decide whether to add starts: their standard deviation (the host's start-to-start spread) and
the standard error of the pooled profile's offset, ``sd / sqrt(starts)``.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from profiles.format import STEP_DTYPES, Profile
from profiles.oracle import build_oracle, profile_features


def oracle_bias(oracle, steps: dict[str, np.ndarray], draws: int = 5, max_steps: int = 4000,
                seed: int = 0) -> float:
    """% by which ``oracle`` over-times (+) or under-times (-) these measured steps, in aggregate.

    Args:
        oracle: a :class:`profiles.oracle.LatencyOracle`.
        steps: step columns (``profiles.format.STEP_COLUMNS``; ``latency_us`` the measured time, us).
        draws: oracle draws averaged per step (its mean prediction).
        max_steps: score a random subset of at most this many steps (seeded), for speed.

    Returns:
        ``100 * (sum of mean draws / sum of measured latencies - 1)``; NaN for no steps.
    """
    n = len(steps["latency_us"])
    if n == 0:
        return float("nan")
    idx = np.arange(n)
    if n > max_steps:
        idx = np.sort(np.random.default_rng(seed).choice(n, max_steps, replace=False))
    sub = Profile({}, {k: v[idx] for k, v in steps.items() if k in _COLUMNS}, np.zeros(0, np.uint32), {})
    feats = profile_features(sub)
    pred = sum(sum(oracle.sample_us(f) for _ in range(draws)) / draws for f in feats)
    return 100.0 * (pred / float(sub.steps["latency_us"].astype(float).sum()) - 1.0)


def start_offsets(parts: Sequence[dict[str, np.ndarray]], fingerprint: dict | None = None, kind: str = "feature",
                  draws: int = 5, seed: int = 0) -> list[float]:
    """Each start's offset (%): :func:`oracle_bias` on its steps of the oracle built from the other starts.

    Args:
        parts: one step-column dict per server start (warm-up already dropped).
        fingerprint: of the capture (what the oracle reads from a profile: none of it is needed
            for CPU profiles; synthesized ones carry oracle options in ``meta``).
        kind: the oracle (``feature`` or ``grid2d``).

    Returns:
        One value per start, in % (positive: that start ran faster than the others, so the
        others' oracle over-times it). Empty for fewer than two starts.

    Raises:
        ValueError: an unknown oracle ``kind``.
    """
    if len(parts) < 2:
        return []
    out = []
    for k, mine in enumerate(parts):
        others = [p for j, p in enumerate(parts) if j != k]
        steps = {c: np.concatenate([p[c] for p in others]) for c in mine if c in _COLUMNS}
        prof = Profile(dict(fingerprint or {}), steps, np.zeros(0, np.uint32), {})
        out.append(oracle_bias(build_oracle(prof, kind, seed=seed), mine, draws=draws, seed=seed))
    return out


def spread_summary(offsets: Sequence[float], tolerance_pct: float | None = None,
                   cap_reached: bool = False) -> dict[str, Any]:
    """What a profile stores of its capture's start-to-start spread (all in %).

    Keys: ``starts``, ``offsets_pct`` (per start, :func:`start_offsets`), ``sd_pct`` (their
    standard deviation, ddof 1: the host's start-to-start spread), ``se_pct`` (``sd / sqrt(starts)``:
    the standard error of the pooled profile's offset), ``range_pct`` (max - min), and, when given,
    ``tolerance_pct`` and ``cap_reached`` (the capture stopped at its start cap with ``se_pct``
    still above the tolerance).
    """
    o = [float(x) for x in offsets]
    k = len(o)
    sd = float(np.std(o, ddof=1)) if k >= 2 else float("nan")
    out: dict[str, Any] = {"starts": k, "offsets_pct": [round(x, 3) for x in o],
                           "sd_pct": round(sd, 3) if math.isfinite(sd) else None,
                           "se_pct": round(sd / math.sqrt(k), 3) if math.isfinite(sd) else None,
                           "range_pct": round(max(o) - min(o), 3) if o else None}
    if tolerance_pct is not None:
        out["tolerance_pct"] = tolerance_pct
        out["cap_reached"] = bool(cap_reached)
    return out


def describe_spread(spread: dict[str, Any] | None) -> str:
    """One line for ``inspect``, the server's start-up log and ``validate``'s report."""
    if not spread or not spread.get("starts"):
        return "start-to-start spread: not measured (a capture of one server start, or not a capture)"
    if spread["starts"] < 2 or spread.get("sd_pct") is None:
        return f"start-to-start spread: not measured ({spread['starts']} server start)"
    offs = ", ".join(f"{x:+.1f}" for x in spread["offsets_pct"])
    line = (f"start-to-start spread over {spread['starts']} server starts: sd {spread['sd_pct']:.1f}%, "
            f"range {spread['range_pct']:.1f}% (per start: {offs}); the pooled profile's offset has a "
            f"standard error of {spread['se_pct']:.1f}%")
    if spread.get("cap_reached"):
        line += f" (above the {spread['tolerance_pct']:g}% tolerance: the capture reached its start cap)"
    return line



_COLUMNS = tuple(STEP_DTYPES)
