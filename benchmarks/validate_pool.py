"""Pool several ``validate`` runs: emulated vs the mean of every real server start.

Each ``python -m profiles validate`` run gives two real runs (two server
starts) and one emulated run per point. The emulated runs of one profile
barely move between validations (mean TPOT at 0.5 req/s: 46.51 and 46.48 ms
in two runs), while each real start lands somewhere in the real system's
start-to-start spread, so pooling validations gives a steadier reference.
Printed per point and mean metric: % error of the mean emulated run vs the
mean of all real runs, and in brackets the real runs' spread (max - min over
their mean, %).

    python benchmarks/validate_pool.py runs/validate7 runs/validate8
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from _common import ROOT  # noqa: F401  (puts the project on sys.path)

from emugate.validate import rows_from_dir

METRICS = ["mean_ttft_ms", "mean_tpot_ms", "mean_itl_ms", "mean_e2el_ms", "output_throughput"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", help="validate output folders (with r*-b*-{real,real2,emu}.json)")
    a = ap.parse_args()
    points: dict[tuple[float, float], list[dict]] = {}
    for d in a.dirs:
        for row in rows_from_dir(Path(d)):
            points.setdefault((row["burst"], row["rate"]), []).append(row)
    print(f"{len(a.dirs)} validations pooled; % error of mean emulated vs mean of all real starts (real spread)")
    print("| rate | burstiness | real runs | " + " | ".join(m.replace("_ms", "") for m in METRICS) + " |")
    print("|---|---|---:|" + "---:|" * len(METRICS))
    for (burst, rate), rows in sorted(points.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        cells = []
        for m in METRICS:
            r = np.array([row[n][m] for row in rows for n in ("real", "real2")])
            e = np.mean([row["emu"][m] for row in rows])
            cells.append(f"{(e - r.mean()) / r.mean() * 100:+.1f} ({(r.max() - r.min()) / r.mean() * 100:.1f})")
        print(f"| {rate} | {burst} | {len(r)} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
