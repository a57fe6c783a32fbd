"""The host CPU a profile was recorded on, for fingerprints and for ``validate``'s same-hardware check.

On vLLM's CPU platform the "device" is the host CPU, and two hosts that
vLLM both calls ``cpu`` can run the same step shapes at very different
speeds. Measured: the bundled CPU profile, captured on a 2-core
AMD EPYC host, against the same engine on a 2-core Intel Xeon with AMX-BF16
(``benchmarks/step_trace_compare.py --rate 1.25``): prefill 0.48 vs 1.31 ms
per token, single-request decode 54.8 vs 35.4 ms (median step). So a CPU
profile names its CPU, and a comparison with a real backend is only made
on the same one.
"""
from __future__ import annotations

import os
from pathlib import Path

#: ISA flags (``/proc/cpuinfo``) that change CPU kernels' speed in vLLM-CPU / oneDNN.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")


def host_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """{"model_name": str, "logical_cpus": int, "isa": [flags of ``ISA_FLAGS`` present]}.

    Reads the first processor block of ``cpuinfo`` (Linux); on another OS or
    when it is unreadable, ``model_name`` is "unknown" and ``isa`` empty.
    ``logical_cpus`` is the CPUs this process may run on (``sched_getaffinity``).
    """
    name, flags = "unknown", set()
    try:
        for line in Path(cpuinfo).read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "model name" and name == "unknown":
                name = val.strip()
            elif key == "flags" and not flags:
                flags = set(val.split())
            if name != "unknown" and flags:
                break
    except OSError:
        pass
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 0
    return {"model_name": name, "logical_cpus": n, "isa": [f for f in ISA_FLAGS if f in flags]}


def same_cpu(a: dict | None, b: dict | None) -> bool:
    """Whether two ``host_cpu`` records describe the same kind of CPU (model, count, ISA)."""
    return bool(a) and bool(b) and all(a.get(k) == b.get(k) for k in ("model_name", "logical_cpus", "isa"))
