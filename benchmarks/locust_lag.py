"""Can Locust hold the schedule? Lag of actual behind scheduled send times at a fixed rate.

Runs the Locust workload (``--rate``, default 50 req/s, Poisson) against an
emulated server with a fixed 5 ms step and short outputs, and prints the
send-lag percentiles the workload records (actual send - scheduled send, ms).

    python benchmarks/locust_lag.py [--rate 50] [--num-prompts 1000]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _common import MODEL, ROOT, emulated_server


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=50.0)
    ap.add_argument("--num-prompts", type=int, default=1000)
    ap.add_argument("--output-len", type=int, default=16)
    a = ap.parse_args()
    out = Path(tempfile.mkdtemp()) / "lag.json"
    with emulated_server(["--max-num-seqs", "1024"], step_ms=5.0, name="bench-lag") as (url, _):
        cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless",
               "-H", url, "--model", MODEL, "--num-prompts", str(a.num_prompts), "--request-rate", str(a.rate),
               "--ignore-eos", "--output-len", str(a.output_len), "--result-json", str(out), "--only-summary",
               "--loglevel", "WARNING"]
        p = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
        if p.returncode != 0:
            raise SystemExit(p.stderr[-3000:])
    doc = json.loads(out.read_text())
    print(f"{a.num_prompts} requests at {a.rate} req/s: completed {doc['completed']}, "
          f"duration {doc['duration']:.1f} s (schedule {a.num_prompts / a.rate:.1f} s)")
    print(f"send lag: p50 {doc['send_lag_ms_p50']:.2f} ms, p99 {doc['send_lag_ms_p99']:.2f} ms, "
          f"max {doc['send_lag_ms_max']:.2f} ms")


if __name__ == "__main__":
    main()
