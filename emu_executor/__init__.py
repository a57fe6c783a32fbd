"""emugate's vLLM plug-ins: emulated and profiling executors, platform plugin.

``--distributed-executor-backend emu_executor.EmulatedExecutor`` (emulate) or
``emu_executor.ProfilingExecutor`` (real mode, records a step trace).
Imports of vLLM happen lazily so ``import emu_executor`` stays cheap.
"""
from __future__ import annotations

__all__ = ["EmulatedExecutor", "ProfilingExecutor"]


def __getattr__(name: str):
    if name == "EmulatedExecutor":
        from emu_executor.executor import EmulatedExecutor
        return EmulatedExecutor
    if name == "ProfilingExecutor":
        from emu_executor.profiling import ProfilingExecutor
        return ProfilingExecutor
    raise AttributeError(name)
