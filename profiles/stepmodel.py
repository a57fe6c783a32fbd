"""GPU step times from terms that mean something: kernel sums, communication, host and launch work.

A vLLM engine step on a GPU costs (all ms)::

    step = host + per_req x requests                       # scheduler, input prep, sampler, output
         + tp_overhead x [TP > 1]                          # multiprocess executor: broadcast, gather
         + eager_per_layer x layers x [no CUDA graph]      # kernel launches (measured, EAGER_LAYER_MS)
         + gemm[gpu] x G + attn[gpu] x A                   # aiconfigurator-core's kernel sums
         + comm                                            # TP all-reduces

``G`` (GEMMs, norms, activations, embedding, LM head) and ``A`` (attention) are
aiconfigurator-core's per-op kernel sums for the step (:class:`AicBreakdown`, its
``decode_step_per_op`` / ``mixed_step_breakdown_per_op``), after vLLM's CUDA-graph padding. ``comm``
is, on NVLink GPUs, ``comm_factor x`` AIC's all-reduce ops (its tables were measured with vLLM
on those systems); on PCIe GPUs, the measured 2-rank NCCL all-reduce (``profiles/reference/
rtxpro6000_nccl_2rank_collectives.csv``, interpolated log-log by message size) times the
all-reduces of a step (2 per layer + 1 for the embedding, each tokens x hidden x 2 B), because
AIC's PCIe tables are not measured for vLLM there. Every term but ``G`` and ``A`` is independent
of the GPU's kernels; ``gemm`` and ``attn`` are per GPU (the kernel tables' own error there), and a
GPU with no measured steps takes the pooled factors.

Why this shape (``benchmarks/gpu_step_terms.py`` prints the evidence): on an RTX PRO 6000, AIC's
GEMM tables match LLMServingSim's measured per-op device times within 0-12 % at TP1 and TP2
per-rank shapes, while whole decode steps run 12-40 % above AIC's sum, growing with batch x
context: decode attention is under-estimated (~1.7x there, ~1.1x on an H200) and a constant of
~1-2 ms per step (host) plus ~15 us per request is missing. A fit of a single per-phase factor
on one GPU moves those costs onto GEMMs and carries them wrongly to a model with twice the layers
and TP2 (the issue that motivated this module).

Fitting (:func:`fit`): one non-negative least-squares problem on relative error over every
reference point (:mod:`profiles.calibration`), each point a weighted sum of steps (a TTFT
spans its prefill chunks plus a request-path term; a TPOT at concurrency c is a decode step
plus the prefill chunks of c / OSL requests per step). Judged by cross-validation by
configuration (GPU x model x TP x dtype): every configuration scored with a fit that never saw it.
"""
from __future__ import annotations

import csv
import functools
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from profiles.synth import StepShape, cudagraph_sizes, hardware, padded_tokens

REFERENCE_DIR = Path(__file__).resolve().parent / "reference"
#: GPUs whose TP collectives run over PCIe (no NVLink): their all-reduce comes from measured NCCL.
PCIE_GPUS = frozenset({"rtx-pro-6000", "l40s"})
GLOBAL_TERMS = ("host_ms", "per_req_ms", "tp_ms", "comm_factor")
#: Launch overhead per layer of a step run eagerly (no CUDA graph: beyond the largest capture size), ms:
#: the median eager-minus-graph time of LLMServingSim's RTX PRO 6000 step table (its ``saved_us``,
#: 535 us over 93 rows) over Llama-3.1-8B's 32 layers. Measured, not fitted: only that table holds
#: eager and graph runs of the same steps.
EAGER_LAYER_MS = 0.535 / 32
GPU_TERMS = ("gemm", "attn")


@dataclass(frozen=True)
class Deployment:
    """One configuration whose steps are modelled: GPU x model x TP x dtype (and vLLM's batch cap).

    ``model`` is an AIC model id (it ships e.g. ``meta-llama/Meta-Llama-3.1-8B``) or a directory
    with ``config.json``; ``num_layers`` and ``hidden_size`` are the model's. ``expert_parallel``
    (MoE models): vLLM's ``--enable-expert-parallel``, the experts split whole over the TP ranks
    (AIC's ``moe_ep_size`` = TP); without it vLLM shards every expert by TP (``moe_tp_size`` = TP).
    """

    hardware: str
    model: str
    dtype: str
    tp: int
    max_num_seqs: int
    num_layers: int
    hidden_size: int
    expert_parallel: bool = False

    @property
    def label(self) -> str:
        m = self.model.rstrip("/").split("/")[-1].replace("Meta-", "")
        return f"{self.hardware} / {m} / TP{self.tp} / {self.dtype}"

    @property
    def interconnect(self) -> str:
        return "pcie" if self.hardware in PCIE_GPUS else "nvlink"


@dataclass(frozen=True)
class AicParts:
    """AIC's kernel sums for one step (ms), split: ``gemm`` (everything but attention and
    communication), ``attn`` and ``comm`` (all-reduces); with the step's padded ``tokens``,
    scheduled ``reqs`` and CUDA-graph mode (``full`` for uniform decode, ``piecewise`` otherwise,
    ``none`` beyond the largest capture size or in eager mode)."""

    gemm: float
    attn: float
    comm: float
    tokens: int
    reqs: int
    graph: str
    phase: str = "decode"


class AicBreakdown:
    """aiconfigurator-core's per-op estimate of a deployment's steps (:class:`AicParts`).

    Args:
        dep: the deployment.

    Raises:
        ImportError: aiconfigurator-core is not installed (``pip install -e ".[synth]"``).
        RuntimeError: AIC cannot model the combination.
    """

    def __init__(self, dep: Deployment) -> None:
        self.dep = dep
        hw = hardware(dep.hardware)
        self._h = _engine(hw.aic_system, hw.aic_version, dep.model, dep.dtype, dep.tp, dep.expert_parallel)
        self.graph_sizes = cudagraph_sizes(dep.max_num_seqs, hw.max_graph_size)

    def parts(self, s: StepShape, graph: str | None = None) -> AicParts:
        """The split estimate of shape ``s`` (graph mode from the shape unless given)."""
        n = s.num_tokens
        if n == 0:
            return AicParts(0.0, 0.0, 0.0, 0, 0, "full", s.phase)
        padded = padded_tokens(n, self.graph_sizes)
        if graph is None:
            graph = "none" if padded == n and n > (self.graph_sizes[-1] if self.graph_sizes else 0) else (
                "full" if s.phase == "decode" else "piecewise")
        pad = padded - n if graph != "none" else 0
        g = a = c = 0.0
        if s.phase == "decode":
            b = s.decode_reqs + pad
            ops = self._h.decode_step_per_op(b, max(1, s.decode_kv // max(s.decode_reqs, 1)), 2)
            g, a, c = _split(ops)
        else:
            p = s.prefill_tokens + pad
            shared, ctx_attn, _ = self._h.mixed_step_breakdown_per_op(p, s.decode_reqs, s.prefill_kv + p, 2,
                                                                       s.prefill_kv)
            g, _, c = _split(shared)
            a = sum(o[1] for o in ctx_attn)
            if s.decode_reqs:  # decode attention at the batch's own context (the mixed call assumes isl/osl)
                _, a_dec, _ = _split(self._h.decode_step_per_op(
                    s.decode_reqs, max(1, s.decode_kv // s.decode_reqs), 2))
                a += a_dec
        return AicParts(g, a, c, padded if graph != "none" else n, s.decode_reqs + s.prefill_reqs, graph, s.phase)


def _split(ops) -> tuple[float, float, float]:
    """(non-attention non-comm, attention, communication) ms of an AIC per-op list.

    Attention: ops named ``*attention*`` and MLA's ``*mla_block*`` (AIC models DeepSeek's whole
    MLA block, its projections included, as one op). Communication: all-reduces (``*_ar``,
    ``*allreduce*``), pipeline p2p, and the MoE dispatch/combine around the experts
    (``*moe_pre_dispatch`` / ``*moe_post_dispatch``: TP all-gather/reduce-scatter or EP all-to-all).
    """
    g = a = c = 0.0
    for name, ms, *_ in ops:
        if "attention" in name or "mla_block" in name:
            a += ms
        elif name.endswith(("_ar", "_ar_1", "_ar_2", "_p2p", "_dispatch")) or "_ar_" in name or "allreduce" in name:
            c += ms
        else:
            g += ms
    return g, a, c


@functools.lru_cache(maxsize=32)
def _engine(system: str, version: str, model: str, dtype: str, tp: int, expert_parallel: bool = False):
    """AIC's compiled engine for one deployment (~1.5 s; cached). The MoE layout: experts sharded by
    TP (``moe_tp_size`` = TP), or split whole over the ranks with ``expert_parallel``; AIC requires
    ``moe_tp x moe_ep`` = TP and ignores them for dense models. Quantization of the checkpoint
    (DeepSeek-R1's FP8, gpt-oss's MXFP4 experts) AIC reads from the model's config."""
    try:
        from aiconfigurator_core.sdk.engine import EngineHandle
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError('emugate profile synth needs aiconfigurator-core: pip install -e ".[synth]"') from e
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    try:
        return EngineHandle.compile(model, system, "vllm", backend_version=version, tp_size=tp,
                                    gemm_quant_mode="fp8" if dtype == "fp8" else None,
                                    moe_tp_size=1 if expert_parallel else tp, moe_ep_size=tp if expert_parallel else 1)
    except Exception as e:
        raise RuntimeError(f"aiconfigurator-core cannot model {model} on {system} (vLLM {version}, TP{tp}, "
                           f"{dtype}): {e}") from e


# ------------------------------------------------------------------ PCIe all-reduce
@functools.lru_cache(maxsize=1)
def _pcie_allreduce() -> tuple[np.ndarray, np.ndarray]:
    """(log bytes, log us) of the measured 2-rank NCCL all-reduce over PCIe (LLMServingSim, RTX PRO 6000)."""
    xs, ys = [], []
    with open(REFERENCE_DIR / "rtxpro6000_nccl_2rank_collectives.csv") as f:
        for r in csv.DictReader(f):
            if r["collective"] == "all_reduce":
                xs.append(math.log(float(r["bytes"])))
                ys.append(math.log(float(r["us_median_of_3_runs"])))
    order = np.argsort(xs)
    return np.asarray(xs)[order], np.asarray(ys)[order]


def pcie_allreduce_us(nbytes: float, tp: int = 2) -> float:
    """One all-reduce of ``nbytes`` over PCIe, us: the measured 2-rank NCCL time, log-log interpolated
    (linear in bytes beyond the largest size measured, 20 MiB); for TP > 2, the ring's traffic grows
    by ``(tp-1)/tp`` over the 2-rank ``1/2`` (an extrapolation: only 2 ranks were measured)."""
    lx, ly = _pcie_allreduce()
    x = math.log(max(nbytes, 1.0))
    if x >= lx[-1]:
        us = math.exp(ly[-1]) * nbytes / math.exp(lx[-1])
    else:
        us = math.exp(float(np.interp(x, lx, ly)))
    return us * 2 * (tp - 1) / tp if tp > 2 else us


# ------------------------------------------------------------------ the model
@dataclass
class StepModel:
    """The step-time model's parameters (module docstring); times in ms.

    Attributes:
        host_ms, per_req_ms, tp_ms: per-step host terms (ms; per request; at TP > 1).
        comm_factor: on AIC's all-reduce time (NVLink GPUs).
        gemm, attn: per GPU, factors on AIC's non-attention and attention kernel sums.
        pooled: the factors a GPU without its own measurements takes.
        fitted_on: configuration labels of the data it was fitted on.
        errors: expected |error| % bands (:func:`error_bands`), stored in profiles.
    """

    host_ms: float = 0.0
    per_req_ms: float = 0.0
    tp_ms: float = 0.0
    comm_factor: float = 1.0
    gemm: dict[str, float] = field(default_factory=dict)
    attn: dict[str, float] = field(default_factory=dict)
    pooled: dict[str, float] = field(default_factory=lambda: {"gemm": 1.0, "attn": 1.0})
    fitted_on: list[str] = field(default_factory=list)
    errors: dict = field(default_factory=dict)

    @classmethod
    def raw(cls) -> "StepModel":
        """AIC's kernel sums as they are (every factor 1, no host terms)."""
        return cls()

    def factors(self, gpu: str) -> tuple[float, float, bool]:
        """(gemm, attn, measured): the GPU's own factors, or the pooled ones (measured False)."""
        if gpu in self.gemm:
            return self.gemm[gpu], self.attn[gpu], True
        return self.pooled["gemm"], self.pooled["attn"], False

    def step_ms(self, p: AicParts, dep: Deployment) -> float:
        """Predicted step time (ms) of a step whose AIC split is ``p`` (0 for an empty step)."""
        if p.tokens == 0:
            return 0.0
        return float(np.dot(self.vector(dep), design_row(p, dep)))

    def vector(self, dep: Deployment) -> np.ndarray:
        """The parameters in :func:`design_row`'s order for ``dep``."""
        g, a, _ = self.factors(dep.hardware)
        return np.array([self.host_ms, self.per_req_ms, self.tp_ms, self.comm_factor, 1.0, g, a])

    def to_dict(self) -> dict:
        return {"model": "step = host + per_req x reqs + tp [TP>1] + eager launches + gemm[gpu] x AIC non-attention "
                         "+ attn[gpu] x AIC attention + comm (profiles/stepmodel.py)",
                "host_ms": round(self.host_ms, 4), "per_req_ms": round(self.per_req_ms, 5),
                "tp_ms": round(self.tp_ms, 4), "comm_factor": round(self.comm_factor, 4),
                "gemm": {k: round(v, 4) for k, v in self.gemm.items()},
                "attn": {k: round(v, 4) for k, v in self.attn.items()},
                "pooled": {k: round(v, 4) for k, v in self.pooled.items()},
                "fitted_on": self.fitted_on, "errors": self.errors}

    @classmethod
    def from_dict(cls, d: dict) -> "StepModel":
        return cls(d["host_ms"], d["per_req_ms"], d["tp_ms"], d["comm_factor"],
                   dict(d["gemm"]), dict(d["attn"]), dict(d["pooled"]), list(d.get("fitted_on", [])),
                   dict(d.get("errors", {})))


def design_row(p: AicParts, dep: Deployment) -> np.ndarray:
    """The step's coefficients of ``[host, per_req, tp, comm_factor, 1 (fixed terms), gemm, attn]``:
    ``step_ms = row . params`` (:meth:`StepModel.vector`). The fixed terms (ms): measured PCIe
    all-reduces at TP > 1 on PCIe GPUs, and eager launches (:data:`EAGER_LAYER_MS`) without a CUDA graph."""
    nvlink_comm, fixed = (p.comm, 0.0) if dep.interconnect == "nvlink" or dep.tp == 1 else (
        0.0, (2 * dep.num_layers + 1) * pcie_allreduce_us(p.tokens * dep.hidden_size * 2, dep.tp) / 1000.0)
    if p.graph == "none":
        fixed += EAGER_LAYER_MS * dep.num_layers
    return np.array([1.0, p.reqs, 1.0 if dep.tp > 1 else 0.0, nvlink_comm, fixed, p.gemm, p.attn])


# ------------------------------------------------------------------ fitting
@dataclass(frozen=True)
class Observation:
    """One real figure as a weighted sum of steps: ``real_ms ~ sum_k weight_k x step_k (+ path)``.

    ``phase``: the class it is reported under (decode, prefill, mixed, tpot); ``path``: a TTFT that
    includes the request path (a per-dataset term, see :mod:`profiles.calibration`).
    """

    dep: Deployment
    phase: str
    parts: tuple[AicParts, ...]
    weights: tuple[float, ...]
    real_ms: float
    dataset: str
    path: bool = False
    shape: StepShape | None = None  # the step, for a single-step observation

    def row(self) -> np.ndarray:
        return sum(w * design_row(p, self.dep) for p, w in zip(self.parts, self.weights))

    def aic_ms(self) -> float:
        """AIC's own figure for it (raw kernel sums, no host terms)."""
        return sum(w * (p.gemm + p.attn + p.comm) for p, w in zip(self.parts, self.weights))


def fit(obs: Sequence[Observation], ridge: float = 0.05) -> StepModel:
    """Fit a :class:`StepModel` on ``obs``: non-negative least squares on relative error.

    Per-GPU factors get a light ridge (``ridge``, on relative error scale) toward 1, so a GPU with
    few points does not swing; the pooled factors are the point-weighted mean of the fitted GPUs'.
    Each dataset with TTFT points gets its own request-path term (not kept in the model).

    Raises:
        ValueError: no observations.
    """
    obs = list(obs)
    if not obs:
        raise ValueError("no observations to fit")
    gpus = sorted({o.dep.hardware for o in obs})
    paths = sorted({o.dataset for o in obs if o.path})
    names = [*GLOBAL_TERMS, *(f"{t}:{g}" for g in gpus for t in GPU_TERMS), *(f"path:{d}" for d in paths)]
    X, y = np.zeros((len(obs), len(names))), np.array([o.real_ms for o in obs])
    fixed = np.zeros(len(obs))
    k = len(GLOBAL_TERMS)
    for i, o in enumerate(obs):
        r = o.row()
        X[i, :k] = r[:k]
        fixed[i] = r[k]
        gi = gpus.index(o.dep.hardware)
        X[i, k + 2 * gi], X[i, k + 1 + 2 * gi] = r[k + 1], r[k + 2]
        if o.path:
            X[i, names.index(f"path:{o.dataset}")] = 1.0
    w = 1.0 / y
    A, b = X * w[:, None], (y - fixed) * w
    # ridge rows: per-GPU factors toward 1
    reg = np.zeros((2 * len(gpus), len(names)))
    for j in range(2 * len(gpus)):
        reg[j, k + j] = ridge
    A = np.vstack([A, reg])
    b = np.concatenate([b, np.full(2 * len(gpus), ridge)])
    coef = _nnls(A, b)
    c = {n: float(v) for n, v in zip(names, coef)}
    gemm = {g: c[f"gemm:{g}"] for g in gpus}
    attn = {g: c[f"attn:{g}"] for g in gpus}
    counts = {g: sum(o.dep.hardware == g for o in obs) for g in gpus}
    tot = sum(counts.values())
    pooled = {t: sum(f[g] * counts[g] for g in gpus) / tot for t, f in (("gemm", gemm), ("attn", attn))}
    return StepModel(c["host_ms"], c["per_req_ms"], c["tp_ms"], c["comm_factor"], gemm, attn, pooled,
                     sorted({o.dep.label for o in obs}))


def _nnls(A: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Non-negative least squares (active set: drop negative coefficients and refit)."""
    active = list(range(A.shape[1]))
    while True:
        sol, *_ = np.linalg.lstsq(A[:, active], b, rcond=None)
        neg = [a for a, v in zip(active, sol) if v < 0]
        if not neg:
            out = np.zeros(A.shape[1])
            out[active] = sol
            return out
        active = [a for a in active if a not in neg]


def predict(model: StepModel, o: Observation, path_ms: float = 0.0) -> float:
    """The model's figure for an observation (plus a request-path term for TTFTs)."""
    return float(np.dot(model.vector(o.dep), o.row())) + (path_ms if o.path else 0.0)


def abs_errors(model: StepModel, obs: Sequence[Observation], raw: bool = False) -> dict[str, list[float]]:
    """|error| % per phase of ``model`` (or of raw AIC) on ``obs``. A dataset's TTFT points take their
    request-path term from its smallest prompt's point, which is then left out (as for every
    estimator, so none gets an advantage)."""
    out: dict[str, list[float]] = {}
    by_ds: dict[str, list[Observation]] = {}
    for o in obs:
        by_ds.setdefault(o.dataset, []).append(o)
    for ds_obs in by_ds.values():
        ttft = [o for o in ds_obs if o.path]
        skip, path_ms = None, 0.0
        if ttft:
            skip = min(ttft, key=lambda o: o.real_ms)
            path_ms = skip.real_ms - (skip.aic_ms() if raw else predict(model, skip))
        for o in ds_obs:
            if o is skip:
                continue
            pred = (o.aic_ms() + (path_ms if o.path else 0.0)) if raw else predict(model, o, path_ms)
            out.setdefault(o.phase, []).append(abs(pred - o.real_ms) / o.real_ms * 100.0)
    return out


def summarize(errs: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """{phase: {"median", "p90", "n"}} of |error| % lists."""
    return {ph: {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "n": len(v)}
            for ph, v in errs.items() if v}


def cross_validate(obs: Sequence[Observation]) -> list[dict]:
    """Leave one configuration out: for each deployment, fit on every other one and score it.

    Returns rows ``{config, phase, n, model_median, model_p90, raw_median, raw_p90, gpu_measured}``
    (``gpu_measured``: whether the fit had other data of the same GPU).
    """
    deps = sorted({o.dep for o in obs}, key=lambda d: d.label)
    rows = []
    for dep in deps:
        train = [o for o in obs if o.dep != dep]
        test = [o for o in obs if o.dep == dep]
        m = fit(train)
        got, raw = summarize(abs_errors(m, test)), summarize(abs_errors(m, test, raw=True))
        for ph, e in got.items():
            rows.append({"config": dep.label, "phase": ph, "n": e["n"], "model_median": e["median"],
                         "model_p90": e["p90"], "raw_median": raw[ph]["median"], "raw_p90": raw[ph]["p90"],
                         "gpu_measured": dep.hardware in m.gemm, "tp": dep.tp, "interconnect": dep.interconnect})
    return rows


def band_key(tp: int, gpu_measured: bool) -> str:
    """The error-band key of a configuration: ``tp1`` or ``tp>1``, and ``seen`` or ``unseen`` GPU."""
    return f"{'tp1' if tp == 1 else 'tp>1'}/{'seen' if gpu_measured else 'unseen'}"


def error_bands(cv_rows: Iterable[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Expected |error| % for a new configuration, from the cross-validation of configurations like it.

    Keys: :func:`band_key` (TP1 or TP>1; a GPU the fit has steps of, or not), then step class:
    {"median", "p90", "configs"}: the median of the held-out configurations' medians, the max of
    their p90s, and how many configurations that rests on.
    """
    cv_rows = list(cv_rows)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for key in sorted({band_key(r["tp"], r["gpu_measured"]) for r in cv_rows}):
        rows = [r for r in cv_rows if band_key(r["tp"], r["gpu_measured"]) == key]
        for ph in sorted({r["phase"] for r in rows}):
            rs = [r for r in rows if r["phase"] == ph]
            out.setdefault(key, {})[ph] = {"median": round(float(np.median([r["model_median"] for r in rs])), 1),
                                           "p90": round(float(max(r["model_p90"] for r in rs)), 1),
                                           "configs": len(rs)}
    return out


def band_for(model: "StepModel", dep: Deployment) -> tuple[str, dict]:
    """(key, band) for ``dep``: its own kind's band, else the nearest one measured (TP>1 on an unseen GPU
    falls back to TP1 unseen, which holds its kernel-table error)."""
    key = band_key(dep.tp, dep.hardware in model.gemm)
    for k in (key, band_key(1, dep.hardware in model.gemm), "tp1/unseen"):
        if model.errors.get(k):
            return k, model.errors[k]
    return key, {}


# ------------------------------------------------------------------ anchoring on a quick capture
#: The terms a quick capture re-fits for its own configuration: host (the host CPU and vLLM version decide it)
#: and the GPU's kernel factors. Communication and the TP overhead keep the shipped fit's values.
ANCHORED_TERMS = ("host_ms", "per_req_ms", "gemm", "attn")


def anchor(base: StepModel, obs: Sequence[Observation], ridge: float = 0.02) -> StepModel:
    """The step model re-fitted on a few measured steps of one deployment (a quick capture).

    Only :data:`ANCHORED_TERMS` move, each pulled toward ``base``'s value by ``ridge`` (on the
    relative-error scale), so a handful of steps cannot swing a term the shapes do not exercise.

    Args:
        base: the shipped fit (``shipped_model()``).
        obs: observations of one deployment (whole steps).

    Raises:
        ValueError: no observations, or observations of several deployments.
    """
    obs = list(obs)
    if not obs:
        raise ValueError("no observations to anchor on")
    deps = {o.dep for o in obs}
    if len(deps) > 1:
        raise ValueError(f"anchor on one deployment at a time (got {sorted(d.label for d in deps)})")
    dep = next(iter(deps))
    g0, a0, _ = base.factors(dep.hardware)
    prior = np.array([base.host_ms, base.per_req_ms, g0, a0])
    X, y = np.zeros((len(obs), 4)), np.array([o.real_ms for o in obs])
    fixed = np.zeros(len(obs))
    for i, o in enumerate(obs):
        r = o.row()  # [host, per_req, tp, comm_factor, fixed, gemm, attn]
        X[i] = (r[0], r[1], r[5], r[6])
        fixed[i] = r[2] * base.tp_ms + r[3] * base.comm_factor + r[4]
    w = 1.0 / y
    scale = np.maximum(np.abs(prior), 1e-3)
    A = np.vstack([X * w[:, None], np.diag(ridge / scale)])
    b = np.concatenate([(y - fixed) * w, np.full(4, ridge)])
    host, per_req, g, a = _nnls(A, b)
    out = StepModel(host, per_req, base.tp_ms, base.comm_factor, {**base.gemm, dep.hardware: g},
                    {**base.attn, dep.hardware: a}, dict(base.pooled), [*base.fitted_on, f"anchored: {dep.label}"],
                    dict(base.errors))
    return out


# ------------------------------------------------------------------ the shipped fit
#: The fit ``synth`` uses (``emugate profile calibrate --write`` regenerates it from the reference data;
#: a synth-tier test checks it against a fresh fit).
SHIPPED = REFERENCE_DIR / "stepmodel.json"
#: The cross-validation table of that fit (``calibrate --write``), rendered by the docs.
CROSSVAL = REFERENCE_DIR / "crossval.json"


def shipped_model() -> StepModel:
    """The step-time model fitted on every reference observation, with its cross-validated error bands.

    Raises:
        FileNotFoundError: the shipped fit is missing (run ``emugate profile calibrate --write``).
    """
    import json
    return StepModel.from_dict(json.loads(SHIPPED.read_text()))


#: Model sizes (parameters) the reference observations span: Llama-3.1-8B and -70B.
SEEN_PARAMS = (8.0e9, 70.6e9)


def coverage_warnings(model: StepModel, dep: Deployment, params: float, moe: bool = False, mla: bool = False,
                      sliding: bool = False) -> list[str]:
    """What about ``dep`` lies outside what the step model's fit covered, one sentence each, with numbers.

    Args:
        params: the model's parameter count (for MoE, all experts).
        moe: a mixture-of-experts model.
        mla: multi-head latent attention (DeepSeek).
        sliding: sliding-window layers beside full attention (gpt-oss).
    """
    out = []
    _, bands = band_for(model, dep)
    if dep.hardware not in model.gemm:
        gpus = ", ".join(sorted(model.gemm))
        out.append(f"no measured steps on {dep.hardware}: its kernel factors are the pooled ones (GEMM "
                   f"{model.pooled['gemm']:.2f}, attention {model.pooled['attn']:.2f}); on the one GPU held out "
                   f"that way (RTX PRO 6000) decode steps came out ~25 % fast, because AIC's attention tables there "
                   f"are 1.8x fast (fitted GPUs: {gpus})")
    if dep.tp > 1 and dep.interconnect == "pcie":
        out.append(f"tensor parallel over PCIe (TP{dep.tp}): no whole step of a PCIe multi-GPU deployment was "
                   "measured; its all-reduces come from a 2-rank NCCL microbenchmark and its executor overhead from "
                   "NVLink systems, so expect more than the TP>1 band (" + _band_text(bands) + ")")
    if dep.tp > 8:
        out.append(f"TP{dep.tp} is beyond the largest TP measured (8)")
    lo, hi = SEEN_PARAMS
    if not lo / 2 <= params <= hi * 2:
        out.append(f"a {params / 1e9:.1f}B-parameter model: the fit saw 8B and 70B models only")
    if moe:
        out.append("a mixture-of-experts model: no MoE step or serving measurement is in the fit; AIC's MoE kernel "
                   "times against a measured fused-MoE table (Qwen3-30B-A3B, RTX PRO 6000) are in "
                   "benchmarks/moe_block_error.py"
                   + (f", and with expert parallel (EP{dep.tp}) the dispatch all-to-all is AIC's own estimate"
                      if dep.expert_parallel else ""))
    if mla:
        out.append("multi-head latent attention: AIC models the MLA block (projections and attention) as one op, "
                   "scaled here by the attention factor fitted on GQA attention")
    if sliding:
        out.append("sliding-window layers beside full attention: none of the fitted models had them, so their "
                   "attention time is AIC's alone, never checked against a measurement")
    return out


def _band_text(bands: dict) -> str:
    return ", ".join(f"{ph} median {b['median']:g} % / p90 {b['p90']:g} %" for ph, b in sorted(bands.items())) or "n/a"


def error_band_text(model: StepModel, dep: Deployment) -> str:
    """The expected |error| per step class for ``dep``, as ``synth``, ``inspect`` and the server log print it."""
    key, bands = band_for(model, dep)
    tp, seen = key.split("/")
    what = f"{'TP1' if tp == 'tp1' else 'TP>1'} configurations on a GPU {'with' if seen == 'seen' else 'without'} " \
           "measured steps of its own"
    return (f"expected |error| ({what}, each scored by a fit that never saw it; tpot = a serving run's mean TPOT): "
            f"{_band_text(bands)}")
