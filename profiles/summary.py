"""``python -m profiles inspect``: summary, held-out accuracy, and a latency heatmap PNG."""
from __future__ import annotations

import json

import numpy as np

from profiles.format import Profile
from profiles.oracle import CLASS_NAMES, DECODE, PREFILL, _bucket, heldout_errors


def profile_notes(prof: Profile) -> list[str]:
    """What a user must know of a profile's accuracy before trusting it, one line each: an estimate's
    label and expected error, a capture's start-to-start spread. Printed by ``inspect`` and logged by
    the emulated server at start-up."""
    from profiles.spread import describe_spread
    lines = []
    if prof.meta.get("estimate") or prof.meta.get("label"):
        lines.append(str(prof.meta.get("label", "ESTIMATE: synthesized profile")))
        lines += [f"warning: outside what the step-time model was fitted on: {w}"
                  for w in prof.meta.get("coverage_warnings", [])]
    if prof.fingerprint.get("device_type") == "cpu" or "start_spread" in prof.meta:
        lines.append(describe_spread(prof.meta.get("start_spread")))
    return lines


def inspect_profile(path: str, png: str | None = None, heldout: bool = True) -> str:
    """Text report of a profile; with ``png`` also writes a heatmap of median step
    latency (ms) over (scheduled tokens, running requests) per step class."""
    prof = Profile.load(path)
    s = prof.steps
    lat_ms = s["latency_us"] / 1000.0
    cls = np.where(s["prefill_tokens"] > 0, PREFILL, DECODE)
    lines = [f"profile: {path}", *profile_notes(prof), "fingerprint:"]
    lines += [f"  {k}: {json.dumps(v)}" for k, v in sorted(prof.fingerprint.items())]
    lines.append(f"steps: {prof.num_steps}")
    for c, name in CLASS_NAMES.items():
        m = cls == c
        if m.any():
            lines.append(f"  {name}: {int(m.sum())} steps, latency ms p50 {np.median(lat_ms[m]):.2f} "
                         f"p90 {np.percentile(lat_ms[m], 90):.2f} max {lat_ms[m].max():.2f}; "
                         f"tokens {int(s['num_tokens'][m].min())}-{int(s['num_tokens'][m].max())}, "
                         f"requests {int(s['num_reqs'][m].min())}-{int(s['num_reqs'][m].max())}")
    gaps = s["host_gap_us"][s["host_gap_us"] > 0] / 1000.0
    if len(gaps):
        lines.append(f"host gap between steps: {len(gaps)} recorded, ms p50 {np.median(gaps):.2f} "
                     f"p90 {np.percentile(gaps, 90):.2f}")
    ol = prof.output_lengths
    if len(ol):
        lines.append(f"output lengths: {len(ol)} (mean {ol.mean():.0f}, p50 {np.median(ol):.0f}, "
                     f"p90 {np.percentile(ol, 90):.0f}) from {prof.meta.get('output_lengths_source', '?')}")
    if heldout and prof.num_steps >= 50:
        lines.append("held-out oracle error (20% of steps, |predicted - actual| / actual):")
        for kind in ("grid2d", "feature"):
            for name, e in heldout_errors(prof, kind).items():
                lines.append(f"  {kind:8s} {name:19s} median {e['median']:5.1f}%  p90 {e['p90']:5.1f}%  (n={e['n']})")
    if png:
        _heatmap(prof, cls, png)
        lines.append(f"heatmap: {png}")
    return "\n".join(lines)


def _heatmap(prof: Profile, cls: np.ndarray, png: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = prof.steps
    tb = np.array([_bucket(int(x)) for x in s["num_tokens"]])
    rb = np.array([_bucket(int(x)) for x in s["num_reqs"]])
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, c in zip(axes, (PREFILL, DECODE)):
        m = cls == c
        if not m.any():
            ax.set_visible(False)
            continue
        t0, t1, r0, r1 = tb[m].min(), tb[m].max(), rb[m].min(), rb[m].max()
        grid = np.full((r1 - r0 + 1, t1 - t0 + 1), np.nan)
        for i in range(r0, r1 + 1):
            for j in range(t0, t1 + 1):
                sel = m & (rb == i) & (tb == j)
                if sel.any():
                    grid[i - r0, j - t0] = np.median(s["latency_us"][sel]) / 1000.0
        im = ax.imshow(grid, origin="lower", aspect="auto", cmap="viridis")
        fig.colorbar(im, ax=ax, label="median step latency (ms)")
        lo = lambda b: int(2 ** (b // 2 - 1) * (1.5 if b % 2 else 1)) if b else 0  # noqa: E731
        ax.set_xticks(range(0, t1 - t0 + 1, 2), [lo(b) for b in range(t0, t1 + 1, 2)], rotation=45)
        ax.set_yticks(range(0, r1 - r0 + 1, 2), [lo(b) for b in range(r0, r1 + 1, 2)])
        ax.set_xlabel("scheduled tokens (bucket lower edge)")
        ax.set_ylabel("running requests")
        ax.set_title(CLASS_NAMES[c])
    fp = prof.fingerprint
    fig.suptitle(f"{fp.get('device_name', '?')} / {fp.get('model', '?')}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


#: The step shapes the README's GPU profile table reports: decode batch x mean context,
#: then single-request prefill chunks (tokens).
TABLE_DECODE = ((1, 1024), (1, 4096), (32, 1024), (32, 4096), (128, 1024), (128, 4096), (256, 1024), (256, 4096))
TABLE_PREFILL = (512, 2048, 8192)


def synth_table(path: str, exact=None) -> str:
    """Step times (ms) the emulator will use for a profile at the README's table shapes.

    The value is the oracle's point estimate (``FeatureOracle.predict_us``) from the
    profile's table. ``exact``: optional callable StepShape -> ms (the calibrated AIC model
    itself), printed beside it with the oracle's % difference. Shapes beyond the profile's
    max_num_seqs / max_num_batched_tokens are marked n/a. Also prints the KV capacity.
    """
    from profiles.oracle import FeatureOracle
    from profiles.synth import StepShape, shape_features
    prof = Profile.load(path)
    fp = prof.fingerprint
    oracle = FeatureOracle(prof)
    mns, mnbt = int(fp.get("max_num_seqs", 1 << 30)), int(fp.get("max_num_batched_tokens", 1 << 30))
    label = prof.meta.get("label")
    lines = [label] if label else []
    kv_tokens = int(fp.get("num_kv_blocks", 0)) * int(fp.get("block_size", 0))
    lines.append(f"KV capacity: {kv_tokens:,} tokens ({fp.get('num_kv_blocks')} blocks of {fp.get('block_size')})")
    rows = [(f"decode b={b} ctx={c}" + (" (> KV pool)" if b * c > kv_tokens else ""),
             StepShape(0, 0, 0, b, b * c), b <= mns) for b, c in TABLE_DECODE]
    rows += [(f"prefill {p}", StepShape(1, p, 0, 0, 0), p <= mnbt) for p in TABLE_PREFILL]
    for name, s, ok in rows:
        if not ok:
            lines.append(f"  {name:24s} n/a (beyond max_num_seqs {mns} / max_num_batched_tokens {mnbt})")
            continue
        ms = oracle.predict_us(shape_features(s)) / 1000.0
        line = f"  {name:24s} {ms:8.2f} ms"
        if exact is not None:
            ex = exact(s)
            line += f"   (synth model {ex:.2f} ms, oracle {100 * (ms - ex) / ex:+.1f}%)"
        lines.append(line)
    return "\n".join(lines)
