"""Calibrating AIConfigurator's step estimates against real vLLM measurements.

AIC sums kernel times; a real vLLM step also pays the sampler, the scheduler's
host work that is not overlapped, kernel launches outside CUDA graphs and
padding. The reference files (``profiles/reference/``, provenance in its
README) measured real steps, so the correction is fitted on them:

    step_ms = c0 + f_phase x aic_ms        (phase: decode, prefill, mixed)

by least squares on relative error (rows weighted 1/real). ``c0`` is a per-step
overhead, ``f_phase`` the per-phase factor (``mixed`` falls back to the decode
factor when the fitting data has no mixed step). One dataset (Dynamo's H200
prefill curve) measured TTFT of a lone request, which adds the request path
(tokenize, schedule, first token out) to the prefill steps: its rows get a
dataset-specific ``path_ms`` term. Fitted on that dataset it is a parameter;
when a calibration from elsewhere is *evaluated* on it, ``path_ms`` is taken from
its smallest prompt (that row is then left out of the error), the same way for
raw AIC and calibrated, so neither gets an advantage.

Errors are always reported on data the calibration did not see: fit on one
dataset, report on the other, and the reverse (:func:`cross_validate`).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from profiles.synth import StepShape

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
PHASES = ("decode", "prefill", "mixed")


@dataclass(frozen=True)
class RefPoint:
    """One real measurement: the step(s) it covers and the measured time (ms).

    ``shapes`` has one entry for a step measurement, several for a TTFT that spans chunked
    prefill steps; ``with_path``: the figure includes the request path (TTFT).
    """

    dataset: str
    phase: str
    shapes: tuple[StepShape, ...]
    real_ms: float
    with_path: bool = False
    label: str = ""


@dataclass(frozen=True)
class RefDataset:
    """A reference file's points plus what AIC must be told to model them."""

    name: str
    hardware: str
    dtype: str
    max_num_seqs: int
    points: tuple[RefPoint, ...]
    note: str


def load_h200_dynamo(max_num_seqs: int = 1024, max_num_batched_tokens: int = 8192) -> RefDataset:
    """Dynamo's H200 Llama-3.1-8B FP8 planner profile (decode ITL and prefill TTFT).

    Decode: running requests = kv_usage x max_kv_tokens / context (the file's own
    definition); points whose batch exceeds ``max_num_seqs`` (vLLM's cap on H200, 1024)
    are left out: the engine cannot have run them, and their ITL flattens. Prefill: one
    request of N prompt tokens, chunked at ``max_num_batched_tokens`` (vLLM's H200 default).
    """
    pts: list[RefPoint] = []
    name = "h200-dynamo"
    with open(REFERENCE_DIR / "h200_llama-3.1-8b-fp8_dynamo-decode.csv") as f:
        for r in csv.DictReader(f):
            ctx = int(r["context_tokens"])
            b = max(1, round(float(r["kv_usage"]) * int(r["max_kv_tokens"]) / ctx))
            if b > max_num_seqs:
                continue
            pts.append(RefPoint(name, "decode", (StepShape(0, 0, 0, b, b * ctx),), float(r["itl_ms"]),
                                label=f"decode b={b} ctx={ctx}"))
    with open(REFERENCE_DIR / "h200_llama-3.1-8b-fp8_dynamo-prefill.csv") as f:
        for r in csv.DictReader(f):
            n, done, chunks = int(r["prompt_tokens"]), 0, []
            while done < n:
                c = min(max_num_batched_tokens, n - done)
                chunks.append(StepShape(1, c, done, 0, 0))
                done += c
            pts.append(RefPoint(name, "prefill", tuple(chunks), float(r["ttft_ms"]), with_path=True,
                                label=f"prefill TTFT {n}"))
    return RefDataset(name, "h200", "fp8", max_num_seqs, tuple(pts),
                      "NVIDIA Dynamo planner profile, vLLM, 1x H200, Llama-3.1-8B-Instruct-FP8")


def load_rtx_llmservingsim() -> RefDataset:
    """LLMServingSim's per-step table, vLLM 0.28, RTX PRO 6000 Blackwell Server, Llama-3.1-8B bf16.

    Each row is one engine step: ``n_decode`` decodes at ``kv_decode`` context each plus a
    ``prefill_chunk`` (the file sets ``kv_decode`` also on prefill-only rows; a prefill
    chunk is taken with no cached prefix). max_num_seqs 256 (the file's README).
    """
    pts: list[RefPoint] = []
    name = "rtxpro6000-llmservingsim"
    with open(REFERENCE_DIR / "rtxpro6000_llama-3.1-8b-bf16_llmservingsim-step.csv") as f:
        for r in csv.DictReader(f):
            nd, kv, pc = int(r["n_decode"]), int(r["kv_decode"]), int(r["prefill_chunk"])
            s = StepShape(1 if pc else 0, pc, 0, nd, nd * kv)
            pts.append(RefPoint(name, s.phase, (s,), float(r["step_us"]) / 1000.0,
                                label=f"{r['branch']} n_decode={nd} kv={kv} chunk={pc}"))
    return RefDataset(name, "rtx-pro-6000", "bf16", 256, tuple(pts),
                      "casys-kaist/LLMServingSim profiler table, vLLM 0.28.0, RTX PRO 6000 Blackwell Server")


def reference_datasets() -> list[RefDataset]:
    """Every reference dataset in ``profiles/reference``."""
    return [load_h200_dynamo(), load_rtx_llmservingsim()]


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


Estimator = Callable[[StepShape], float]


def _raw_rows(ds: RefDataset, est: Estimator) -> list[tuple[RefPoint, dict[str, float], int]]:
    """Per point: raw AIC ms summed per phase over its shapes, and its step count."""
    rows = []
    for p in ds.points:
        per: dict[str, float] = {}
        for s in p.shapes:
            per[s.phase] = per.get(s.phase, 0.0) + est(s)
        rows.append((p, per, len(p.shapes)))
    return rows


def fit(datasets: Iterable[RefDataset], estimators: dict[str, Estimator]) -> Calibration:
    """Fit ``c0`` and the per-phase factors on ``datasets`` (relative least squares).

    Columns: c0 (times the point's step count), one factor per phase seen, one path term per
    dataset with TTFT rows. A factor or c0 that comes out negative is fixed at 0 and the
    rest refitted. Raises ValueError with no points.
    """
    datasets = list(datasets)
    rows = [r for ds in datasets for r in _raw_rows(ds, estimators[ds.name])]
    if not rows:
        raise ValueError("no reference points to fit")
    phases = [ph for ph in PHASES if any(ph in per for _, per, _ in rows)]
    path_sets = sorted({p.dataset for p, _, _ in rows if p.with_path})
    names = ["c0"] + phases + [f"path:{d}" for d in path_sets]
    X = np.zeros((len(rows), len(names)))
    y = np.array([p.real_ms for p, _, _ in rows])
    for i, (p, per, k) in enumerate(rows):
        X[i, 0] = k
        for ph, v in per.items():
            X[i, names.index(ph)] = v
        if p.with_path:
            X[i, names.index(f"path:{p.dataset}")] = 1.0
    w = 1.0 / y
    active = list(range(len(names)))
    while True:
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        neg = [a for a, v in zip(active, sol) if v < 0]
        if not neg:
            break
        active = [a for a in active if a not in neg]
    coef = dict.fromkeys(names, 0.0)
    coef.update({names[a]: float(v) for a, v in zip(active, sol)})
    factor = {ph: coef.get(ph, 0.0) for ph in phases}
    factor.setdefault("decode", 1.0)
    factor.setdefault("prefill", 1.0)
    factor.setdefault("mixed", factor["decode"])
    return Calibration(coef["c0"], factor, [d.name for d in datasets])


def errors(cal: Calibration, ds: RefDataset, est: Estimator) -> dict[str, dict[str, float]]:
    """|error| % of ``cal`` on every point of ``ds``, per phase: {phase: {median, p90, n}}.

    TTFT points: path_ms comes from the smallest prompt's point (left out of the error).
    """
    rows = _raw_rows(ds, est)
    path_ms = 0.0
    ttft = [(p, per, k) for p, per, k in rows if p.with_path]
    skip = None
    if ttft:
        first = min(ttft, key=lambda r: sum(s.prefill_tokens for s in r[0].shapes))
        skip = first[0]
        path_ms = first[0].real_ms - _predict(cal, first[1], first[2])
    errs: dict[str, list[float]] = {}
    for p, per, k in rows:
        if p is skip:
            continue
        pred = _predict(cal, per, k) + (path_ms if p.with_path else 0.0)
        errs.setdefault(p.phase, []).append(abs(pred - p.real_ms) / p.real_ms * 100.0)
    return {ph: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "n": len(v)}
            for ph, v in errs.items()}


def _predict(cal: Calibration, per: dict[str, float], k: int) -> float:
    """Calibrated time of a point's k steps given raw AIC ms per phase."""
    return k * cal.c0_ms + sum(cal.factor.get(ph, 1.0) * v for ph, v in per.items())


def cross_validate(datasets: list[RefDataset], estimators: dict[str, Estimator]) -> list[dict]:
    """Rows ``{dataset, phase, n, raw_median, raw_p90, cal_median, cal_p90, fitted_on}``:
    for each dataset, raw AIC vs the calibration fitted on all the *other* datasets."""
    out = []
    for ds in datasets:
        others = [d for d in datasets if d is not ds]
        cal = fit(others, estimators)
        raw = errors(Calibration.identity(), ds, estimators[ds.name])
        got = errors(cal, ds, estimators[ds.name])
        for ph in PHASES:
            if ph in got:
                out.append({"dataset": ds.name, "phase": ph, "n": got[ph]["n"],
                            "raw_median": raw[ph]["median"], "raw_p90": raw[ph]["p90"],
                            "cal_median": got[ph]["median"], "cal_p90": got[ph]["p90"],
                            "fitted_on": "+".join(d.name for d in others), "calibration": cal.to_dict()})
    return out


def aic_estimators(datasets: list[RefDataset], model: str = "meta-llama/Meta-Llama-3.1-8B") -> dict[str, Estimator]:
    """One raw AIC estimator per reference dataset (its GPU, dtype and max_num_seqs).

    Raises ImportError without aiconfigurator-core (see :class:`profiles.synth.AicStepModel`).
    """
    from profiles.synth import AicStepModel, hardware
    out = {}
    for ds in datasets:
        m = AicStepModel(hardware(ds.hardware), model, ds.dtype, 1, ds.max_num_seqs)
        out[ds.name] = m.raw_ms
    return out


def default_calibration(datasets: list[RefDataset] | None = None,
                        estimators: dict[str, Estimator] | None = None) -> Calibration:
    """The calibration bundled profiles use: fitted on every reference dataset, with each
    dataset's error measured by the fit on the others attached (``errors``)."""
    datasets = datasets or reference_datasets()
    estimators = estimators or aic_estimators(datasets)
    cal = fit(datasets, estimators)
    cv = cross_validate(datasets, estimators)
    cal.errors = {f"{r['dataset']}/{r['phase']}": {k: round(r[k], 2) for k in
                                                   ("raw_median", "raw_p90", "cal_median", "cal_p90", "n")}
                  for r in cv}
    return cal


def calibration_table(datasets: list[RefDataset], estimators: dict[str, Estimator]) -> str:
    """Markdown: per dataset and step class, median / p90 |error| % of raw AIC and of the
    calibration fitted on the other dataset(s); then the pooled fit bundled profiles use."""
    lines = ["| reference dataset | step class | points | raw AIC median / p90 | calibrated median / p90 "
             "| calibration fitted on |", "|---|---|---:|---:|---:|---|"]
    for r in cross_validate(datasets, estimators):
        lines.append(f"| {r['dataset']} | {r['phase']} | {r['n']} | {r['raw_median']:.1f} / {r['raw_p90']:.1f} % "
                     f"| {r['cal_median']:.1f} / {r['cal_p90']:.1f} % | {r['fitted_on']} |")
    pooled = fit(datasets, estimators)
    lines.append("")
    lines.append(f"Pooled fit (what `synth` uses): c0 = {pooled.c0_ms:.3f} ms, factors "
                 + ", ".join(f"{k} {v:.3f}" for k, v in pooled.factor.items())
                 + "; its in-sample error: "
                 + "; ".join(f"{ds.name} " + ", ".join(f"{ph} {e['median']:.1f}/{e['p90']:.1f} %"
                                                      for ph, e in errors(pooled, ds, estimators[ds.name]).items())
                             for ds in datasets))
    return "\n".join(lines)
