"""Profile size and load time vs the same samples written as LLM-Emu-style JSON.

    python benchmarks/profile_size.py [PROFILE]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import PROFILE
from profiles.assets import resolve_profile
from profiles.format import Profile
from profiles.llm_emu import to_llm_emu_json


def best_of(fn, n=5) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("profile", nargs="?", default=PROFILE)
    a = ap.parse_args()
    path = resolve_profile(a.profile)
    prof = Profile.load(path)
    tmp = Path(tempfile.mkdtemp())
    js = tmp / "llm_emu.json"
    js.write_text(json.dumps(to_llm_emu_json(prof)))
    t_prof = best_of(lambda: Profile.load(path))
    t_json = best_of(lambda: json.loads(js.read_text()))
    print(f"steps: {prof.num_steps}")
    print(f"emugate profile (zstd columnar): {path.stat().st_size / 1024:8.1f} KiB, load {t_prof * 1000:7.2f} ms")
    print(f"LLM-Emu-style JSON (same data): {js.stat().st_size / 1024:8.1f} KiB, load {t_json * 1000:7.2f} ms "
          f"(parse only)")
    print(f"ratio: {js.stat().st_size / path.stat().st_size:.1f}x smaller, {t_json / t_prof:.1f}x faster to load")


if __name__ == "__main__":
    main()
