"""Engine faults inside the emulated engine, so vLLM's own telemetry moves as on a sick GPU server.

The gateway (:mod:`gateway.faults`) decides which faults are on for each replica and writes them to
a small JSON file in its private runtime directory; the replica's engine-core process reads it
(``EMUGATE_FAULTS_FILE``, re-read when its modification time changes, checked at most every
:data:`POLL_S`). The file holds one object, every key optional::

    {"slow": 3.0,                       every step takes 3x its drawn latency (a throttled or straggler GPU)
     "spikes": [0.02, 10.0],            each step, with probability 0.02, takes 10x
     "kv_fraction": 0.3,                only 30 % of the KV pool is usable (the rest held as ballast)
     "hang": true,                      steps stop completing (the engine waits; /health stays 200)
     "crash": true,                     the engine-core process exits now (code 70)
     "crash_after_requests": 500}       ... or once it has admitted this many requests

What each does in vLLM's terms:

* ``slow``/``spikes``: the executor scales the oracle's draw; step times, ITL and everything
  downstream (queueing, batch sizes) follow.
* ``kv_fraction``: :class:`FaultScheduler` (vLLM's scheduler, chosen through ``--scheduler-cls``,
  vLLM's own plug point, by the emulation platform when a faults file is configured) takes free
  blocks out of vLLM's block pool before each schedule until ``1 - kv_fraction`` of the usable
  blocks are held, and gives them back when the fraction rises. Running requests that then need
  blocks are preempted by vLLM itself; ``vllm:kv_cache_usage_perc`` counts the ballast as used and
  ``vllm:num_preemptions_total`` rises, as on a GPU whose KV pool shrank.
* ``hang``: the step in flight does not complete until the hang is lifted (the engine loop blocks
  on it, as on a stuck GPU kernel); requests stall mid-stream, ``/health`` keeps answering 200.
* ``crash``: ``os._exit(70)`` in the engine-core process; vLLM's API server sees its engine die and
  exits, and the gateway's supervisor restarts the replica.

Cold start (``EMUGATE_STARTUP_S``, seconds): the executor's start-up sleeps that long before the
engine reports ready, as loading the real weights would take (the gateway computes it from the
model's weight bytes and a load bandwidth, or takes a fixed value).
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from typing import Any

logger = logging.getLogger("vllm.emugate.faults")

#: How often (s) the faults file's modification time is checked.
POLL_S = 0.05
#: Exit code of a crash fault.
CRASH_EXIT_CODE = 70


class FaultState:
    """The faults in force for this engine process (module docstring), read from ``path``.

    ``now`` is injectable for tests. Unreadable or malformed files are logged once and treated as
    "no fault" (the gateway writes them atomically; a torn read is retried at the next poll).
    """

    def __init__(self, path: str | None, seed: int = 0) -> None:
        self.path = path
        self.state: dict[str, Any] = {}
        self._mtime = None
        self._next = 0.0
        self._rng = random.Random(seed ^ 0x5EED)
        self._lock = threading.Lock()
        self.requests_admitted = 0
        self._warned = False

    def refresh(self, now: float | None = None) -> dict[str, Any]:
        """The current faults (re-read when the file changed, at most every :data:`POLL_S`)."""
        if self.path is None:
            return self.state
        now = time.monotonic() if now is None else now
        if now < self._next:
            return self.state
        with self._lock:
            self._next = now + POLL_S
            try:
                mtime = os.stat(self.path).st_mtime_ns
            except FileNotFoundError:
                if self.state:
                    logger.warning("emugate: faults cleared (file removed)")
                self.state, self._mtime = {}, None
                return self.state
            if mtime == self._mtime:
                return self.state
            try:
                with open(self.path) as f:
                    new = json.load(f)
                if not isinstance(new, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                if not self._warned:
                    logger.warning("emugate: faults file %s unreadable (%s); keeping the previous faults", self.path, e)
                    self._warned = True
                return self.state
            self._mtime = mtime
            if new != self.state:
                logger.warning("emugate: faults now %s", new or "none")
            self.state = new
        return self.state

    # ------------------------------------------------------------ executor hooks
    def latency_factor(self) -> float:
        """The factor on this step's drawn latency: ``slow`` x (``spikes``' factor with its probability)."""
        st = self.refresh()
        f = float(st.get("slow") or 1.0)
        sp = st.get("spikes")
        if sp and self._rng.random() < float(sp[0]):
            f *= float(sp[1])
        return f

    def hung(self) -> bool:
        """Whether steps are to stop completing now."""
        return bool(self.refresh().get("hang"))

    def admitted(self, n: int) -> None:
        """Count ``n`` newly admitted requests; exit the process if a crash fault says so."""
        self.requests_admitted += n
        st = self.refresh()
        after = st.get("crash_after_requests")
        if st.get("crash") or (after is not None and self.requests_admitted >= int(after)):
            self._crash()

    def _crash(self) -> None:
        logger.error("emugate: crash fault: engine-core process exits (code %d) after %d requests",
                     CRASH_EXIT_CODE, self.requests_admitted)
        logging.shutdown()
        os._exit(CRASH_EXIT_CODE)

    def watch(self) -> None:
        """Start a daemon thread that applies ``crash`` within :data:`POLL_S` even while the engine is idle
        (a GPU fault does not wait for traffic); ``crash_after_requests`` fires on admission."""
        def _loop() -> None:
            while True:
                time.sleep(POLL_S)
                if self.refresh().get("crash"):
                    self._crash()
        threading.Thread(target=_loop, daemon=True, name="emugate-faults").start()

    def kv_fraction(self) -> float:
        """The usable fraction of the KV pool (1.0: all of it)."""
        v = self.refresh().get("kv_fraction")
        return 1.0 if v is None else min(1.0, max(0.0, float(v)))


_STATE: FaultState | None = None


def fault_state() -> FaultState:
    """This process's :class:`FaultState` (one per engine process; executor and scheduler share it)."""
    global _STATE
    if _STATE is None:
        _STATE = FaultState(os.environ.get("EMUGATE_FAULTS_FILE") or None,
                            int(os.environ.get("EMUGATE_SEED", "0") or 0))
        if _STATE.path is not None:
            _STATE.watch()
    return _STATE


def cold_start() -> None:
    """Sleep ``EMUGATE_STARTUP_S`` seconds (the real model's load time) before the engine is ready."""
    s = float(os.environ.get("EMUGATE_STARTUP_S", "0") or 0)
    if s > 0:
        logger.warning("emugate: cold start: loading weights takes %.1f s (EMUGATE_STARTUP_S)", s)
        time.sleep(s)


def wait_while_hung(state: FaultState) -> float:
    """Block while a hang fault is on; returns the seconds waited."""
    t0 = time.monotonic()
    if state.hung():
        logger.warning("emugate: hang fault: steps stop completing until it is lifted")
        while state.hung():
            time.sleep(POLL_S)
        logger.warning("emugate: hang lifted after %.1f s", time.monotonic() - t0)
    return time.monotonic() - t0


class _Ballast:
    """KV blocks held out of vLLM's block pool to shrink its usable capacity (module docstring)."""

    def __init__(self) -> None:
        self.blocks: list = []

    def adjust(self, scheduler, fraction: float) -> None:
        pool = scheduler.kv_cache_manager.block_pool
        usable = pool.num_gpu_blocks - 1  # vLLM's null block is never handed out
        target = int(round(usable * (1.0 - fraction)))
        held = len(self.blocks)
        if held < target:
            n = min(target - held, pool.get_num_free_blocks())
            if n > 0:
                self.blocks += pool.get_new_blocks(n)
        elif held > target:
            give = self.blocks[target:]
            del self.blocks[target:]
            pool.free_blocks(give)


def _make_scheduler(base):
    class _FaultScheduler(base):
        """vLLM's scheduler with the KV-pressure fault applied before each schedule (module docstring)."""

        def __init__(self, *a, **k) -> None:
            super().__init__(*a, **k)
            self._emu_faults = fault_state()
            self._emu_ballast = _Ballast()

        def schedule(self, *a, **k):
            self._emu_ballast.adjust(self, self._emu_faults.kv_fraction())
            return super().schedule(*a, **k)

    return _FaultScheduler


def __getattr__(name: str):
    # vLLM resolves these qualnames (--scheduler-cls) after its modules are importable; build lazily
    # so importing this module never imports vLLM
    if name == "FaultScheduler":
        from vllm.v1.core.sched.scheduler import Scheduler
        cls = _make_scheduler(Scheduler)
    elif name == "FaultAsyncScheduler":
        from vllm.v1.core.sched.async_scheduler import AsyncScheduler
        cls = _make_scheduler(AsyncScheduler)
    else:
        raise AttributeError(name)
    cls.__name__ = cls.__qualname__ = name
    globals()[name] = cls
    return cls
