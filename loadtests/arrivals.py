"""Open-loop arrival schedules, identical to vLLM's benchmark (``vllm bench serve``).

``arrival_times`` replicates ``vllm.benchmarks.serve.get_request`` (0.32):
``np.random.seed(seed)``; per request a gap ``np.random.gamma(shape=burstiness,
scale=1/(rate*burstiness))`` (burstiness 1 is Poisson; inf gives constant
gaps 1/rate; rate inf sends all at t=0); gaps summed; with no ramp-up the
times are rescaled so the last arrival lands exactly at N/rate. Linear and
exponential ramp-up interpolate the rate over the request index.
Times are seconds from the start of the run.
"""
from __future__ import annotations

import math

import numpy as np


def current_rate(strategy: str | None, start_rps: float | None, end_rps: float | None,
                 index: int, total: int, rate: float) -> float:
    """vLLM's ``_get_current_request_rate`` (requests/s) for request ``index``."""
    if strategy and start_rps is not None and end_rps is not None:
        progress = index / max(total - 1, 1)
        if strategy == "linear":
            return start_rps + (end_rps - start_rps) * progress
        if strategy == "exponential":
            return start_rps * ((end_rps / start_rps) ** progress)
        raise ValueError(f"unknown ramp-up strategy {strategy!r}: use 'linear' or 'exponential'")
    return rate


def arrival_times(num_requests: int, rate: float, burstiness: float = 1.0, seed: int = 0,
                  ramp_up: str | None = None, ramp_start_rps: float | None = None,
                  ramp_end_rps: float | None = None) -> list[float]:
    """Scheduled send times (s, from 0) for ``num_requests`` requests.

    Raises:
        ValueError: burstiness <= 0, a non-positive rate, or an unknown ramp-up.
    """
    if burstiness <= 0:
        raise ValueError(f"burstiness must be > 0, got {burstiness}")
    np.random.seed(seed)
    delays: list[float] = []
    for i in range(num_requests):
        r = current_rate(ramp_up, ramp_start_rps, ramp_end_rps, i, num_requests, rate)
        if r <= 0:
            raise ValueError(f"request rate must be > 0, got {r}")
        if math.isinf(r):
            delays.append(0.0)
        elif math.isinf(burstiness):
            delays.append(1.0 / r)
        else:
            delays.append(float(np.random.gamma(shape=burstiness, scale=1.0 / (r * burstiness))))
    for i in range(1, len(delays)):
        delays[i] += delays[i - 1]
    if ramp_up is None and delays and delays[-1] != 0:
        factor = (num_requests / rate) / delays[-1]
        delays = [d * factor for d in delays]
    return delays
