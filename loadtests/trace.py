"""Request traces: read them, window and scale them, and turn them into token-exact prompts.

Formats (:func:`read_trace`; chosen by ``fmt`` or from the file):

* **Mooncake JSONL** (kvcache-ai/Mooncake FAST'25 traces, which ``vllm bench serve``, Dynamo and
  AISimulate read): one object a line, ``timestamp`` (ms from the trace start), ``input_length``,
  ``output_length`` (tokens), ``hash_ids``: the prompt's prefix blocks of ``block_size`` tokens (512
  in Mooncake's release), equal ids at the same positions = a shared, cacheable prefix.
* **Azure LLM inference CSV** (Azure/AzurePublicDataset): ``TIMESTAMP`` (a date-time, or seconds),
  ``ContextTokens``, ``GeneratedTokens``; no prefix information.
* **emugate's recorded JSONL** (``[gateway] record_trace``, :mod:`gateway.recorder`): a header line
  ``{"format": "emugate-trace", "version": 1, "block_size": N, ...}``, then per request the Mooncake
  keys plus ``model``, ``endpoint``, ``stream``, ``max_tokens``, ``status``. The gateway writes a
  request when its response ends, so its lines are in completion order; the reader sorts them by
  arrival (stable). Mooncake and Azure files must already be sorted.

Prompts (:class:`PromptBuilder`): each hash id stands for one block of ``block_size`` token ids drawn
(seeded) from ordinary words of the served model's vocabulary, its first two tokens encoding the id
itself, so requests that share k hash ids share exactly k x block_size prompt tokens and no more,
whatever vLLM's own KV block size is. A request's prompt is its blocks cut to exactly
``input_length`` tokens, sent as token ids (``/v1/completions``), so the engine sees exactly the
trace's lengths and reuse; ``max_tokens = output_length`` with ``ignore_eos``.

No Locust import here: ``emugate simulate`` reads traces through this module too.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

#: Mooncake's prefix-block size (tokens).
MOONCAKE_BLOCK = 512


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file, the line and what to fix."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace. ``timestamp_s``: arrival, seconds from the trace's start."""

    timestamp_s: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    model: str | None = None
    endpoint: str | None = None


@dataclass
class Trace:
    """A trace: its requests (sorted by arrival) and the size of its prefix blocks (tokens)."""

    requests: list[TraceRequest]
    block_size: int = MOONCAKE_BLOCK
    source: str = ""
    over_max_model_len: int = 0  # requests clipped to fit max_model_len (see :func:`fit_max_model_len`)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.requests)

    @property
    def duration_s(self) -> float:
        return self.requests[-1].timestamp_s - self.requests[0].timestamp_s if self.requests else 0.0

    def ideal_hit_rate(self) -> float:
        """Blocks whose hash id was seen before (in arrival order) / all blocks: the prefix-cache hit
        rate an infinite cache would reach (0 for a trace without hash ids)."""
        seen: set[int] = set()
        hits = total = 0
        for r in self.requests:
            for h in r.hash_ids:
                total += 1
                if h in seen:
                    hits += 1
                else:
                    seen.add(h)
        return hits / total if total else 0.0


def _fail(path: Path, line: int | None, msg: str) -> TraceError:
    where = f"{path}:{line}" if line else str(path)
    return TraceError(f"{where}: {msg}")


def read_trace(path: str | Path, fmt: str | None = None) -> Trace:
    """Read a trace file (module docstring).

    Args:
        fmt: ``mooncake``, ``azure`` or ``emugate`` (default: from the header line, or ``.csv`` = azure).

    Raises:
        TraceError: the file is missing or empty, a line is malformed (line number given), a field is
            missing or negative, or timestamps go backwards.
    """
    p = Path(path)
    if not p.is_file():
        raise _fail(p, None, "no such trace file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise _fail(p, None, "the trace is empty")
    if fmt is None:
        first = text.lstrip().split("\n", 1)[0]
        fmt = "azure" if p.suffix.lower() == ".csv" else ("emugate" if '"emugate-trace"' in first else "mooncake")
    if fmt == "azure":
        trace = _read_azure(p, text)
    elif fmt in ("mooncake", "emugate"):
        trace = _read_jsonl(p, text)
    else:
        raise TraceError(f"unknown trace format {fmt!r}: use mooncake, azure or emugate")
    if not trace.requests:
        raise _fail(p, None, "the trace holds no request")
    return trace


def _read_jsonl(p: Path, text: str) -> Trace:
    block, reqs, last, recorded = MOONCAKE_BLOCK, [], -math.inf, False
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise _fail(p, n, f"not a JSON object ({e.msg}); each line must be one request") from None
        if not isinstance(d, dict):
            raise _fail(p, n, "not a JSON object; each line must be one request")
        if d.get("format") == "emugate-trace":
            block, recorded = int(d.get("block_size", block)), True
            continue
        missing = [k for k in ("timestamp", "input_length", "output_length") if k not in d]
        if missing:
            raise _fail(p, n, f"missing {', '.join(missing)} (a request needs timestamp in ms, input_length and "
                              "output_length in tokens)")
        try:
            ts, il, ol = float(d["timestamp"]) / 1000.0, int(d["input_length"]), int(d["output_length"])
            hids = tuple(int(h) for h in d.get("hash_ids") or ())
        except (TypeError, ValueError):
            raise _fail(p, n, "timestamp, input_length, output_length and hash_ids must be numbers") from None
        if il < 1 or ol < 0 or ts < 0:
            raise _fail(p, n, "input_length must be >= 1, output_length and timestamp >= 0")
        if ts < last and not recorded:
            raise _fail(p, n, f"timestamps go backwards ({ts * 1000:g} ms after {last * 1000:g} ms): sort the trace "
                              "by timestamp")
        last = ts
        reqs.append(TraceRequest(ts, il, ol, hids, d.get("model"), d.get("endpoint")))
    if recorded:  # written in completion order (module docstring)
        reqs.sort(key=lambda r: r.timestamp_s)
    return Trace(reqs, block, str(p))


def _azure_time(v: str) -> float:
    try:
        return float(v)
    except ValueError:
        v = re.sub(r"(\.\d{6})\d+", r"\1", v.strip())  # Azure's 7-digit fractions
        return dt.datetime.fromisoformat(v).timestamp()


def _read_azure(p: Path, text: str) -> Trace:
    rows = csv.DictReader(text.splitlines())
    need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
    if not rows.fieldnames or not need <= set(rows.fieldnames):
        raise _fail(p, 1, f"an Azure trace needs the columns {sorted(need)} (got {rows.fieldnames})")
    reqs, t0, last = [], None, -math.inf
    for n, r in enumerate(rows, 2):
        try:
            t = _azure_time(r["TIMESTAMP"])
            il, ol = int(r["ContextTokens"]), int(r["GeneratedTokens"])
        except (TypeError, ValueError):
            raise _fail(p, n, "TIMESTAMP must be a date-time or seconds; ContextTokens and GeneratedTokens "
                              "integers") from None
        if t < last:
            raise _fail(p, n, "timestamps go backwards: sort the trace by TIMESTAMP")
        last = t
        t0 = t if t0 is None else t0
        if il < 1 or ol < 0:
            raise _fail(p, n, "ContextTokens must be >= 1 and GeneratedTokens >= 0")
        reqs.append(TraceRequest(t - t0, il, ol))
    return Trace(reqs, MOONCAKE_BLOCK, str(p))


def window(trace: Trace, start_s: float = 0.0, duration_s: float | None = None, time_scale: float = 1.0) -> Trace:
    """The requests arriving in ``[start_s, start_s + duration_s)`` of trace time, re-based to 0 and
    with arrival times multiplied by ``time_scale`` (0.5 = twice as fast).

    Raises:
        TraceError: a non-positive time scale, or no request in the window.
    """
    if time_scale <= 0:
        raise TraceError(f"time scale must be > 0 (got {time_scale:g}); 0.5 replays twice as fast")
    end = math.inf if duration_s is None else start_s + duration_s
    sel = [r for r in trace.requests if start_s <= r.timestamp_s < end]
    if not sel:
        raise TraceError(f"{trace.source}: no request in [{start_s:g} s, {end:g} s) of the trace "
                         f"(it spans {trace.duration_s:.0f} s)")
    t0 = start_s
    out = [replace(r, timestamp_s=(r.timestamp_s - t0) * time_scale) for r in sel]
    return replace(trace, requests=out)


def fit_max_model_len(trace: Trace, max_model_len: int | None, scale_inputs: float = 1.0) -> Trace:
    """Input lengths multiplied by ``scale_inputs`` (blocks kept in proportion), and requests whose prompt plus
    output exceed ``max_model_len`` clipped to fit: their number is kept in ``over_max_model_len``, never
    dropped in silence."""
    if scale_inputs <= 0:
        raise TraceError(f"input scale must be > 0 (got {scale_inputs:g})")
    out, over = [], 0
    for r in trace.requests:
        il = max(1, int(round(r.input_length * scale_inputs)))
        hids = r.hash_ids[:max(1, math.ceil(il / trace.block_size))] if r.hash_ids else ()
        if max_model_len and il + r.output_length > max_model_len:
            over += 1
            ol = min(r.output_length, max_model_len - 1)
            il = max(1, max_model_len - ol)
            hids = hids[:math.ceil(il / trace.block_size)]
            r = replace(r, output_length=ol)
        out.append(replace(r, input_length=il, hash_ids=hids))
    t = replace(trace, requests=out, over_max_model_len=trace.over_max_model_len + over)
    if scale_inputs != 1.0:
        t.notes.append(f"input lengths scaled by {scale_inputs:g}")
    return t


def cached_word_pool(tokenizer_dir: str, mode: str | None = None, size: int = 8192) -> np.ndarray:
    """:func:`word_pool` of the tokenizer in ``tokenizer_dir``, cached on disk (``~/.cache/emugate/pools``):
    loading a tokenizer and decoding its vocabulary takes seconds."""
    import hashlib

    from loadtests.dataset import CACHE_DIR, get_tokenizer
    key = hashlib.sha256(f"{Path(tokenizer_dir).resolve()}|{mode}|{size}".encode()).hexdigest()[:16]
    path = CACHE_DIR / "pools" / f"{key}.json"
    if path.is_file():
        return np.asarray(json.loads(path.read_text()), dtype=np.int64)
    pool = word_pool(get_tokenizer(tokenizer_dir, mode), size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # per process: workers on one host may build it at once
    tmp.write_text(json.dumps(pool.tolist()))
    tmp.replace(path)
    return pool


def word_pool(tokenizer, size: int = 8192) -> np.ndarray:
    """Token ids of ordinary words of ``tokenizer`` (a space and 3-10 lower-case letters), the first
    ``size`` of them: what synthesized prompts are made of.

    Raises:
        TraceError: fewer than 256 such tokens.
    """
    pat = re.compile(r"^ [a-z]{3,10}$")
    vocab = getattr(tokenizer, "vocab_size", None) or len(tokenizer)
    ids = []
    for i in range(min(vocab, 200_000)):
        try:
            s = tokenizer.decode([i])
        except Exception:  # noqa: BLE001 - tokenizers raise many kinds on odd ids
            continue
        if pat.match(s):
            ids.append(i)
            if len(ids) >= size:
                break
    if len(ids) < 256:
        raise TraceError(f"the tokenizer yields only {len(ids)} plain word tokens; prompts need at least 256")
    return np.asarray(ids, dtype=np.int64)


class PromptBuilder:
    """Token-id prompts for trace requests (module docstring). Deterministic for ``seed``.

    Two requests that share k leading hash ids share their first k x ``block_size`` tokens; the
    next token differs too unless the two next ids are equal modulo the pool size (chance
    1 / len(pool) per pair), when one more token matches: vLLM caches whole blocks of 16 tokens, so
    its cache sees exactly the k shared blocks either way.

    Args:
        pool: token ids to draw from (:func:`word_pool`), at least 256.
        block_size: the trace's prefix-block size (tokens).
    """

    def __init__(self, pool: np.ndarray, block_size: int, seed: int = 0) -> None:
        self.pool, self.block_size, self.seed = np.asarray(pool, dtype=np.int64), block_size, seed
        if len(self.pool) < 256:
            raise TraceError("a prompt pool needs at least 256 token ids")

    def block(self, hash_id: int) -> np.ndarray:
        """The ``block_size`` token ids of a hash id: its first two tokens spell the id in base len(pool)."""
        rng = np.random.default_rng([self.seed, hash_id & 0xFFFFFFFF, hash_id >> 32])
        b = self.pool[rng.integers(0, len(self.pool), self.block_size)]
        n = len(self.pool)
        b[0], b[1] = self.pool[hash_id % n], self.pool[(hash_id // n) % n]
        return b

    def prompt(self, r: TraceRequest, request_index: int = 0) -> list[int]:
        """Exactly ``r.input_length`` token ids: ``r``'s blocks, then (without hash ids, or past them) tokens
        unique to this request."""
        parts, have = [], 0
        for h in r.hash_ids:
            if have >= r.input_length:
                break
            parts.append(self.block(h))
            have += self.block_size
        if have < r.input_length:  # no (or too few) hash ids: this request's own tokens
            rng = np.random.default_rng([self.seed, 1 << 20, request_index])
            extra = self.pool[rng.integers(0, len(self.pool), r.input_length - have)]
            if len(extra) >= 2:
                extra[0], extra[1] = self.pool[request_index % len(self.pool)], self.pool[-1 - request_index % 97]
            parts.append(extra)
        return [int(x) for x in np.concatenate(parts)[:r.input_length]]


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def to_mooncake(trace: Trace) -> Iterable[str]:
    """Mooncake JSONL lines of a trace (its block size kept; re-blocking needs the recorder's chain ids)."""
    for r in trace.requests:
        yield json.dumps({"timestamp": int(round(r.timestamp_s * 1000)), "input_length": r.input_length,
                          "output_length": r.output_length, "hash_ids": list(r.hash_ids)})
