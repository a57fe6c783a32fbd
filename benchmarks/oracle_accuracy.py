"""Oracle accuracy on held-out steps and query cost.

For a profile (default: the bundled CPU profile), split the steps 80/20 at
random, build each oracle from the 80%, and report the median and p90
absolute % error of its point estimate on the 20% it never saw, per step
class; then the mean cost of one ``sample_us`` query (us).

    python benchmarks/oracle_accuracy.py [PROFILE] [--seeds 5]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from _common import PROFILE
from profiles.format import Profile
from profiles.oracle import ORACLES, heldout_errors, profile_features


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", nargs="?", default=PROFILE)
    ap.add_argument("--seeds", type=int, default=5, help="random splits averaged")
    a = ap.parse_args()
    prof = Profile.load(a.profile)
    print(f"profile {a.profile}: {prof.num_steps} steps")
    print(f"{'oracle':8s} {'step class':20s} {'median |err|':>12s} {'p90 |err|':>10s} {'n test':>7s}")
    for kind in ORACLES:
        acc: dict[str, list] = {}
        for seed in range(a.seeds):
            for cls, e in heldout_errors(prof, kind, seed=seed).items():
                acc.setdefault(cls, []).append((e["median"], e["p90"], e["n"]))
        for cls, v in acc.items():
            v = np.array(v)
            print(f"{kind:8s} {cls:20s} {v[:, 0].mean():11.1f}% {v[:, 1].mean():9.1f}% {int(v[:, 2].mean()):7d}")
    print("\nablation: feature oracle with a subset of linear features (mean over splits, median / p90 |err|)")
    from profiles.oracle import DEFAULT_FEATURES, LINEAR_FEATURES
    subsets = [("tokens+requests (2D key only)", ("num_tokens", "num_reqs"), {}),
               ("+ prefill tokens", ("num_tokens", "num_reqs", "prefill_tokens"), {}),
               ("+ attention work", ("num_tokens", "num_reqs", "prefill_tokens", "attn_work"), {}),
               ("+ random-sampling rows (default; greedy and sampled steps in separate cells)", DEFAULT_FEATURES, {}),
               ("+ context tokens (all)", LINEAR_FEATURES, {}),
               ("default, one cell kind for greedy and sampled", DEFAULT_FEATURES, {"split_random": False})]
    for label, feats_, kw in subsets:
        acc = {}
        for seed in range(a.seeds):
            for cls, e in heldout_errors(prof, "feature", seed=seed, features=feats_, **kw).items():
                acc.setdefault(cls, []).append((e["median"], e["p90"]))
        print(f"  {label:76s} " + "   ".join(f"{cls}: {np.mean([v[0] for v in vals]):5.1f}% / "
                                             f"{np.mean([v[1] for v in vals]):5.1f}%" for cls, vals in acc.items()))
    feats = profile_features(prof)
    for kind, cls in ORACLES.items():
        o = cls(prof, seed=0)
        for f in feats[:2000]:
            o.sample_us(f)  # warm the Shepard memo as a running server would
        q = feats * max(1, 20000 // len(feats))
        t0 = time.perf_counter()
        for f in q:
            o.sample_us(f)
        print(f"{kind}: {(time.perf_counter() - t0) / len(q) * 1e6:.2f} us per query ({len(q)} queries)")


if __name__ == "__main__":
    main()
