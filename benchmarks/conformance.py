"""Differential conformance of emulate mode: the corpus to a real vLLM-CPU server and an emulated one.

Prints the table (cases, identical, differences, documented exceptions) and
every case that differs. ``--emu-src DIR`` runs the emulated server from
another source tree (e.g. a ``git worktree`` of an older commit) to measure
the table before a fix.

    python benchmarks/conformance.py [--emu-src /tmp/before]
"""
from __future__ import annotations

import argparse
import time

from _common import ROOT
from emugate.conformance import corpus, run, started_pair, table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emu-src", default=None, help="source tree for the emulated server's emu_executor (PYTHONPATH)")
    a = ap.parse_args()
    env = {"PYTHONPATH": a.emu_src} if a.emu_src else None
    t0 = time.monotonic()
    with started_pair(ROOT / "runs" / "conformance", emu_env=env) as (real, emu):
        t1 = time.monotonic()
        results = run(real, emu, corpus())
    print(f"servers up in {t1 - t0:.0f} s; {len(results)} cases in {time.monotonic() - t1:.0f} s"
          + (f" (emulated server from {a.emu_src})" if a.emu_src else ""))
    print(table(results))


if __name__ == "__main__":
    main()
