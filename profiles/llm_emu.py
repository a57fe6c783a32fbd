"""Convert LLM-Emu ``serving_step_cycle_2d`` JSON packs to emugate profiles.

An LLM-Emu pack (arXiv 2605.00616, artifact format) is a JSON object with
``version``, ``gpu_model``, ``model_name``, ``bucketing``, ``model_config``,
and two lists, ``prefill_2d_distribution`` and ``decode_2d_distribution``
(also accepted: ``decode_distribution``), of cells
``{"tt": total scheduled tokens, "conc": running requests, "num_samples": n,
"samples": [latency in us, ...]}``.

Each sample becomes one step row: num_tokens = tt, num_reqs = conc; for
prefill cells prefill_tokens = tt - (conc - 1) (one prefill among decodes,
the typical mixed step), decode cells have prefill_tokens 0 and decode_reqs
= conc. Context features are unknown and stay 0, so FeatureOracle reduces to
the grid part on converted packs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from profiles.format import Profile, ProfileError


def convert_llm_emu(path: str | Path) -> Profile:
    """Read an LLM-Emu pack. Raises ProfileError when the expected lists are missing."""
    pack = json.loads(Path(path).read_text())
    pre = pack.get("prefill_2d_distribution")
    dec = pack.get("decode_2d_distribution", pack.get("decode_distribution"))
    if pre is None or dec is None:
        raise ProfileError(f"{path}: not an LLM-Emu serving_step_cycle_2d pack "
                           "(needs prefill_2d_distribution and decode_2d_distribution)")
    rows = []
    for cells, is_prefill in ((pre, True), (dec, False)):
        for cell in cells:
            tt, conc = int(cell["tt"]), max(1, int(cell["conc"]))
            for us in cell.get("samples", []):
                pt = max(1, tt - (conc - 1)) if is_prefill else 0
                rows.append((tt, conc, pt, conc - (1 if is_prefill else 0), 1 if is_prefill else 0, 0, 0,
                             max(1, int(round(us)))))
    if not rows:
        raise ProfileError(f"{path}: pack holds no samples")
    arr = np.array(rows, dtype=np.int64)
    names = ["num_tokens", "num_reqs", "prefill_tokens", "decode_reqs", "prefill_reqs", "context_tokens",
             "attn_work", "latency_us"]
    steps = {n: arr[:, i] for i, n in enumerate(names)}
    mc = pack.get("model_config", {}) or {}
    fp = {"device_name": pack.get("gpu_model", "unknown"), "model": pack.get("model_name", "unknown"),
          "source": "llm-emu", "llm_emu_version": pack.get("version"), "bucketing": pack.get("bucketing"),
          "model_config": mc}
    for k in ("block_size", "num_kv_blocks", "max_num_batched_tokens", "max_num_seqs", "tensor_parallel_size"):
        if k in mc:
            fp[k] = mc[k]
    return Profile(fp, steps, np.zeros(0, np.uint32), {"converted_from": str(path)})


def to_llm_emu_json(prof: Profile) -> dict:
    """The inverse layout (LLM-Emu-style JSON of the same samples), for size comparisons."""
    from profiles.oracle import _bucket
    s = prof.steps
    cells: dict[tuple[bool, int, int], list[int]] = {}
    for tt, conc, pt, us in zip(s["num_tokens"].tolist(), s["num_reqs"].tolist(),
                                s["prefill_tokens"].tolist(), s["latency_us"].tolist()):
        cells.setdefault((pt > 0, _bucket(tt), _bucket(conc)), []).append(us)
    out = {"version": 1, "gpu_model": prof.fingerprint.get("device_name"),
           "model_name": prof.fingerprint.get("model"), "bucketing": "log2x2",
           "prefill_2d_distribution": [], "decode_2d_distribution": [], "model_config": {}}
    for (is_pre, tb, cb), samples in cells.items():
        key = "prefill_2d_distribution" if is_pre else "decode_2d_distribution"
        out[key].append({"tt": tb, "conc": cb, "num_samples": len(samples), "samples": samples})
    return out
