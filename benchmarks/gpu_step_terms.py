"""Why the GPU step-time model has the terms it has: where raw aiconfigurator-core (AIC) is off, term by term.

1. GEMMs: AIC's GEMM tables on an RTX PRO 6000 against LLMServingSim's measured per-operator device
   times (qkv_proj + o_proj + gate_up_proj + down_proj of one Llama-3.1-8B layer, eager, per call), at
   TP1 and at TP2 per-rank shapes, by tokens.
2. Whole decode steps on the RTX PRO 6000 (LLMServingSim's step table, full CUDA graphs): the measured
   step against AIC's sum, with AIC's GEMM, attention and LM-head parts: what is left over grows with
   batch x context (attention) on top of a constant (host work).
3. The same for Dynamo's H200 Llama-3.1-8B FP8 decode ITLs.

    python benchmarks/gpu_step_terms.py

Needs the synth extra (aiconfigurator-core).
"""
from __future__ import annotations

import csv
import logging

import numpy as np

from _common import ROOT
from profiles.calibration import load_h200_dynamo, load_rtx_llmservingsim
from profiles.stepmodel import _engine

REF = ROOT / "profiles" / "reference"


def gemm_check() -> None:
    print("1. GEMMs per layer, RTX PRO 6000, Llama-3.1-8B (us): AIC vs measured per-op device time")
    for tp, fname in ((1, "rtxpro6000_llama-3.1-8b_tp1_dense-eager.csv"),
                      (2, "rtxpro6000_llama-3.1-8b_tp2-per-rank_dense-eager.csv")):
        meas: dict[str, dict[int, float]] = {}
        with open(REF / fname) as f:
            for r in csv.DictReader(f):
                meas.setdefault(r["layer"], {})[int(r["tokens"])] = float(r["time_us"])
        h = _engine("rtx_pro_6000_server", "0.24.0", "meta-llama/Meta-Llama-3.1-8B", "bf16", tp)
        ratios = []
        for t in (1, 8, 32, 128, 256, 512, 1024, 2048):
            ops = {o[0]: o[1] for o in h.decode_step_per_op(t, 16, 2)}
            aic = sum(ops[k] for k in ("generation_qkv_gemm", "generation_proj_gemm", "generation_gate_ffn1_gemm",
                                       "generation_ffn2_gemm")) / 32 * 1000
            real = sum(meas[k][t] for k in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"))
            ratios.append(real / aic)
            print(f"   TP{tp} tokens {t:5d}: AIC {aic:7.1f}  measured {real:7.1f}  measured/AIC {real / aic:.2f}")
        print(f"   TP{tp}: measured/AIC {min(ratios):.2f}-{max(ratios):.2f}")


def step_check(name: str, obs) -> None:
    print(f"\n{name}: measured decode step vs AIC's parts (ms)")
    rows = []
    for o in obs:
        if o.phase != "decode" or o.path:
            continue
        p = o.parts[0]
        aic = p.gemm + p.attn + p.comm
        rows.append((o.shape.decode_reqs, o.shape.decode_kv // o.shape.decode_reqs, o.real_ms, aic, p.gemm, p.attn))
    for b, ctx, real, aic, g, a in rows[:: max(1, len(rows) // 14)]:
        print(f"   b={b:4d} ctx={ctx:5d}: measured {real:7.2f}  AIC {aic:7.2f} ({100 * (aic / real - 1):+5.1f} %)  "
              f"left over {real - aic:6.2f}  (AIC GEMM+rest {g:6.2f}, attention {a:6.2f})")
    b, ctx, real, aic, g, a = map(np.array, zip(*rows))
    X = np.column_stack([np.ones_like(real), b, a])
    coef, *_ = np.linalg.lstsq(X, real - g, rcond=None)
    print(f"   measured - AIC non-attention ~ {coef[0]:.2f} ms + {coef[1] * 1000:.1f} us x requests + "
          f"{coef[2]:.2f} x AIC attention (least squares over {len(rows)} steps)")


def main() -> None:
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    gemm_check()
    step_check("2. RTX PRO 6000, Llama-3.1-8B bf16 (LLMServingSim step table)", load_rtx_llmservingsim())
    step_check("3. H200, Llama-3.1-8B FP8 (Dynamo decode ITL)", load_h200_dynamo())


if __name__ == "__main__":
    main()
