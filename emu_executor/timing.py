"""The virtual device: steps run back to back on one emulated accelerator.

Step i ends at ``max(now, end of step i-1 + host gap_i) + latency_i``
(LLM-Emu's timer-resolved Future, sec. 3.3, plus the host gap recorded in
sync-scheduling profiles; 0 for overlapped, async-scheduled GPU steps). Futures resolve *at* that end: a
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


def wait_until(deadline: float) -> tuple[float, bool]:
    """Block until ``perf_counter() >= deadline``.

    Returns (lateness in seconds, waited): ``waited`` is False when the caller
    arrived after the deadline (the lateness is then the caller's own delay,
    not the timer's).
    """
    now = time.perf_counter()
    remaining = deadline - now
    if remaining <= 0:
        return -remaining, False
    if remaining > SPIN_S:
        time.sleep(remaining - SPIN_S)
    while (now := time.perf_counter()) < deadline:
        time.sleep(0)
    return now - deadline, True


class VirtualDevice:
    """Serialises emulated steps on one device timeline.

    ``submit(latency_s)`` returns the step's end time (perf_counter seconds).
    For the timing benchmark it keeps (bounded to the last ``keep`` steps):

    * ``timer_late_s``: how late a step's result became available to a caller
      that was already waiting for it (the timer's own precision);
    * ``consumer_late_s``: how long after a step's end the engine first asked
      for its result (the engine loop was busy: on a GPU the host would be
      late to collect the same way; the device timeline is unaffected).
    """

    def __init__(self, keep: int = 100_000, on_late: Callable[[float], None] | None = None):
        self.on_late = on_late
        self.last_end = 0.0
        self.keep = keep
        self.timer_late_s: list[float] = []
        self.consumer_late_s: list[float] = []

    def submit(self, latency_s: float, host_gap_s: float = 0.0) -> float:
        """Schedule a step of ``latency_s``; it starts no earlier than ``host_gap_s``
        after the previous step's end (the host work that separated steps on the
        profiled system; when the emulated host was slower, ``now`` wins)."""
        start = max(time.perf_counter(), self.last_end + host_gap_s)
        self.last_end = start + latency_s
        return self.last_end

    def record(self, late: tuple[float, bool]) -> None:
        """Keep one step's lateness (seconds, waited) and pass it to ``on_late``."""
        if self.on_late is not None:
            self.on_late(late[0])
        lst = self.timer_late_s if late[1] else self.consumer_late_s
        if len(lst) >= self.keep:
            del lst[: self.keep // 2]
        lst.append(late[0])


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
                self._device.record(late)
            try:
                self.set_result(self._make())
            except Exception as e:  # surface build errors to the engine
                self.set_exception(e)
        return super().result()


class VirtualClock:
    """Simulated time (seconds from the simulation's start), advanced only by the simulation.

    ``emugate simulate`` (:mod:`emugate.simulate`) owns one per replica and moves ``now`` to an
    arrival when the engine is idle; a :class:`SimulatedFuture` moves it to its step's end when the
    engine collects the step. Nothing sleeps.
    """

    __slots__ = ("now",)

    def __init__(self, now: float = 0.0) -> None:
        self.now = now


class SimulatedDevice:
    """:class:`VirtualDevice` on a :class:`VirtualClock`: the same rule (step i ends at
    ``max(now, end of step i-1 + host gap_i) + latency_i``), with ``now`` the clock's.

    The engine's own host time between steps (scheduling, output processing on this CPU) counts as
    zero: on the profiled hardware it is inside the recorded host gaps and step times.
    """

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.last_end = 0.0
        self.busy_s = 0.0  # summed step latencies (s): the device's busy time

    def submit(self, latency_s: float, host_gap_s: float = 0.0) -> float:
        """Schedule a step of ``latency_s`` (s); returns its end on the virtual clock (s)."""
        start = max(self.clock.now, self.last_end + host_gap_s)
        self.last_end = start + latency_s
        self.busy_s += latency_s
        return self.last_end

    def reset(self) -> None:
        """Forget the timeline (a new run starts at the clock's ``now``)."""
        self.last_end = 0.0
        self.busy_s = 0.0


class SimulatedFuture(Future):
    """A step's output on the virtual clock: ``result()`` moves the clock to the step's end (if
    it is not already later) and returns the output at once; ``done()`` is whether the clock has
    reached the end."""

    def __init__(self, deadline: float, make: Callable[[], Any], clock: VirtualClock) -> None:
        super().__init__()
        self.deadline = deadline
        self._make = make
        self._clock = clock

    def done(self) -> bool:
        return super().done() or self._clock.now >= self.deadline

    def result(self, timeout: float | None = None) -> Any:
        if not super().done():
            if self._clock.now < self.deadline:
                self._clock.now = self.deadline
            try:
                self.set_result(self._make())
            except Exception as e:  # surface build errors to the engine
                self.set_exception(e)
        return super().result()
