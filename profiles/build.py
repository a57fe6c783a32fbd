"""Step trace (ProfilingExecutor JSON lines) -> profile.

A trace holds a ``fingerprint`` record, ``steps`` chunks (columns of step
features and ``latency_us``) and ``output_lengths`` chunks. ``build_profile``
concatenates them; ``warmup_steps`` drops the first steps of the run (JIT,
allocator and cache warm-up inflate them: BASELINES.md shows a first run
after start up to 3x slower).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from profiles.format import STEP_COLUMNS, Profile, ProfileError


def read_trace_columns(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, np.ndarray], np.ndarray]:
    """(fingerprint or None, every step column the trace holds, output lengths).

    Besides the profile's ``STEP_COLUMNS`` a trace may carry engine columns
    (``emu_executor.profiling.ENGINE_FIELDS``: submit time, preemptions,
    recomputed tokens...); a column missing from some chunks (an older
    recorder) is zero-filled there. Integer columns come back as int64.
    Lines that do not parse (a server killed mid-write) are skipped.
    """
    fp: dict[str, Any] | None = None
    chunks: list[tuple[list[str], list[list[int]]]] = []
    out_lens: list[int] = []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        t = rec.get("type")
        if t == "fingerprint":
            fp = rec["fingerprint"]
        elif t == "steps":
            chunks.append((rec["columns"], rec["rows"]))
        elif t == "output_lengths":
            out_lens.extend(rec["values"])
    names = list(dict.fromkeys(n for c, _ in chunks for n in c))
    cols: dict[str, list] = {n: [] for n in names}
    for cnames, rows in chunks:
        n = len(rows[0]) if rows else 0
        have = dict(zip(cnames, rows))
        for name in names:
            cols[name].extend(have.get(name, [0] * n))
    return fp, {k: np.asarray(v, dtype=np.int64) for k, v in cols.items()}, np.asarray(out_lens, dtype=np.uint32)


def read_trace(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """(fingerprint, step columns, output lengths) of a trace file: the profile's ``STEP_COLUMNS``
    in their dtypes (a column the trace lacks is zeros).

    Raises ProfileError if the trace has no fingerprint or no steps.
    """
    fp, cols, out_lens = read_trace_columns(path)
    if fp is None:
        raise ProfileError(f"{path}: trace has no fingerprint record (did the server finish starting?)")
    if not len(cols.get("latency_us", ())):
        raise ProfileError(f"{path}: trace has no steps")
    n = len(cols["latency_us"])
    arrays = {name: (cols[name] if name in cols else np.zeros(n, np.int64)).astype(dtype)
              for name, dtype, _ in STEP_COLUMNS}
    return fp, arrays, out_lens


def build_profile(traces: list[str | Path], warmup_steps: int | Sequence[int] = 50, meta: dict | None = None,
                  output_lengths: np.ndarray | None = None, min_natural: int = 100) -> Profile:
    """Merge one or more traces of the same engine into a profile.

    ``warmup_steps``: leading steps dropped from every trace, or one count per trace (a
    multi-start capture warms each server start up separately).
    ``output_lengths``: used when the traces recorded fewer than
    ``min_natural`` natural (EOS) endings, e.g. a dummy-weights capture whose
    EOS timing means nothing; ``meta['output_lengths_source']`` says which.
    Raises ProfileError when traces' fingerprints disagree on model or device.
    """
    warm = [warmup_steps] * len(traces) if isinstance(warmup_steps, int) else list(warmup_steps)
    if len(warm) != len(traces):
        raise ProfileError(f"{len(warm)} warm-up step counts for {len(traces)} traces")
    fps, parts, lens = [], [], []
    for t, w in zip(traces, warm):
        fp, arr, ol = read_trace(t)
        fps.append(fp)
        parts.append({k: v[w:] for k, v in arr.items()})
        lens.append(ol)
    for fp in fps[1:]:
        for k in ("model_dims", "device_name", "dtype", "tensor_parallel_size"):
            if fp.get(k) != fps[0].get(k):
                raise ProfileError(f"traces disagree on {k}: {fps[0].get(k)!r} vs {fp.get(k)!r}")
    steps = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    natural = np.concatenate(lens) if lens else np.zeros(0, np.uint32)
    meta = dict(meta or {})
    if len(natural) >= min_natural or output_lengths is None:
        out, meta["output_lengths_source"] = natural, "natural EOS endings during capture"
    else:
        out, meta["output_lengths_source"] = np.asarray(output_lengths), "dataset completions (tokenized)"
    meta.update(traces=[str(t) for t in traces], warmup_steps=warmup_steps)
    return Profile(fps[0], steps, out, meta)
