"""Latency oracles: step features -> sampled step latency (microseconds).

Two oracles share one interface (:class:`LatencyOracle`):

``Grid2DOracle`` — the baseline, after LLM-Emu (arXiv 2605.00616, sec. 4):
    steps are split into two classes, *prefill-containing* and *decode-only*,
    and keyed by (total scheduled tokens, running requests) on a log grid.
    A populated cell answers with one of its recorded samples drawn at random
    (so the recorded variance survives); an empty cell pools its nearest
    populated cells with adaptive-K Shepard (inverse-distance-squared)
    weighting of their medians, and takes its noise from the nearest cell.

``FeatureOracle`` — what we keep (see ``benchmarks/oracle_accuracy.py``):
    the same grid, but each class first gets a least-squares linear model over
    the features the scheduler exposes beyond the 2D key: prefill tokens and
    the attention-work proxy sum(scheduled*(computed+scheduled/2)) (context
    tokens are available too, ``LINEAR_FEATURES``, but lost in the ablation). Cells then store the
    *ratio* actual/linear (median and samples). Within a cell the linear part
    tracks context length and the prefill/decode mix, which the 2D key cannot
    see; across empty cells the linear part extrapolates where Shepard
    pooling of neighbours can only average.

Grid: each axis is bucketed with two buckets per octave
(``_bucket(x) = 2*bit_length(x) + second-highest bit``), so cells are ~41%
wide in relative terms, matching LLM-Emu's geometric bucketing.

Query cost is plain-Python arithmetic on a dict lookup (no numpy per query):
``benchmarks/oracle_accuracy.py`` reports it (target <= 20 us).
All latencies in and out are microseconds (us). Deterministic for a seed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

from profiles.format import Profile

DECODE, PREFILL, MIXED = 0, 1, 2
CLASS_NAMES = {DECODE: "decode-only", PREFILL: "prefill-containing", MIXED: "mixed"}
#: Added to a cell key's class code for steps whose sampler takes the random path, when the
#: oracle keeps greedy and sampled steps in separate cells (``FeatureOracle``).
SAMPLED = 4

#: Feature order used by the linear model of FeatureOracle (after a constant).
LINEAR_FEATURES = ("num_tokens", "num_reqs", "prefill_tokens", "attn_work", "context_tokens", "random_rows")
#: The subset FeatureOracle uses by default: the ablation in benchmarks/oracle_accuracy.py
#: on the bundled profile kept attention work (decode p90 |err| 18.2% -> 14.8%, prefill
#: median 4.6% -> 3.1%) and dropped context tokens (decode median 5.5% -> 7.7% with them).
#: ``random_rows``: vLLM's sampler costs ~1 ms per request per step on the CPU
#: host when any request in the batch samples at temperature > 0 and next to nothing when
#: all are greedy (``python benchmarks/sampler_cost.py``); a profile without the column
#: (recorded before it existed) has it all zero, and its slope comes out 0.
DEFAULT_FEATURES = ("num_tokens", "num_reqs", "prefill_tokens", "attn_work", "random_rows")
#: A derived feature for mixture-of-experts profiles (``meta["oracle"]["moe"] = [experts, top_k]``):
#: the expected number of distinct experts a step's tokens activate, ``E x (1 - (1 - k/E)^tokens)``
#: under uniform routing. An MoE layer reads the weights of each activated expert once, so at small
#: batches its cost follows this saturating curve, which no linear term in tokens can (decode p90
#: |err| on the bundled Qwen3-30B-A3B H100 profile: 21.0 % without it; ``emugate profile inspect``).
MOE_FEATURE = "moe_experts"


def expected_experts(tokens: int, experts: int, top_k: int) -> float:
    """Expected distinct experts activated by ``tokens`` tokens each routed to ``top_k`` of
    ``experts`` uniformly at random: ``E x (1 - (1 - k/E)^tokens)`` (occupancy of E bins)."""
    return experts * (1.0 - (1.0 - top_k / experts) ** tokens) if experts > 0 and tokens > 0 else 0.0


def _bucket(x: int) -> int:
    """Log bucket with two buckets per octave; 0 for x <= 0."""
    if x <= 0:
        return 0
    b = x.bit_length()
    return 2 * b + ((x >> (b - 2)) & 1 if b >= 2 else 0)


@dataclass(frozen=True)
class StepFeatures:
    """Features of one engine step, as read from vLLM's SchedulerOutput.

    All counts are tokens or requests (integers). ``attn_work`` is
    sum over scheduled requests of n_sched * (n_computed + n_sched / 2),
    a proxy for causal attention FLOPs (token-pairs). ``random_rows`` is
    ``num_reqs`` when any scheduled request samples with temperature > 0,
    else 0: vLLM V1's ``Sampler.sample`` (``vllm/v1/sample/sampler.py``)
    returns the argmax when the whole batch is greedy and otherwise runs
    temperature, softmax and the random draw over every row of the batch.
    """

    num_tokens: int
    num_reqs: int
    prefill_tokens: int
    decode_reqs: int
    prefill_reqs: int
    context_tokens: int
    attn_work: int
    random_rows: int = 0

    @property
    def step_class(self) -> int:
        return PREFILL if self.prefill_tokens > 0 else DECODE

    def oracle_class(self, split_mixed: bool) -> int:
        """The oracle's class: ``step_class``, or with ``split_mixed`` MIXED for steps that
        hold both prefill tokens and decodes (their own linear model and cells)."""
        if split_mixed and self.prefill_tokens > 0 and self.decode_reqs > 0:
            return MIXED
        return self.step_class


def profile_features(profile: Profile, idx: np.ndarray | None = None) -> list[StepFeatures]:
    """Rows of a profile's step table as StepFeatures (optionally a subset ``idx``)."""
    s = profile.steps
    cols = [s[f].astype(np.int64) for f in
            ("num_tokens", "num_reqs", "prefill_tokens", "decode_reqs", "prefill_reqs",
             "context_tokens", "attn_work", "random_rows")]
    if idx is not None:
        cols = [c[idx] for c in cols]
    return [StepFeatures(*map(int, row)) for row in zip(*cols)]


def _key(f: StepFeatures, split_mixed: bool = False, split_random: bool = False) -> tuple[int, int, int]:
    """Grid key (class code, tokens bucket, requests bucket) of a step. The class code is
    ``oracle_class(split_mixed)``, plus ``SAMPLED`` with ``split_random`` for a step whose
    sampler takes the random path (``random_rows > 0``)."""
    code = f.oracle_class(split_mixed) + (SAMPLED if split_random and f.random_rows > 0 else 0)
    return code, _bucket(f.num_tokens), _bucket(f.num_reqs)


def _training_rows(profile: Profile, idx: np.ndarray | None, split_mixed: bool = False):
    """(features, latencies in us, grid keys) of the rows an oracle is built from."""
    feats = profile_features(profile, idx)
    lat = profile.steps["latency_us"].astype(float)
    if idx is not None:
        lat = lat[idx]
    return feats, lat, [_key(f, split_mixed) for f in feats]


class LatencyOracle:
    """Interface: ``sample_us(features)`` -> one latency draw (us);
    ``predict_us(features)`` -> the point estimate (median-like, us);
    ``sample_gap_us(features)`` -> a host-gap draw (us, 0 if none recorded)."""

    name = "oracle"
    _gaps: "_GapModel | None" = None
    #: Cell keying (see :func:`_key`); oracles that split set these in ``__init__``.
    _split = False
    _split_random = False

    def sample_gap_us(self, f: StepFeatures) -> float:
        return self._gaps.sample(f) if self._gaps is not None else 0.0

    def reseed(self, seed: int) -> None:
        """Restart the draws as if built with ``seed`` (latency stream ``seed``, host gaps ``seed + 1``),
        so one oracle serves several reproducible runs (``emugate simulate`` reuses its engines)."""
        if hasattr(self, "_rng"):
            self._rng = random.Random(seed)
        if self._gaps is not None:
            self._gaps._rng = random.Random(seed + 1)

    def covers(self, f: StepFeatures) -> bool:
        """Whether the profile recorded enough steps in ``f``'s own grid cell (else the
        answer is pooled from neighbouring cells: an extrapolation). False for oracles
        without cells."""
        cells = getattr(self, "_cells", None)
        return cells is not None and self._cell_key(f) in cells.cells

    def _cell_key(self, f: StepFeatures) -> tuple[int, int, int]:
        return _key(f, self._split, self._split_random)

    def sample_us(self, f: StepFeatures) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    def predict_us(self, f: StepFeatures) -> float:  # pragma: no cover - interface
        raise NotImplementedError


class _Cells:
    """Per-class grid of sample arrays with Shepard pooling for empty cells.

    ``values`` are what the cells hold (latencies for the 2D oracle, ratios
    for the feature oracle). A cell with at least ``min_samples`` values is
    *populated*.
    """

    def __init__(self, keys: list[tuple[int, int, int]], values: np.ndarray,
                 min_samples: int = 3, k_max: int = 8, pool_samples: int = 24):
        self.min_samples = min_samples
        self.k_max = k_max
        self.pool_samples = pool_samples
        groups: dict[tuple[int, int, int], list[float]] = {}
        for k, v in zip(keys, values.tolist()):
            groups.setdefault(k, []).append(v)
        self.cells: dict[tuple[int, int, int], tuple[float, list[float]]] = {}
        for k, vs in groups.items():
            if len(vs) >= min_samples:
                vs.sort()
                self.cells[k] = (float(np.median(vs)), vs)
        codes = {k[0] for k in self.cells}
        self._coords = {
            c: np.array([(k[1], k[2]) for k in self.cells if k[0] == c], dtype=float).reshape(-1, 2)
            for c in codes
        }
        self._ckeys = {c: [k for k in self.cells if k[0] == c] for c in codes}
        self._memo: dict[tuple[int, int, int], tuple[float, list[float]] | None] = {}

    def lookup(self, key: tuple[int, int, int]) -> tuple[float, list[float]] | None:
        """(center, samples) for a key: its own cell, else a Shepard-pooled center
        with the nearest populated cell's samples rescaled to that center."""
        cell = self.cells.get(key)
        if cell is not None:
            return cell
        if key in self._memo:
            return self._memo[key]
        res = self._pool(key)
        self._memo[key] = res
        return res

    def _pool(self, key):
        c = key[0]
        if c not in self._ckeys:
            # no cell of this class code: the same class with the other sampler path first
            # (its linear model still carries the sampler's cost), then the other classes
            flag, base = c & SAMPLED, c & ~SAMPLED
            others = {DECODE: (PREFILL,), PREFILL: (DECODE,), MIXED: (PREFILL, DECODE)}[base]
            order = [base | (flag ^ SAMPLED)] + [o | f for o in others for f in (flag, flag ^ SAMPLED)]
            c = next((o for o in order if o in self._ckeys), None)
            if c is None:
                return None
        coords, keys = self._coords[c], self._ckeys[c]
        d2 = ((coords - np.array([key[1], key[2]], dtype=float)) ** 2).sum(axis=1)
        order = np.argsort(d2, kind="stable")
        # adaptive K: grow the neighbourhood until it holds pool_samples values
        chosen, total = [], 0
        for i in order[: self.k_max]:
            chosen.append(int(i))
            total += len(self.cells[keys[i]][1])
            if total >= self.pool_samples:
                break
        w = 1.0 / np.maximum(d2[chosen], 1e-9)
        centers = np.array([self.cells[keys[i]][0] for i in chosen])
        center = float((w * centers).sum() / w.sum())
        near_center, near_samples = self.cells[keys[chosen[0]]]
        scale = center / near_center if near_center else 1.0
        return center, [v * scale for v in near_samples]


class _GapModel:
    """Host gaps (us) between steps, drawn from the same (class, tokens, requests) grid.

    The host gap is the engine's own work between one step's end and the
    next step's submit (scheduling, output processing; ``host_gap_us`` in
    the profile). Under sync scheduling on a small host it is a sizeable part
    of every inter-token latency (measured on the bundled CPU profile: see
    README, Fidelity). Only positive gaps are kept (0 marks overlap or idleness).
    """

    def __init__(self, keys: list[tuple[int, int, int]], gaps: np.ndarray, rng: random.Random,
                 split_mixed: bool = False):
        self._split = split_mixed
        pos = gaps > 0
        self.active = bool(pos.sum() >= 3)
        self._rng = rng
        if self.active:
            self._cells = _Cells([k for k, p in zip(keys, pos) if p], gaps[pos].astype(float))

    @classmethod
    def build(cls, profile: Profile, keys, idx, rng, split_mixed: bool = False) -> "_GapModel | None":
        """From the oracle's own grid keys (``split_mixed`` as the oracle's, so lookups match)."""
        gaps = profile.steps["host_gap_us"]
        if idx is not None:
            gaps = gaps[idx]
        model = cls(keys, np.asarray(gaps), rng, split_mixed)
        return model if model.active else None

    def sample(self, f: StepFeatures) -> float:
        cell = self._cells.lookup(_key(f, self._split))
        if cell is None:
            return 0.0
        samples = cell[1]
        return samples[int(self._rng.random() * len(samples))]


class Grid2DOracle(LatencyOracle):
    """LLM-Emu's density-aware 2D oracle (baseline). See module docstring.

    Args:
        profile: the recorded steps.
        seed: RNG seed; the same seed and query sequence give the same draws.
        idx: optional subset of step rows to build from (for held-out tests).
    """

    name = "grid2d"

    def __init__(self, profile: Profile, seed: int = 0, idx: np.ndarray | None = None):
        feats, lat, keys = _training_rows(profile, idx)
        self._cells = _Cells(keys, lat)
        self._rng = random.Random(seed)
        self._gaps = _GapModel.build(profile, keys, idx, random.Random(seed + 1))
        self._fallback = float(np.median(lat)) if len(lat) else 1000.0

    def predict_us(self, f: StepFeatures) -> float:
        cell = self._cells.lookup(_key(f))
        return cell[0] if cell else self._fallback

    def sample_us(self, f: StepFeatures) -> float:
        cell = self._cells.lookup(_key(f))
        if cell is None:
            return self._fallback
        samples = cell[1]
        return samples[int(self._rng.random() * len(samples))]


#: A class gets its own linear model only with this many rows per coefficient.
MIN_FIT_ROWS_PER_FEATURE = 10


def _nonneg_fit(X: np.ndarray, y: np.ndarray, active: list[int] | None = None) -> list[float]:
    """Relative-error least squares with non-negative slopes.

    Rows are weighted by 1/y (so the fit minimises relative error). A slope
    that comes out negative is dropped (fixed at 0) and the rest refitted,
    until all are >= 0: latency never falls as work grows, and the model
    cannot extrapolate below zero outside the captured range.
    """
    w = 1.0 / np.maximum(y, 1.0)
    active = list(range(X.shape[1])) if active is None else list(active)
    coef = np.zeros(X.shape[1])
    while True:
        sol, *_ = np.linalg.lstsq(X[:, active] * w[:, None], y * w, rcond=None)
        neg = [a for a, v in zip(active, sol) if a != 0 and v < 0]
        if not neg:
            coef[:] = 0.0
            coef[active] = sol
            return coef.tolist()
        active = [a for a in active if a not in neg]


class FeatureOracle(LatencyOracle):
    """Linear model over scheduler features x per-cell ratio samples (kept).

    Prediction = linear_c(x) * ratio, with ratio drawn from the (class,
    tokens, requests) cell of actual/linear ratios (pooled as in the 2D
    oracle when the cell is empty). The linear fit per class is ordinary
    least squares on ``[1, *LINEAR_FEATURES]`` with relative weighting
    (rows scaled by 1/latency, so small and large steps count alike) and
    non-negative slopes (:func:`_nonneg_fit`).

    Args: as :class:`Grid2DOracle`, plus ``features`` (the linear model's) and
    ``split_mixed`` (mixed prefill+decode steps as a third class). Both default to the
    profile's ``meta["oracle"]`` when it names them (synthesized GPU profiles do: there,
    decode context and a prefill's cached prefix cost differently per token, so mixed
    steps need their own model and context tokens as a feature), else to
    ``DEFAULT_FEATURES`` and two classes (what the CPU capture was validated with).
    ``split_random``: greedy steps and steps whose sampler takes the random path
    (``random_rows > 0``) in separate ratio cells; default: when the profile recorded any
    sampled step. An empty cell pools its own kind's neighbours first, then the other kind's
    (whose ratios the linear model's ``random_rows`` slope has already put on one scale).
    """

    name = "feature"

    def __init__(self, profile: Profile, seed: int = 0, idx: np.ndarray | None = None,
                 features: tuple[str, ...] | None = None, split_mixed: bool | None = None,
                 split_random: bool | None = None):
        hint = profile.meta.get("oracle", {}) if isinstance(profile.meta, dict) else {}
        features = tuple(features or hint.get("features") or DEFAULT_FEATURES)
        self._split = bool(hint.get("split_mixed", False) if split_mixed is None else split_mixed)
        moe = hint.get("moe")
        if MOE_FEATURE in features and not moe:
            raise ValueError(f"the {MOE_FEATURE} feature needs meta['oracle']['moe'] = [experts, top_k] in the profile")
        self._moe = (int(moe[0]), int(moe[1])) if moe and MOE_FEATURE in features else None
        unknown = set(features) - set(LINEAR_FEATURES) - {MOE_FEATURE}
        if unknown:
            raise ValueError(f"unknown oracle features {sorted(unknown)}; choose from "
                             f"{(*LINEAR_FEATURES, MOE_FEATURE)}")
        active = [0] + [1 + LINEAR_FEATURES.index(n) for n in features if n != MOE_FEATURE]
        if self._moe:
            active.append(1 + len(LINEAR_FEATURES))
        feats, lat, keys = _training_rows(profile, idx, self._split)
        # Greedy and sampled steps get separate ratio cells when the profile holds sampled
        # ones: the sampler's cost per row grows with the batch (L2 spill of the float32
        # softmax over the vocabulary; ``benchmarks/sampler_cost.py``), which the linear
        # slope alone over- or under-states by ~1.5 % at 12-23 rows (README, Fidelity).
        self._split_random = (any(f.random_rows > 0 for f in feats) if split_random is None
                              else bool(split_random))
        cell_keys = [_key(f, self._split, True) for f in feats] if self._split_random else keys
        self._coef: dict[int, list[float]] = {}
        cls = np.array([f.oracle_class(self._split) for f in feats], dtype=int)
        X = np.array([[1.0] + [float(getattr(f, n)) for n in LINEAR_FEATURES] + [self._experts(f.num_tokens)]
                      for f in feats])
        X = X.reshape(-1, 2 + len(LINEAR_FEATURES))
        for c in CLASS_NAMES:
            m = cls == c
            if m.sum() >= MIN_FIT_ROWS_PER_FEATURE * X.shape[1]:
                self._coef[c] = _nonneg_fit(X[m], lat[m], active)
        if not self._coef:
            med = float(np.median(lat)) if len(lat) else 1000.0
            self._coef[DECODE] = [med] + [0.0] * (1 + len(LINEAR_FEATURES))
        floor = max(float(np.percentile(lat, 1)) * 0.5, 1.0) if len(lat) else 1.0
        self._floor = floor
        lin = np.array([self._linear(f) for f in feats])
        ratios = lat / lin if len(lat) else lat
        self._cells = _Cells(cell_keys, ratios)
        self._rng = random.Random(seed)
        self._gaps = _GapModel.build(profile, keys, idx, random.Random(seed + 1), self._split)

    def _experts(self, tokens: int) -> float:
        return expected_experts(tokens, *self._moe) if self._moe else 0.0

    def _linear(self, f: StepFeatures) -> float:
        c = (self._coef.get(f.oracle_class(self._split)) or self._coef.get(f.step_class)
             or next(iter(self._coef.values())))
        v = (c[0] + c[1] * f.num_tokens + c[2] * f.num_reqs + c[3] * f.prefill_tokens
             + c[4] * f.attn_work + c[5] * f.context_tokens + c[6] * f.random_rows)
        if self._moe and c[7]:
            v += c[7] * expected_experts(f.num_tokens, *self._moe)
        return v if v > self._floor else self._floor

    def predict_us(self, f: StepFeatures) -> float:
        cell = self._cells.lookup(self._cell_key(f))
        return self._linear(f) * (cell[0] if cell else 1.0)

    def sample_us(self, f: StepFeatures) -> float:
        lin = self._linear(f)
        cell = self._cells.lookup(self._cell_key(f))
        if cell is None:
            return lin
        samples = cell[1]
        return lin * samples[int(self._rng.random() * len(samples))]


class ConstantOracle(LatencyOracle):
    """Every step takes ``latency_us`` microseconds (for timing tests and benchmarks)."""

    name = "constant"

    def __init__(self, latency_us: float):
        self.latency_us = float(latency_us)

    def sample_us(self, f: StepFeatures) -> float:
        return self.latency_us

    def predict_us(self, f: StepFeatures) -> float:
        return self.latency_us


ORACLES = {"grid2d": Grid2DOracle, "feature": FeatureOracle}


def build_oracle(profile: Profile, kind: str = "feature", seed: int = 0) -> LatencyOracle:
    """Oracle by name: ``feature`` (default, kept) or ``grid2d`` (LLM-Emu baseline).

    Raises:
        ValueError: unknown ``kind``.
    """
    try:
        return ORACLES[kind](profile, seed=seed)
    except KeyError:
        raise ValueError(f"unknown oracle {kind!r}; choose one of {sorted(ORACLES)}") from None


def heldout_errors(profile: Profile, kind: str, test_frac: float = 0.2, seed: int = 0,
                   features: tuple[str, ...] | None = None, **oracle_kw) -> dict[str, dict[str, float]]:
    """Absolute % error of ``predict_us`` on held-out steps, per step class.

    Splits the steps at random (``seed``) into build (1-test_frac) and test
    sets, builds the oracle from the build set only, and returns
    {class name: {"median": %, "p90": %, "n": count}}. ``features``: the
    linear features of the ``feature`` oracle (ablations); ``oracle_kw``: more of its
    arguments (e.g. ``split_random``).
    """
    n = profile.num_steps
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    n_test = max(1, int(n * test_frac))
    test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
    kw = {"features": features} if features is not None else {}
    kw.update(oracle_kw)
    oracle = ORACLES[kind](profile, seed=seed, idx=train, **kw)
    return class_errors(oracle, profile, test)


def class_errors(oracle, profile: Profile, idx: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Absolute % error of ``oracle.predict_us`` on ``profile``'s steps (``idx``: a subset), per step class:
    {class name: {"median": %, "p90": %, "n": count}}."""
    feats = profile_features(profile, idx)
    lat = profile.steps["latency_us"]
    actual = (lat if idx is None else lat[idx]).astype(float)
    pred = np.array([oracle.predict_us(f) for f in feats])
    err = np.abs(pred - actual) / np.maximum(actual, 1.0) * 100.0
    cls = np.array([f.step_class for f in feats])
    out = {}
    for c, name in CLASS_NAMES.items():
        e = err[cls == c]
        if len(e):
            out[name] = {"median": float(np.median(e)), "p90": float(np.percentile(e, 90)), "n": int(len(e))}
    return out


def percent(x: float) -> str:
    """Format a percentage with one decimal (helper for reports)."""
    return f"{x:.1f}%" if math.isfinite(x) else "n/a"
