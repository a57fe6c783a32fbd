"""Anchored profiles: a quick capture's few measured steps pin the step-time model for one GPU deployment.

A full capture needs every step shape a workload reaches, pooled over several server starts
(tens of minutes). A quick capture (``emugate profile capture --quick``) records ~120 steps of a
designed set of shapes (:data:`emugate.capture.QUICK_PLAN`). On a GPU that aiconfigurator-core has
kernel tables for, those steps re-fit the terms of the step-time model that are specific to the
deployment (:func:`profiles.stepmodel.anchor`: host work per step and per request, the GPU's GEMM and
attention factors), and the profile is then synthesized over the full shape distribution with the
anchored model, labelled ANCHORED with its measured residuals. (Measured on the public step tables,
``python benchmarks/gpu_quick_anchor.py``: 8-11 quick steps bring a configuration from 16-26 % median
decode error to 2.6-4.6 %.)
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from profiles.format import Profile
from profiles.stepmodel import (AicBreakdown, Deployment, Observation, StepModel, abs_errors, anchor,
                                shipped_model, summarize)
from profiles.synth import ModelDims, SynthSpec, hardware, shape_from_features, synthesize, vllm_scheduler_defaults


def observations_from_steps(steps: dict[str, np.ndarray], dep: Deployment, graph: str | None = None
                            ) -> list[Observation]:
    """One observation per recorded step (trace or profile columns; ``latency_us`` the measured time)."""
    aic = AicBreakdown(dep)
    out = []
    for i in range(len(steps["latency_us"])):
        s = shape_from_features(*(int(steps[c][i]) for c in ("num_reqs", "prefill_tokens", "decode_reqs",
                                                                 "prefill_reqs", "context_tokens", "attn_work")))
        if s.num_tokens == 0 or steps["latency_us"][i] <= 0:
            continue
        out.append(Observation(dep, s.phase, (aic.parts(s, graph=graph),), (1.0,),
                               float(steps["latency_us"][i]) / 1000.0, "quick-capture", shape=s))
    return out


def loo_errors(base: StepModel, obs: Sequence[Observation], max_folds: int = 40, seed: int = 0
               ) -> dict[str, dict[str, float]]:
    """Leave-one-out |error| % of anchoring on ``obs`` (each step predicted by the model anchored on the
    others; at most ``max_folds`` steps, seeded), per step class."""
    obs = list(obs)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(obs), min(max_folds, len(obs)), replace=False)
    errs: dict[str, list[float]] = {}
    for i in idx:
        m = anchor(base, [o for j, o in enumerate(obs) if j != i])
        for ph, v in abs_errors(m, [obs[i]]).items():
            errs.setdefault(ph, []).extend(v)
    return summarize(errs)


def anchored_profile(steps: dict[str, np.ndarray], spec: SynthSpec, base: StepModel | None = None,
                     output_lengths: np.ndarray | None = None) -> tuple[Profile, StepModel]:
    """Synthesize ``spec``'s profile with the step-time model anchored on the measured ``steps``.

    Returns (profile, anchored model). The profile's metadata says ANCHORED, how many steps pinned
    it, and its residuals: in-sample and leave-one-out |error| per step class.

    Raises:
        ValueError: no usable steps.
        ImportError / RuntimeError: see :class:`profiles.stepmodel.AicBreakdown`.
    """
    base = base or shipped_model()
    hw = hardware(spec.hardware)
    dims = ModelDims.from_config(spec.model_dir)
    mns = spec.max_num_seqs or vllm_scheduler_defaults(hw)[1]
    dep = Deployment(hw.name, spec.aic_model or spec.model_dir, spec.dtype, spec.tp, mns, dims.num_layers,
                     dims.hidden_size)
    obs = observations_from_steps(steps, dep)
    if not obs:
        raise ValueError("the quick capture recorded no usable steps")
    model = anchor(base, obs)
    insample, loo = summarize(abs_errors(model, obs)), loo_errors(base, obs)
    prof, _ = synthesize(spec, model, output_lengths)
    band = ", ".join(f"{ph} median {e['median']:.1f} % / p90 {e['p90']:.1f} %" for ph, e in loo.items())
    prof.meta.update({
        "anchored": {"steps": len(obs), "residuals_in_sample": insample, "residuals_leave_one_out": loo,
                     "terms": {"host_ms": model.host_ms, "per_req_ms": model.per_req_ms,
                               "gemm": model.gemm[hw.name], "attn": model.attn[hw.name]}},
        "label": (f"ANCHORED: step latencies synthesized from aiconfigurator-core's kernel tables with the step-time "
                  f"model pinned by {len(obs)} steps measured on this GPU (a quick capture); leave-one-out |error| "
                  f"on those steps: {band}"),
        "coverage_warnings": [],
    })
    return prof, model
