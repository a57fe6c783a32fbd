"""emugate's vLLM plug-ins: emulated and profiling executors, platform plugin.

``--distributed-executor-backend emu_executor.EmulatedExecutor`` (emulate) or
``emu_executor.ProfilingExecutor`` (real mode, records a step trace);
``emu_executor.EmulatedProfilingExecutor`` (emulate mode, records the served steps).
Imports of vLLM happen lazily so ``import emu_executor`` stays cheap.
"""
from __future__ import annotations

__all__ = ["EmulatedExecutor", "EmulatedProfilingExecutor", "ProfilingExecutor"]


def __getattr__(name: str):
    if name == "EmulatedExecutor":
        from emu_executor.executor import EmulatedExecutor
        return EmulatedExecutor
    if name in ("ProfilingExecutor", "EmulatedProfilingExecutor"):
        from emu_executor import profiling
        return getattr(profiling, name)
    raise AttributeError(name)
