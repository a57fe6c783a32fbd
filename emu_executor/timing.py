"""The virtual device: steps run back to back on one emulated accelerator.

Step i ends at ``max(now, end of step i-1) + latency_i`` (LLM-Emu's
timer-resolved Future, sec. 3.3). Futures resolve *at* that end: a
:class:`TimedFuture` sleeps until ``end - SPIN_S`` and then yields-spins
(``time.sleep(0)``, which releases the GIL so vLLM's I/O threads keep
running) to the exact deadline. This gives sub-millisecond resolution
without a timer thread; ``benchmarks/emulator_timing.py`` measures it.

All times here are ``time.perf_counter()`` seconds.
"""
from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any, Callable

#: Final stretch before a deadline spent yield-spinning instead of sleeping
#: (seconds). Linux nanosleep overshoots by ~50-100 us; 0.3 ms covers it.
SPIN_S = 0.0003


def wait_until(deadline: float) -> float:
    """Block until ``perf_counter() >= deadline``; return the lateness in seconds."""
    now = time.perf_counter()
    remaining = deadline - now
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while (now := time.perf_counter()) < deadline:
        time.sleep(0)
    return now - deadline


class VirtualDevice:
    """Serialises emulated steps on one device timeline.

    ``submit(latency_s)`` returns the step's end time (perf_counter seconds).
    ``lateness_s`` collects how late each step's Future resolved (for the
    timing benchmark; bounded to the last ``keep`` steps).
    """

    def __init__(self, keep: int = 100_000):
        self.last_end = 0.0
        self.keep = keep
        self.lateness_s: list[float] = []

    def submit(self, latency_s: float) -> float:
        start = max(time.perf_counter(), self.last_end)
        self.last_end = start + latency_s
        return self.last_end

    def record_lateness(self, late_s: float) -> None:
        if len(self.lateness_s) >= self.keep:
            del self.lateness_s[: self.keep // 2]
        self.lateness_s.append(late_s)


class TimedFuture(Future):
    """A Future whose value becomes available at ``deadline`` (perf_counter s).

    ``make()`` builds the value (called once, by the first ``result()``);
    ``done()`` is true once the deadline has passed. ``result(timeout)``
    waits at most ``timeout`` seconds and raises TimeoutError if the
    deadline is later than that.
    """

    def __init__(self, deadline: float, make: Callable[[], Any], device: VirtualDevice | None = None):
        super().__init__()
        self.deadline = deadline
        self._make = make
        self._device = device

    def done(self) -> bool:
        return super().done() or time.perf_counter() >= self.deadline

    def result(self, timeout: float | None = None) -> Any:
        if not super().done():
            if timeout is not None and self.deadline - time.perf_counter() > timeout:
                raise TimeoutError("emulated step not finished within timeout")
            late = wait_until(self.deadline)
            if self._device is not None:
                self._device.record_lateness(late)
            try:
                self.set_result(self._make())
            except Exception as e:  # surface build errors to the engine
                self.set_exception(e)
        return super().result()
