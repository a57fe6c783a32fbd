"""AIC's MoE kernel time against a measured fused-MoE table: the MoE term of synthesized profiles.

The step-time model (``profiles/stepmodel.py``) takes an MoE layer's cost from aiconfigurator-core's
kernel tables and scales it with the GEMM factor fitted on dense models; no whole MoE step was in the
fit. This prints what can be checked: AIC's per-layer MoE time for Qwen3-30B-A3B (bf16, TP1) on an
RTX PRO 6000 against LLMServingSim's measured fused-MoE block on that GPU
(``profiles/reference/rtxpro6000_qwen3-30b-a3b_tp1_moe-eager.csv``, eager, one layer per call, EP1),
by tokens in the batch. The measurement fixes the number of activated experts; a real batch of n
tokens routed top-8 of 128 activates ``E x (1 - (1 - k/E)^n)`` experts on average (uniform routing,
:func:`profiles.oracle.expected_experts`), so the measured time is interpolated (log-log) at that
count. AIC's side: ``generation_moe`` of a decode step of n requests (n <= 256) and ``context_moe`` of a
prefill of n tokens (n >= 256), divided by the 48 MoE layers; plus the step model's GEMM factor for
this GPU, as synthesized profiles apply it.

    python benchmarks/moe_block_error.py

Needs the synth extra (aiconfigurator-core). Prints a table and the median / max |error|.
"""
from __future__ import annotations

import csv
import logging
import math

import numpy as np

from _common import ROOT
from profiles.oracle import expected_experts
from profiles.stepmodel import _engine, _split, shipped_model

TABLE = ROOT / "profiles" / "reference" / "rtxpro6000_qwen3-30b-a3b_tp1_moe-eager.csv"
E, K, LAYERS = 128, 8, 48


def measured_us(rows: list[dict], tokens: int, experts: float) -> float:
    """Measured per-call time (us) at ``tokens``, interpolated log-log in activated experts."""
    pts = sorted((int(r["activated_experts"]), float(r["time_us"])) for r in rows
                 if r["ep"] == "1" and int(r["tokens"]) == tokens)
    xs = np.log([p[0] for p in pts])
    ys = np.log([p[1] for p in pts])
    return float(math.exp(np.interp(math.log(max(experts, pts[0][0])), xs, ys)))


def moe_ms(ops) -> float:
    return sum(ms for name, ms, *_ in ops if name.endswith("_moe"))


def main() -> int:
    logging.disable(logging.WARNING)
    rows = list(csv.DictReader(TABLE.open()))
    h = _engine("rtx_pro_6000_server", "0.24.0", "Qwen/Qwen3-30B-A3B", "bf16", 1)
    gemm = shipped_model().factors("rtx-pro-6000")[0]
    print("Qwen3-30B-A3B bf16 TP1, RTX PRO 6000: fused-MoE block per layer (us)")
    print(f"{'tokens':>7} {'experts':>8} {'measured':>9} {'AIC':>8} {'err':>7} {'x gemm':>8} {'err':>7}  AIC op")
    errs_raw, errs_cal = [], []
    for n in sorted({int(r["tokens"]) for r in rows}):
        ex = min(expected_experts(n, E, K), E)
        meas = measured_us(rows, n, ex)
        ops = []
        if n <= 256:
            ops.append(("generation", moe_ms(h.decode_step_per_op(n, 1024, 2)) / LAYERS * 1000))
        if n >= 256:
            shared, _, _ = h.mixed_step_breakdown_per_op(n, 0, n, 2, 0)
            ops.append(("context", moe_ms(shared) / LAYERS * 1000))
        for kind, aic in ops:
            e_raw, e_cal = (aic - meas) / meas * 100, (aic * gemm - meas) / meas * 100
            errs_raw.append(abs(e_raw))
            errs_cal.append(abs(e_cal))
            print(f"{n:>7} {ex:>8.1f} {meas:>9.1f} {aic:>8.1f} {e_raw:>+6.1f}% {aic * gemm:>8.1f} "
                  f"{e_cal:>+6.1f}%  {kind}")
    print(f"|error| AIC raw: median {np.median(errs_raw):.1f} %, max {max(errs_raw):.1f} %; "
          f"x GEMM factor {gemm:.3f}: median {np.median(errs_cal):.1f} %, max {max(errs_cal):.1f} % "
          f"({len(errs_raw)} points)")
    # the split the step model uses must put the MoE op in its GEMM term, not attention or comm
    g, a, c = _split(h.decode_step_per_op(32, 1024, 2))
    print(f"decode b=32 ctx=1024 split: gemm+moe {g:.2f} ms, attention {a:.2f} ms, comm {c:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
