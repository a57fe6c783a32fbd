"""The real GPU measurements a synthesized profile's step times are fitted on and judged against.

Reference data (``profiles/reference/``, provenance in its README), each tied to one configuration
(GPU x model x TP x dtype, :class:`profiles.stepmodel.Deployment`):

* LLMServingSim's step table: RTX PRO 6000, Llama-3.1-8B bf16, TP1 (whole steps, with their
  CUDA-graph mode);
* Dynamo's planner profile: H200, Llama-3.1-8B FP8, TP1 (decode ITL; prefill TTFT, which also holds
  the request path: those points get a per-dataset path term);
* InferenceX: Llama-3.1-70B FP8 on H100 (TP2, 4, 8), H200 and B200 (TP1, 2, 4, 8), client TPOT at
  concurrency 4-64 for random 1k/1k, 1k/8k and 8k/1k (serving level: each TPOT is modelled as the
  mean step of a closed loop, :func:`load_inferencex`).

:func:`observations` turns them into :class:`profiles.stepmodel.Observation` rows;
:func:`profiles.stepmodel.cross_validate` scores every configuration with a fit that never saw it.
:class:`Calibration` is the earlier model (``step = c0 + f_phase x AIC``), kept to put its numbers
beside the step model's on the same configurations.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from profiles.synth import StepShape

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
PHASES = ("decode", "prefill", "mixed")
LLAMA_8B, LLAMA_70B = "meta-llama/Meta-Llama-3.1-8B", "meta-llama/Meta-Llama-3.1-70B"


def _dep(hw: str, model: str, dtype: str, tp: int, max_num_seqs: int):
    from profiles.stepmodel import Deployment
    layers, hidden = (32, 4096) if model == LLAMA_8B else (80, 8192)
    return Deployment(hw, model, dtype, tp, max_num_seqs, layers, hidden)


def load_rtx_llmservingsim() -> list:
    """LLMServingSim's per-step table, vLLM 0.28, RTX PRO 6000 Blackwell Server, Llama-3.1-8B bf16, TP1.

    Each row is one engine step: ``n_decode`` decodes at ``kv_decode`` context each plus a
    ``prefill_chunk`` (a prefill chunk is taken with no cached prefix), in the CUDA-graph mode the
    row names (``full``, ``piecewise``, ``none``). max_num_seqs 256.
    """
    from profiles.stepmodel import AicBreakdown, Observation
    dep = _dep("rtx-pro-6000", LLAMA_8B, "bf16", 1, 256)
    aic = AicBreakdown(dep)
    out = []
    with open(REFERENCE_DIR / "rtxpro6000_llama-3.1-8b-bf16_llmservingsim-step.csv") as f:
        for r in csv.DictReader(f):
            nd, kv, pc = int(r["n_decode"]), int(r["kv_decode"]), int(r["prefill_chunk"])
            s = StepShape(1 if pc else 0, pc, 0, nd, nd * kv)
            out.append(Observation(dep, s.phase, (aic.parts(s, graph=r["branch"]),), (1.0,),
                                   float(r["step_us"]) / 1000.0, "rtxpro6000-llmservingsim", shape=s))
    return out


def load_h200_dynamo(max_num_seqs: int = 1024, max_num_batched_tokens: int = 8192) -> list:
    """Dynamo's H200 Llama-3.1-8B FP8 planner profile (decode ITL and prefill TTFT), TP1.

    Decode: running requests = kv_usage x max_kv_tokens / context (the file's own definition);
    points whose batch exceeds ``max_num_seqs`` (vLLM's cap on H200, 1024) are left out. Prefill:
    one request of N prompt tokens, chunked at ``max_num_batched_tokens`` (vLLM's H200 default),
    plus the request path (``path``).
    """
    from profiles.stepmodel import AicBreakdown, Observation
    dep = _dep("h200", LLAMA_8B, "fp8", 1, max_num_seqs)
    aic = AicBreakdown(dep)
    out, name = [], "h200-dynamo"
    with open(REFERENCE_DIR / "h200_llama-3.1-8b-fp8_dynamo-decode.csv") as f:
        for r in csv.DictReader(f):
            ctx = int(r["context_tokens"])
            b = max(1, round(float(r["kv_usage"]) * int(r["max_kv_tokens"]) / ctx))
            if b > max_num_seqs:
                continue
            s = StepShape(0, 0, 0, b, b * ctx)
            out.append(Observation(dep, "decode", (aic.parts(s),), (1.0,), float(r["itl_ms"]), name, shape=s))
    with open(REFERENCE_DIR / "h200_llama-3.1-8b-fp8_dynamo-prefill.csv") as f:
        for r in csv.DictReader(f):
            n, done, parts = int(r["prompt_tokens"]), 0, []
            while done < n:
                c = min(max_num_batched_tokens, n - done)
                parts.append(aic.parts(StepShape(1, c, done, 0, 0)))
                done += c
            out.append(Observation(dep, "prefill", tuple(parts), (1.0,) * len(parts), float(r["ttft_ms"]), name,
                                   path=True))
    return out


#: InferenceX GPU names -> emugate hardware names.
_IX_GPU = {"H100": "h100-sxm", "H200": "h200", "B200": "b200"}


def tpot_steps(aic, c: int, isl: int, osl: int, max_num_batched_tokens: int) -> tuple[tuple, tuple[float, ...]]:
    """A closed loop's mean step as a weighted sum of steps: (AicParts..., weights).

    At concurrency ``c`` with ``isl`` prompt and ``osl`` output tokens, each step decodes ``c``
    requests (mean context ``isl + osl/2``), and per step ``c / osl`` new prompts are prefilled in
    chunks of ``max_num_batched_tokens - c`` riding on a decode batch (chunked prefill). So the mean
    step = decode step + (c / osl) x sum over a prompt's chunks of (mixed step - decode step): what a
    request's TPOT measures, since its decode steps share the engine with the others' prefills.
    """
    ctx = isl + osl // 2
    dec = aic.parts(StepShape(0, 0, 0, c, c * ctx))
    parts, weights = [dec], [1.0]
    room, done = max(1, max_num_batched_tokens - c), 0
    while done < isl:
        chunk = min(room, isl - done)
        parts.append(aic.parts(StepShape(1, chunk, done, c, c * ctx)))
        weights.append(c / osl)
        parts.append(dec)
        weights.append(-c / osl)
        done += chunk
    return tuple(parts), tuple(weights)


def load_inferencex() -> list:
    """InferenceX's vLLM TPOT points for Llama-3.1-70B FP8 (H100 TP2-8, H200 and B200 TP1-8), as
    closed-loop mean steps (:func:`tpot_steps`), one configuration per (GPU, TP). TensorRT-LLM rows
    are left out; so are points whose batch x context exceeds the KV pool (they preempt)."""
    from profiles.stepmodel import AicBreakdown, Observation
    from profiles.synth import ModelDims, hardware, kv_capacity, vllm_scheduler_defaults
    from profiles.assets import resolve_model_dir
    dims = ModelDims.from_config(resolve_model_dir("llama-3.1-70b"))
    out, aics = [], {}
    with open(REFERENCE_DIR / "inferencex_llama-3.1-70b-fp8_tpot-ttft_by-tp.csv") as f:
        for r in csv.DictReader(f):
            if r["engine"] != "vLLM":
                continue
            hw, tp = _IX_GPU[r["gpu"]], int(r["tp"])
            mnbt, mns = vllm_scheduler_defaults(hardware(hw))
            key = (hw, tp)
            if key not in aics:
                kv = kv_capacity(hardware(hw), dims, "fp8", tp, 0.9, mnbt, mns)
                aics[key] = (AicBreakdown(_dep(hw, LLAMA_70B, "fp8", tp, mns)), kv.tokens)
            aic, kv_tokens = aics[key]
            c, isl, osl = int(r["concurrency"]), int(r["input_len"]), int(r["output_len"])
            if c * (isl + osl) > kv_tokens:
                continue
            parts, weights = tpot_steps(aic, c, isl, osl, mnbt)
            out.append(Observation(aic.dep, "tpot", parts, weights, float(r["tpot_us"]) / 1000.0,
                                   f"inferencex-{hw}-tp{tp}"))
    return out


def observations() -> list:
    """Every reference observation (needs aiconfigurator-core for the AIC split of each step)."""
    return load_rtx_llmservingsim() + load_h200_dynamo() + load_inferencex()


@dataclass
class Calibration:
    """``step_ms = c0_ms + factor[phase] x aic_ms`` (see module docstring).

    Attributes:
        c0_ms: per-step overhead, ms.
        factor: phase -> multiplicative factor on AIC's estimate.
        fitted_on: names of the datasets it was fitted on ([] for identity).
        errors: optional {dataset: {phase: {"median", "p90", "n"}}} measured on data it
            did not see (filled by :func:`cross_validate` users, stored in profiles).
    """

    c0_ms: float = 0.0
    factor: dict[str, float] = field(default_factory=lambda: {p: 1.0 for p in PHASES})
    fitted_on: list[str] = field(default_factory=list)
    errors: dict = field(default_factory=dict)

    @classmethod
    def identity(cls) -> "Calibration":
        """Raw AIC (no correction)."""
        return cls()

    def apply(self, aic_ms: float, phase: str) -> float:
        """Calibrated step time, ms (0 stays 0: an empty step costs nothing)."""
        if aic_ms <= 0:
            return 0.0
        return self.c0_ms + self.factor.get(phase, 1.0) * aic_ms

    def to_dict(self) -> dict:
        return {"model": "step_ms = c0_ms + factor[phase] * aic_ms", "c0_ms": round(self.c0_ms, 4),
                "factor": {k: round(v, 4) for k, v in self.factor.items()}, "fitted_on": self.fitted_on,
                "errors": self.errors}

    def predict(self, o) -> float:
        """The old model's figure for an observation (:class:`profiles.stepmodel.Observation`)."""
        return sum(w * self.apply(p.gemm + p.attn + p.comm, p.phase) for p, w in zip(o.parts, o.weights))


#: The calibration synthesized profiles used before the step-time model: fitted on the H200 Dynamo and
#: RTX PRO 6000 step data (README history); kept to put its numbers beside the model's.
OLD_CALIBRATION = Calibration(0.0, {"decode": 1.21, "prefill": 1.06, "mixed": 1.33},
                              ["h200-dynamo", "rtx-llmservingsim"])


def old_errors(obs) -> dict[str, dict[str, list[float]]]:
    """|error| % of :data:`OLD_CALIBRATION` per configuration label and phase (TTFT points take their
    path term from the dataset's smallest prompt, as for the step model)."""
    from profiles.stepmodel import Observation  # noqa: F401  (the type of obs)
    out: dict[str, dict[str, list[float]]] = {}
    by_ds: dict[str, list] = {}
    for o in obs:
        by_ds.setdefault(o.dataset, []).append(o)
    for ds_obs in by_ds.values():
        ttft = [o for o in ds_obs if o.path]
        skip, path_ms = None, 0.0
        if ttft:
            skip = min(ttft, key=lambda o: o.real_ms)
            path_ms = skip.real_ms - OLD_CALIBRATION.predict(skip)
        for o in ds_obs:
            if o is skip:
                continue
            pred = OLD_CALIBRATION.predict(o) + (path_ms if o.path else 0.0)
            out.setdefault(o.dep.label, {}).setdefault(o.phase, []).append(abs(pred - o.real_ms) / o.real_ms * 100)
    return out


def default_model(obs=None):
    """The step-time model synthesized profiles use: fitted on every reference observation, with the
    expected error bands (:func:`profiles.stepmodel.error_bands`) from the cross-validation by
    configuration attached (``errors``)."""
    from profiles.stepmodel import cross_validate, error_bands, fit
    obs = obs if obs is not None else observations()
    model = fit(obs)
    model.errors = error_bands(cross_validate(obs))
    return model


def crossval_rows(obs=None) -> list[dict]:
    """The cross-validation by configuration (:func:`profiles.stepmodel.cross_validate`) with the earlier
    calibration's |error| beside each row (``old_median``, ``old_p90``; None where it has no figure)."""
    from profiles.stepmodel import cross_validate
    obs = obs if obs is not None else observations()
    old = old_errors(obs)
    rows = cross_validate(obs)
    for r in rows:
        o = old.get(r["config"], {}).get(r["phase"], [])
        r["old_median"] = float(np.median(o)) if o else None
        r["old_p90"] = float(np.percentile(o, 90)) if o else None
    return rows


def crossval_markdown(rows: list[dict]) -> str:
    """Markdown of :func:`crossval_rows`: per configuration and step class, median / p90 |error| % of raw AIC,
    of the earlier calibration (in-sample on the two step datasets it was fitted on) and of the step model
    fitted without that configuration."""
    lines = ["| configuration | class | points | raw AIC | earlier calibration | step model, fitted without it |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        tag = "" if r["gpu_measured"] else " (GPU unseen)"
        olds = f"{r['old_median']:.1f} / {r['old_p90']:.1f} %" if r.get("old_median") is not None else "n/a"
        lines.append(f"| {r['config']}{tag} | {r['phase']} | {r['n']} | {r['raw_median']:.1f} / {r['raw_p90']:.1f} % "
                     f"| {olds} | {r['model_median']:.1f} / {r['model_p90']:.1f} % |")
    return "\n".join(lines)


def calibration_table(obs=None) -> str:
    """:func:`crossval_markdown` of the reference observations, and the terms of the fit on all of them."""
    from profiles.stepmodel import fit
    obs = obs if obs is not None else observations()
    m = fit(obs)
    return (crossval_markdown(crossval_rows(obs)) + "\n\nMedians / p90 of |error|. The fit on everything (what "
            "`synth` uses): " + ", ".join(f"{k} {v}" for k, v in m.to_dict().items()
                                          if k not in ("model", "fitted_on", "errors")))
