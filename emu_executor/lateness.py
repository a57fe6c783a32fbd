"""Step lateness: how far the emulated engine falls behind its virtual device.

Each emulated step has a virtual end time (:class:`~emu_executor.timing.VirtualDevice`).
Its *lateness* is ``max(0, time its output reached the engine - virtual end)``, in
seconds: the timer's own overshoot when the engine was already waiting, or the
engine loop's delay when it asked late (the host, busy with the API server,
detokenizing and streaming, could not keep up with the device). A GPU emits
tokens faster than a small CPU host may stream them through vLLM's API server;
when lateness grows, the emulation runs slower than the device it emulates and
its latencies are no longer the GPU's. This module makes that visible:

* the executor (engine-core process) keeps a cumulative histogram
  (:class:`LatenessStats`) in a small memory-mapped file named after the
  API-server process (the engine core's parent): float64 ``[count per bucket
  (len(BUCKETS_S) + 1), sum_s, count, max_s]``, updated in place per step (no
  system call on the step path), read at scrape time. The file (mode 0600)
  lives in a private directory (mode 0700, :func:`runtime_dir`): the
  gateway's runtime directory (``EMUGATE_RUNTIME_DIR``) or, for a server
  started on its own, one the API server makes and removes on exit;
* the platform plugin, loaded in the API-server process too, registers
  :class:`LatenessCollector` in prometheus_client's default registry, so vLLM's
  own ``/metrics`` serves ``emugate:step_lateness_seconds`` (a histogram) next to
  the ``vllm:*`` families, and the gateway merges it like them;
* the executor logs a warning when a step is later than ``EMUGATE_LATE_WARN_MS``
  (default 1 ms), at most once every ``WARN_EVERY_S`` seconds, with the count.
"""
from __future__ import annotations

import atexit
import bisect
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("vllm.emugate.lateness")

#: Histogram bucket upper bounds, seconds (0.1 ms to 1 s).
BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
#: Minimum seconds between two lateness warnings in the log.
WARN_EVERY_S = 10.0
METRIC = "emugate:step_lateness_seconds"


RUNTIME_ENV = "EMUGATE_RUNTIME_DIR"


def runtime_dir(create: bool = False) -> Path | None:
    """The private directory of this server's runtime files (``$EMUGATE_RUNTIME_DIR``).

    With ``create`` (the API server, before it starts the engine core) and no
    such directory, make one (``mkdtemp``: mode 0700), export it in the
    environment so the engine core inherits it, and remove it on exit.
    """
    d = os.environ.get(RUNTIME_ENV)
    if d and os.path.isdir(d):
        return Path(d)
    if not create:
        return None
    d = tempfile.mkdtemp(prefix="emugate-")
    os.environ[RUNTIME_ENV] = d
    atexit.register(shutil.rmtree, d, True)
    return Path(d)


def stats_path(api_server_pid: int) -> Path | None:
    """The stats file of the vLLM server whose API-server process has this pid (None: no runtime dir)."""
    d = runtime_dir()
    return None if d is None else d / f"lateness-{api_server_pid}.f64"


def _private_memmap(path: Path) -> np.memmap:
    """``path`` created or truncated with mode 0600 (never following a symlink), mapped as the stats array."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.ftruncate(fd, _SLOTS * 8)
        with os.fdopen(fd, "r+b", closefd=False) as f:
            return np.memmap(f, dtype="<f8", mode="r+", shape=(_SLOTS,))
    finally:
        os.close(fd)


_SLOTS = len(BUCKETS_S) + 1 + 3  # bucket counts, sum_s, count, max_s


class LatenessStats:
    """Cumulative lateness histogram of one emulated engine, kept in ``path``.

    The state is one float64 array (``[count per bucket..., sum_s, count, max_s]``),
    memory-mapped onto ``path`` so the API server reads it without the engine doing any
    I/O per step.

    Args:
        path: the stats file (``None``: keep in memory only).
        warn_ms: log a warning for steps later than this (ms); ``None`` disables.
    """

    def __init__(self, path: Path | None, warn_ms: float | None = 1.0):
        self.path = path
        self.warn_s = None if warn_ms is None else warn_ms / 1000.0
        self._late_since_warn = 0
        self._worst_since_warn = 0.0
        self._last_warn = 0.0
        self._v = np.zeros(_SLOTS)
        if path is not None:
            try:
                self._v = _private_memmap(path)
            except OSError as e:  # a full or read-only tmp must not stop the engine
                logger.debug("emugate: lateness stats file unavailable: %s", e)
                self.path = None

    @property
    def counts(self) -> list[int]:
        """Steps per bucket (``BUCKETS_S`` then +Inf)."""
        return [int(c) for c in self._v[:-3]]

    @property
    def sum_s(self) -> float:
        return float(self._v[-3])

    @property
    def count(self) -> int:
        return int(self._v[-2])

    def observe(self, late_s: float) -> None:
        """Record one step's lateness (seconds; negative counts as 0)."""
        late_s = max(0.0, late_s)
        v = self._v
        v[bisect.bisect_left(BUCKETS_S, late_s)] += 1
        v[-3] += late_s
        v[-2] += 1
        if late_s > v[-1]:
            v[-1] = late_s
        if self.warn_s is not None and late_s > self.warn_s:
            self._warn(late_s)

    def _warn(self, late_s: float) -> None:
        self._late_since_warn += 1
        self._worst_since_warn = max(self._worst_since_warn, late_s)
        now = time.monotonic()
        if now - self._last_warn >= WARN_EVERY_S:
            logger.warning(
                "emugate: %d step(s) ended more than %.1f ms after the virtual device's schedule "
                "(worst %.1f ms): this host cannot keep up with the emulated device, so latencies "
                "run slower than that device's; use fewer requests per replica or more replicas",
                self._late_since_warn, self.warn_s * 1000, self._worst_since_warn * 1000)
            self._last_warn, self._late_since_warn, self._worst_since_warn = now, 0, 0.0

    def close(self) -> None:
        """Remove the stats file (engine shutdown: the API server stops serving it)."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
            self.path = None

    def quantile(self, q: float) -> float:
        """Upper bucket bound holding quantile ``q`` (seconds; inf beyond the last bucket)."""
        return quantile_from_counts(self.counts, q)


def quantile_from_counts(counts: list[int], q: float) -> float:
    """The bucket upper bound (s) at quantile ``q`` of a histogram over ``BUCKETS_S`` (+Inf)."""
    total = sum(counts)
    if total == 0:
        return 0.0
    acc = 0
    for i, c in enumerate(counts):
        acc += c
        if acc >= q * total:
            return BUCKETS_S[i] if i < len(BUCKETS_S) else float("inf")
    return float("inf")


class LatenessCollector:
    """prometheus_client collector: the stats file of this API server as a histogram.

    Registered by the platform plugin in the API-server process; yields nothing
    until the engine has written the file.
    """

    def __init__(self, path: Path):
        self.path = path

    def collect(self):
        from prometheus_client.core import HistogramMetricFamily
        try:
            raw = self.path.read_bytes()
        except OSError:
            return
        if len(raw) != _SLOTS * 8:
            return
        vals = struct.unpack(f"<{_SLOTS}d", raw)
        snap = {"counts": vals[:len(BUCKETS_S) + 1], "sum": vals[-3]}
        acc, buckets = 0.0, []
        for bound, c in zip(list(BUCKETS_S) + ["+Inf"], snap["counts"]):
            acc += c
            buckets.append((str(bound) if bound != "+Inf" else "+Inf", acc))
        fam = HistogramMetricFamily(METRIC, "Lateness of emulated step ends against the virtual device's "
                                            "schedule (seconds; 0 when the host keeps up)",
                                    buckets=buckets, sum_value=snap["sum"])
        yield fam


_registered = False


def register_collector() -> None:
    """Register :class:`LatenessCollector` for this process (once); called in the API server."""
    global _registered
    if _registered:
        return
    try:
        from prometheus_client import REGISTRY
        runtime_dir(create=True)
        path = stats_path(os.getpid())
        REGISTRY.register(LatenessCollector(path))
        # the engine core is often killed with its process group before its executor's
        # shutdown runs; the API server, whose pid names the file, removes it on exit
        atexit.register(path.unlink, missing_ok=True)
        _registered = True
    except Exception as e:  # never break vLLM's start-up over a metric
        logger.debug("emugate: lateness collector not registered: %s", e)
