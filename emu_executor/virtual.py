"""VirtualTimeExecutor: the emulated executor on a virtual clock, for ``emugate simulate``.

The same executor as emulate mode (:class:`~emu_executor.executor.EmulatedExecutor`: the step's
features from ``SchedulerOutput``, the latency and host gap drawn from the profile's oracle,
synthetic tokens, the KV pool sized to the profile's capacity), with one difference: its device
runs on a :class:`~emu_executor.timing.VirtualClock` instead of ``perf_counter``. A step ends at
``max(now, previous end + host gap) + latency`` as before, and collecting its output moves the
clock there instead of sleeping until then (:class:`~emu_executor.timing.SimulatedFuture`).
vLLM's engine core above it (scheduler, KV-cache manager, prefix cache, chunked prefill,
preemption, async scheduling's batch queue) runs unchanged, in-process; whoever drives it
(:mod:`emugate.simulate`) places arrivals on the same clock.

Beyond the emulated executor it counts, per run (:meth:`VirtualTimeExecutor.reset` clears them):
``num_steps`` (steps with scheduled tokens), ``num_preemptions``
(``SchedulerOutput.preempted_req_ids``), ``prefix_queries``/``prefix_hits`` (prompt tokens of
first admissions, and how many of them the prefix cache held: ``num_computed_tokens`` at
admission), and the device's busy seconds; and it can scale every drawn step latency
(``latency_scale``, to ask how an answer moves when step times are off by a profile's error).
"""
from __future__ import annotations

import os

from emu_executor.executor import EmulatedExecutor
from emu_executor.timing import SimulatedDevice, SimulatedFuture, VirtualClock


class _ScaledDevice(SimulatedDevice):
    """SimulatedDevice whose step latencies are multiplied by ``scale`` (host gaps are not)."""

    scale = 1.0

    def submit(self, latency_s: float, host_gap_s: float = 0.0) -> float:
        return super().submit(latency_s * self.scale, host_gap_s)


class VirtualTimeExecutor(EmulatedExecutor):
    """EmulatedExecutor on a virtual clock (module docstring). Configured like emulate mode
    (``EMUGATE_PROFILE``, ``EMUGATE_ORACLE``, ``EMUGATE_SEED``: :mod:`emu_executor.settings`)."""

    def _init_timing(self) -> None:
        os.environ.pop("EMUGATE_FAULTS_FILE", None)  # faults are a staging feature: never in virtual time
        os.environ.pop("EMUGATE_STARTUP_S", None)
        self.clock = VirtualClock()
        self.device = _ScaledDevice(self.clock)
        self.lateness = None
        self.num_preemptions = 0
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def latency_scale(self) -> float:
        """Factor on every drawn step latency (1.0: the profile's own)."""
        return self.device.scale

    @latency_scale.setter
    def latency_scale(self, v: float) -> None:
        self.device.scale = float(v)

    def reset(self, seed: int, latency_scale: float = 1.0) -> None:
        """Start a new run at clock 0 with the draws of ``seed`` (as a fresh executor with
        ``EMUGATE_SEED=seed``: latencies, host gaps and synthetic tokens).

        Raises:
            RuntimeError: steps are still in flight (the previous run did not drain).
        """
        if self.pending:
            raise RuntimeError("reset with steps in flight: drain the engine first")
        self.clock.now = 0.0
        self.device.reset()
        self.latency_scale = latency_scale
        self.oracle.reseed(seed) if hasattr(self.oracle, "reseed") else None
        self.tokens.reseed(seed)
        self.token_state.clear()
        self.num_steps = self.num_preemptions = self.prefix_queries = self.prefix_hits = 0

    def execute_model(self, scheduler_output, non_block: bool = False):
        so = scheduler_output
        if so.preempted_req_ids:
            self.num_preemptions += len(so.preempted_req_ids)
        for nr in so.scheduled_new_reqs:
            if nr.req_id not in self.token_state:  # first admission (a resumed request is "new" again)
                self.prefix_queries += nr.prompt_len
                self.prefix_hits += nr.num_computed_tokens
        return super().execute_model(so, non_block=non_block)

    def sample_tokens(self, grammar_output, non_block: bool = False):
        """Synthetic tokens of the oldest executed step; collecting them moves the clock to its end."""
        step = self.pending.popleft()
        output = self._make_output(step, grammar_output)
        if non_block:
            return SimulatedFuture(step.end, lambda: output, self.clock)
        if self.clock.now < step.end:
            self.clock.now = step.end
        return output

    def shutdown(self) -> None:
        return None
