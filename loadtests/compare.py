"""``python -m loadtests.compare A.json B.json``: % difference per metric, B relative to A.

Reads vLLM-format result JSONs (ours or ``vllm bench serve --save-result``)
and prints, for TTFT, TPOT, ITL and E2EL, the mean, median and p99 of each
and (B - A) / A in percent, then the throughputs and request counts.
"""
from __future__ import annotations

import argparse
import json
import sys

_STAT = {"mean": "Mean", "median": "Median", "p99": "P99"}
ROWS = [(f"{stat}_{m}_ms", f"{_STAT[stat]} {m.upper()} (ms)")
        for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")]
ROWS += [("output_throughput", "Output throughput (tok/s)"), ("request_throughput", "Request throughput (req/s)"),
         ("total_token_throughput", "Total token throughput (tok/s)"), ("completed", "Completed requests"),
         ("total_output_tokens", "Output tokens")]


def pct(a: float, b: float) -> float | None:
    """(b - a) / a in percent; None when a is 0."""
    return None if not a else (b - a) / a * 100.0


def compare(a: dict, b: dict) -> list[tuple[str, float | None, float | None, float | None]]:
    """(label, A, B, % diff) for each metric present in both documents."""
    out = []
    for key, label in ROWS:
        if key in a and key in b and a[key] is not None and b[key] is not None:
            out.append((label, float(a[key]), float(b[key]), pct(float(a[key]), float(b[key]))))
    return out


def build_parser(prog: str = "emugate compare") -> argparse.ArgumentParser:
    """The command line of ``emugate compare``."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="baseline result JSON (e.g. real)")
    ap.add_argument("b", help="compared result JSON (e.g. emulated)")
    ap.add_argument("--markdown", action="store_true", help="print a markdown table")
    return ap


def main(argv: list[str] | None = None, prog: str = "emugate compare") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        a, b = (json.load(open(p)) for p in (args.a, args.b))
    except (OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = compare(a, b)
    if args.markdown:
        print("| metric | A | B | diff |\n|---|---:|---:|---:|")
        for label, va, vb, d in rows:
            print(f"| {label} | {va:.2f} | {vb:.2f} | {'n/a' if d is None else f'{d:+.2f}%'} |")
    else:
        print(f"{'metric':<32} {'A':>12} {'B':>12} {'diff':>9}")
        for label, va, vb, d in rows:
            print(f"{label:<32} {va:>12.2f} {vb:>12.2f} {'n/a' if d is None else f'{d:+.2f}%':>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
