"""How emulate mode is configured: environment variables read in every vLLM process.

vLLM starts its engine core in a child process and resolves the platform
before any command-line parsing, so emulate mode is configured through the
environment (inherited by every vLLM process):

=========================  ====================================================
``EMUGATE_PROFILE``        profile file or bundled profile name (required,
                           unless ``EMUGATE_STEP_MS`` is set). Setting it also
                           activates the emulation platform plugin.
``EMUGATE_ORACLE``         ``feature`` (default) or ``grid2d`` (LLM-Emu baseline)
``EMUGATE_SEED``           integer seed for latency draws and tokens (default 0)
``EMUGATE_STEP_MS``        fixed step latency in ms (no profile; for timing tests)
``EMUGATE_BOOST``          ``rr`` (default), ``nice`` or ``off``: how the step
                           thread is kept punctual on a busy host (see
                           ``EmulatedExecutor._raise_priority``)
``EMUGATE_LATE_WARN_MS``   log a warning when a step ends later than this
                           after the virtual schedule (ms, default 1; ``off``
                           disables); see :mod:`emu_executor.lateness`
``EMUGATE_TIMING_LOG``     file to which the executor appends, at shutdown, each
                           step's timer and consumer lateness (us; see
                           :class:`emu_executor.timing.VirtualDevice`)
=========================  ====================================================

``python -m emu_executor.serve --profile NAME ...`` sets these for you.
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class EmuSettings:
    profile: str | None
    oracle: str
    seed: int
    step_ms: float | None
    timing_log: str | None
    boost: str = "rr"
    late_warn_ms: float | None = 1.0

    @classmethod
    def from_env(cls) -> "EmuSettings":
        step = os.environ.get("EMUGATE_STEP_MS")
        return cls(
            profile=os.environ.get("EMUGATE_PROFILE") or None,
            oracle=os.environ.get("EMUGATE_ORACLE", "feature"),
            seed=int(os.environ.get("EMUGATE_SEED", "0")),
            step_ms=float(step) if step else None,
            timing_log=os.environ.get("EMUGATE_TIMING_LOG") or None,
            boost=os.environ.get("EMUGATE_BOOST", "rr"),
            late_warn_ms=_late_warn(os.environ.get("EMUGATE_LATE_WARN_MS", "1")),
        )

    @property
    def active(self) -> bool:
        """Emulate mode is on in this process tree."""
        return self.profile is not None or self.step_ms is not None


def _late_warn(v: str) -> float | None:
    """``EMUGATE_LATE_WARN_MS``: a number of ms, or off/none/0 (no warning)."""
    if v.strip().lower() in ("off", "none", "", "0"):
        return None
    return float(v)
