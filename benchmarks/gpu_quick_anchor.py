"""A quick capture's method, tried on every public GPU step table: fit on a few designed shapes, score the rest.

For each step-level reference configuration (RTX PRO 6000 Llama-3.1-8B bf16; H200 Llama-3.1-8B FP8),
the steps a quick capture would record (a designed subset, :data:`QUICK`: a few decode batches at a
short and a long context, a few prefill chunks, a couple of mixed steps) anchor the step-time model
(:func:`profiles.stepmodel.anchor`, from a base fitted *without* that configuration), and every other
step of the table scores it. Beside it: the base model alone (what ``synth`` gives a user without the
GPU), raw AIC, and AIC's own correction from observed iterations (``tune_with_fpms``) fed the same steps.

    python benchmarks/gpu_quick_anchor.py

Needs the synth extra (aiconfigurator-core).
"""
from __future__ import annotations

import json
import logging

import numpy as np

from _common import ROOT  # noqa: F401  (puts the repo on sys.path)
from profiles.calibration import load_h200_dynamo, load_rtx_llmservingsim, observations
from profiles.stepmodel import abs_errors, anchor, fit, summarize

def _tuned_aic(obs_train, obs_test, dep) -> dict[str, list[float]]:
    """|error| % of AIC's forward-pass model after ``tune_with_fpms`` on the training steps."""
    from aiconfigurator_core.sdk import RustForwardPassPerfModel
    from aiconfigurator_core.sdk import engine as aic_engine
    from profiles.synth import hardware
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    hw = hardware(dep.hardware)
    m = RustForwardPassPerfModel.from_native({
        "schema_version": aic_engine.ENGINE_CONFIG_SCHEMA_VERSION, "model_name": dep.model,
        "system_name": hw.aic_system, "backend": "vllm", "backend_version": hw.aic_version, "tp_size": dep.tp,
        "pp_size": 1,
        "weight_dtype": "fp8" if dep.dtype == "fp8" else None, "kv_cache_dtype": None})

    def fpm(o, wall=None):
        s = o.shape
        d = {"version": 1, "scheduled_requests": {
            "num_prefill_requests": s.prefill_reqs, "sum_prefill_tokens": s.prefill_tokens,
            "sum_prefill_kv_tokens": s.prefill_kv, "num_decode_requests": s.decode_reqs,
            "sum_decode_kv_tokens": s.decode_kv}}
        if wall is not None:
            d["wall_time"] = wall
        return d

    m.tune_with_fpms([[fpm(o, o.real_ms / 1000.0)] for o in obs_train])
    out: dict[str, list[float]] = {}
    for o in obs_test:
        pred = m.estimate_forward_pass_time_ms(fpm(o))
        out.setdefault(o.phase, []).append(abs(pred - o.real_ms) / o.real_ms * 100.0)
    return out


def main() -> None:
    everything = observations()
    tables = {"rtxpro6000-llmservingsim": load_rtx_llmservingsim(), "h200-dynamo": load_h200_dynamo()}
    rows = []
    for name, obs in tables.items():
        obs = [o for o in obs if not o.path]  # whole steps only (TTFTs hold the request path)
        dep = obs[0].dep
        base = fit([o for o in everything if o.dep != dep])
        quick = [o for o in obs if _pick(name, o)]
        rest = [o for o in obs if not _pick(name, o)]
        anchored = anchor(base, quick)
        res = {"base (synth, no capture)": summarize(abs_errors(base, rest)),
               "anchored on the quick set": summarize(abs_errors(anchored, rest)),
               "raw AIC": summarize(abs_errors(base, rest, raw=True))}
        try:
            res["AIC tune_with_fpms on the quick set"] = summarize(_tuned_aic(quick, rest, dep))
        except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported, not fatal
            res["AIC tune_with_fpms on the quick set"] = {"error": str(e)[:120]}
        print(f"\n{dep.label}: {len(quick)} quick steps, scored on the other {len(rest)}")
        for k, v in res.items():
            print(f"  {k:38s} " + ", ".join(f"{ph} {e['median']:.1f} / {e['p90']:.1f} %" for ph, e in v.items()
                                             if isinstance(e, dict)) + (f" {v['error']}" if "error" in v else ""))
        print("  anchored terms: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in
                                                 anchored.to_dict().items() if k in ("host_ms", "per_req_ms")})
              + f", gemm {anchored.gemm[dep.hardware]:.3f}, attn {anchored.attn[dep.hardware]:.3f}")
        rows.append((dep.label, res))


def _pick(name: str, o) -> bool:
    s = o.shape
    ctx = s.decode_kv // max(s.decode_reqs, 1)
    key = (o.phase, s.decode_reqs, ctx if s.decode_reqs else 0, s.prefill_tokens)
    return key in QUICK_KEYS[name]


#: The steps a quick capture records, per table: (phase, decode batch, decode context, prefill chunk).
QUICK_KEYS = {
    "rtxpro6000-llmservingsim": {("decode", 1, 1024, 0), ("decode", 16, 1024, 0), ("decode", 64, 1024, 0),
                                 ("decode", 128, 1024, 0), ("decode", 8, 8192, 0), ("decode", 32, 8192, 0),
                                 ("prefill", 0, 0, 16), ("prefill", 0, 0, 128), ("prefill", 0, 0, 256),
                                 ("mixed", 32, 1024, 32), ("mixed", 32, 1024, 128)},
    "h200-dynamo": {("decode", 1, 350, 0), ("decode", 263, 350, 0), ("decode", 49, 2997, 0), ("decode", 145, 2997, 0),
                    ("decode", 19, 8291, 0), ("decode", 73, 8291, 0), ("decode", 12, 13585, 0),
                    ("decode", 56, 13585, 0)},
}


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
