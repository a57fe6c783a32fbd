"""Do the unit tests catch real bugs? Hand-written mutations of the code that matters, one at a time.

    python benchmarks/mutations.py            # every mutation; prints killed / survived
    python benchmarks/mutations.py --list

Each mutation is a small, plausible bug (an off-by-one, a dropped check, an inverted condition) in
the gateway's security boundary and data path, the oracle, vLLM-exact metrics, step features,
faults, simulate and plan. The file is patched in place, the unit tests that cover it run
(``pytest -m unit -x``), the file is restored (also on Ctrl-C), and the mutation is *killed* when a
test fails. A survivor names a behaviour no unit test pins down. The working tree must be clean for
the files touched (the script refuses otherwise).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: (name, file, code before, code after, unit test files that should catch it)
MUTATIONS = [
    ("guard: '..' segments allowed", "gateway/guard.py", 'if seg in (b".", b".."):', 'if seg in (b".",):',
     ["tests/test_guard.py"]),
    ("guard: any key matches the first", "gateway/guard.py",
     "            if hmac.compare_digest(digest, d) and found is None:\n"
     "                found = i\n        return found\n\n    def check",
     "            if found is None:\n                found = i\n        return found\n\n    def check",
     ["tests/test_guard.py"]),
    ("guard: public routes need no key check at all", "gateway/guard.py",
     "if self.keys and (method, path) not in self.public:", "if self.keys and (method, path) in self.public:",
     ["tests/test_guard.py"]),
    ("proxy: queue_limit off by one", "gateway/proxy.py",
     "if self.queue_limit and self.in_flight >= self.queue_limit:",
     "if self.queue_limit and self.in_flight > self.queue_limit:",
     ["tests/test_gateway_http.py", "tests/test_guard.py"]),
    ("proxy: invalid UTF-8 passes", "gateway/proxy.py", "    if not _utf8_ok(body):",
     "    if False and not _utf8_ok(body):",
     ["tests/test_gateway_http.py", "tests/test_guard.py"]),
    ("upstream: Authorization forwarded", "gateway/upstream.py", '    b"authorization", b"x-request-id",',
     '    b"x-request-id",', ["tests/test_gateway_http.py", "tests/test_gateway_secrets.py", "tests/test_guard.py"]),
    ("h1: a connection reused before its response was read", "gateway/h1.py",
     "if r.complete and self.reusable and not self.closed and not self._partial:",
     "if not self.closed:", ["tests/test_gateway_http.py"]),
    ("metrics: TPOT over n instead of n - 1", "loadtests/metrics.py", "tpot = (r.latency - r.ttft) / (n - 1)",
     "tpot = (r.latency - r.ttft) / n", ["tests/test_loadtests.py"]),
    ("features: a token due one step late", "emu_executor/features.py", "nr.num_computed_tokens + n >= plen, rnd))",
     "nr.num_computed_tokens + n > plen, rnd))", ["tests/test_profiles.py", "tests/test_tokens.py"]),
    ("oracle: log buckets one octave apart", "profiles/oracle.py",
     "    return 2 * b + ((x >> (b - 2)) & 1 if b >= 2 else 0)",
     "    return b", ["tests/test_profiles.py"]),
    ("oracle: reseed leaves the host gaps' stream", "profiles/oracle.py",
     "        if self._gaps is not None:\n            self._gaps._rng = random.Random(seed + 1)", "        pass",
     ["tests/test_simulate.py"]),
    ("tokens: reseed does not replay the shuffle", "emu_executor/tokens.py",
     "        self._rng.shuffle([None] * self._shuffled)", "        pass", ["tests/test_simulate.py"]),
    ("faults: every_n fires on the wrong requests", "gateway/faults.py",
     "        if f.every_n is not None and n % f.every_n:", "        if f.every_n is not None and (n + 1) % f.every_n:",
     ["tests/test_faults.py"]),
    ("faults: a crash fires again after the restart", "gateway/faults.py",
     '            if f.kind == "crash" and (fid, replica) in self.crashed:\n                continue\n', "",
     ["tests/test_faults.py"]),
    ("faults: 503 without Retry-After", "gateway/faults.py", "(1.0 if f.status in (429, 503) else None)",
     "(1.0 if f.status in (429,) else None)", ["tests/test_faults.py"]),
    ("plan: bisection keeps the failing side", "emugate/plan.py",
     "        if run(mid):\n            lo = mid\n        else:\n            hi = mid",
     "        if run(mid):\n            hi = mid\n        else:\n            lo = mid", ["tests/test_simulate.py"]),
    ("plan: SLO breaker one request early", "emugate/plan.py",
     "need = {s.metric: (s.limit_ms / 1000.0, n - math.floor((n - 1) * s.percentile / 100))",
     "need = {s.metric: (s.limit_ms / 1000.0, n - math.floor((n - 1) * s.percentile / 100) - 1)",
     ["tests/test_simulate.py"]),
    ("simulate: the clock runs backwards", "emu_executor/timing.py",
     "            if self._clock.now < self.deadline:\n                self._clock.now = self.deadline",
     "            self._clock.now = self.deadline", ["tests/test_simulate.py"]),
    ("config: real backends accept engine faults", "gateway/config.py",
     'if (self.mode == "real" or self.urls is not None) and (f.engine or f.cold_start):',
     'if self.urls is not None and (f.engine or f.cold_start):', ["tests/test_faults.py"]),
    ("trace: shared blocks one token short", "loadtests/trace.py", "MOONCAKE_BLOCK = 512", "MOONCAKE_BLOCK = 511",
     ["tests/test_trace.py"]),
]


def run(name: str, path: str, before: str, after: str, tests: list[str]) -> tuple[str, float, str]:
    f = ROOT / path
    src = f.read_text()
    if src.count(before) != 1:
        return "not applied (the code moved: update the mutation)", 0.0, ""
    t0 = time.perf_counter()
    try:
        f.write_text(src.replace(before, after))
        p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "unit", *tests],
                           cwd=ROOT, capture_output=True, text=True, timeout=900)
    finally:
        f.write_text(src)
    failed = [ln for ln in p.stdout.splitlines() if ln.startswith("FAILED")]
    verdict = "killed" if p.returncode == 1 else ("survived" if p.returncode == 0 else f"error (pytest {p.returncode})")
    return verdict, time.perf_counter() - t0, failed[0][7:] if failed else ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", action="store_true")
    ap.add_argument("-k", default=None, help="only mutations whose name contains this")
    args = ap.parse_args()
    if args.list:
        for m in MUTATIONS:
            print(f"{m[1]}: {m[0]}")
        return
    touched = sorted({m[1] for m in MUTATIONS})
    dirty = subprocess.run(["git", "status", "--porcelain", *touched], cwd=ROOT, capture_output=True, text=True).stdout
    if dirty.strip():
        raise SystemExit(f"uncommitted changes in files this script patches:\n{dirty}commit or stash them first")
    rows = []
    for m in MUTATIONS:
        if args.k and args.k not in m[0]:
            continue
        verdict, secs, by = run(*m)
        rows.append((m[0], m[1], verdict, secs, by))
        print(f"{verdict:9s} {secs:6.1f} s  {m[1]}: {m[0]}" + (f"  [{by}]" if by else ""), flush=True)
    killed = sum(r[2] == "killed" for r in rows)
    print(f"\n{killed} of {len(rows)} mutations killed by the unit tier; survivors: "
          + (", ".join(r[0] for r in rows if r[2] != "killed") or "none"))


if __name__ == "__main__":
    main()
