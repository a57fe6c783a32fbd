"""Fault injection for staging: what a sick fleet does, on purpose (``[backends.faults]``).

Three places a fault can act:

**Front door** (``http``: the gateway answers instead of the replica) with the error bodies vLLM
0.32 itself sends (:func:`vllm_error`): 429 with ``Retry-After``, 500 (vLLM's ``GenerationError``),
503 (vLLM's ``QueueOverflowError``, with ``Retry-After``), 400 (vLLM's context-length
``VLLMValidationError``). Applies to real and emulated backends (real ones only with
``allow_on_real = true``).

**Mid-stream** (``stream``: the gateway acts on a streamed response after ``after_chunks`` upstream
chunks): ``cut`` ends the stream without ``data: [DONE]``, ``cut_done`` ends it after writing one,
``stall`` holds the stream ``stall_s`` seconds then resumes, ``reset`` resets the client's TCP
connection (RST). In the cut and reset cases the gateway closes its connection to the replica, so
vLLM aborts the request (its KV blocks are freed and ``vllm:num_requests_running`` drops at once).

**Engine** (``engine``: emulated backends only; :mod:`emu_executor.faults` inside the replica):
``slow`` (every step x ``factor``), ``spikes`` (a step x ``factor`` with ``probability``),
``kv_pressure`` (only ``fraction`` of the KV pool usable: vLLM preempts for real), ``hang`` (steps stop
completing, ``/health`` stays 200), ``crash`` (the replica's engine exits, at ``at_s`` or after
``after_requests`` admitted requests; once). ``cold_start`` delays readiness by the real model's
load time at every start.

Triggers (front-door and mid-stream faults): a request matching the filters (``models``, ``keys``
(client keys), ``replicas``, and ``window_s = [start, end]`` seconds since the gateway started)
fires when it is among the ``first_n`` matches, and is an ``every_n``-th match, and wins a draw of
``probability`` (each condition only when set; all set ones must hold). Draws come from one
``random.Random(seed)`` per backend: a run is reproducible for the same request order.

Engine faults form a scenario: each starts ``at_s`` seconds after the gateway started and lasts
``duration_s`` (default: until cleared). The gateway's fault loop (every :data:`LOOP_S`) writes
each replica's active engine faults to its faults file (atomically), logs every start and stop and
exports ``emugate_fault_active{backend,replica,kind}``.

At runtime: ``GET/PUT/DELETE /admin/faults`` (only when ``[gateway] admin_keys`` are configured;
an admin key, never a client key) and, where ``allow_header = true``, a per-request
``X-Emugate-Fault`` header (:func:`parse_header`), always stripped before forwarding.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

log = logging.getLogger("emugate.faults")

#: How often (s) the engine-fault loop recomputes each replica's faults.
LOOP_S = 0.2
#: The request header of per-request faults.
HEADER = b"x-emugate-fault"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Trigger(_Strict):
    """When a front-door or mid-stream fault fires (module docstring, Triggers)."""

    probability: float = Field(1.0, ge=0.0, le=1.0, description="chance that a matching request gets the fault")
    first_n: int | None = Field(None, ge=1, description="only the first N matching requests")
    every_n: int | None = Field(None, ge=1, description="only every N-th matching request")
    window_s: tuple[float, float] | None = Field(None, description="[start, end]: seconds since the gateway started")
    models: list[str] | None = Field(None, description="only requests for these served model names")
    keys: list[SecretStr] | None = Field(None, description="only requests made with these client keys (secrets)")
    replicas: list[int] | None = Field(None, description="only requests routed to these replica indices")

    @model_validator(mode="after")
    def _window(self):
        if self.window_s is not None and not (0 <= self.window_s[0] < self.window_s[1]):
            raise ValueError("window_s must be [start, end] with 0 <= start < end (seconds)")
        return self


class HttpFault(Trigger):
    """``[[backends.faults.http]]``: the gateway answers with vLLM's error instead of forwarding."""

    status: Literal[400, 429, 500, 503] = Field(description="429, 500, 503, or 400 (vLLM's context-length error)")
    retry_after_s: float | None = Field(None, ge=0, description="Retry-After header (s); default 1 for 429 and "
                                                                 "503, none otherwise")
    message: str | None = Field(None, description="error message (default: vLLM's own for that status)")


class StreamFault(Trigger):
    """``[[backends.faults.stream]]``: act on a streamed response after some chunks."""

    action: Literal["cut", "cut_done", "stall", "reset"] = Field(
        description="cut (no [DONE]), cut_done (after a data: [DONE]), stall (then resume), reset (TCP RST)")
    after_chunks: int = Field(1, ge=0, description="upstream chunks forwarded before the fault")
    stall_s: float = Field(2.0, gt=0, description="stall: seconds the stream is held")


class EngineFault(_Strict):
    """``[[backends.faults.engine]]``: a fault inside the emulated engine (module docstring)."""

    kind: Literal["slow", "spikes", "kv_pressure", "hang", "crash"] = Field(description="what goes wrong")
    replicas: list[int] | None = Field(None, description="replica indices (default: every replica)")
    at_s: float = Field(0.0, ge=0, description="seconds after the gateway started (admin: after the call)")
    duration_s: float | None = Field(None, gt=0, description="how long it lasts (default: until cleared)")
    factor: float | None = Field(None, gt=1.0, description="slow / spikes: step time multiplier")
    probability: float | None = Field(None, gt=0.0, le=1.0, description="spikes: chance per step")
    fraction: float | None = Field(None, gt=0.0, le=1.0, description="kv_pressure: usable share of the KV pool")
    after_requests: int | None = Field(None, ge=1, description="crash: after this many admitted requests "
                                                               "(default: at at_s)")

    @model_validator(mode="after")
    def _params(self):
        need = {"slow": ("factor",), "spikes": ("factor", "probability"), "kv_pressure": ("fraction",),
                "hang": (), "crash": ()}[self.kind]
        missing = [p for p in need if getattr(self, p) is None]
        if missing:
            raise ValueError(f"kind = '{self.kind}' needs {', '.join(missing)}")
        extra = [p for p in ("factor", "probability", "fraction", "after_requests")
                 if getattr(self, p) is not None and p not in need and not (p == "after_requests"
                                                                             and self.kind == "crash")]
        if extra:
            raise ValueError(f"kind = '{self.kind}' takes no {', '.join(extra)}")
        return self


class ColdStart(_Strict):
    """``[backends.faults.cold_start]``: readiness delayed at every start by the model's load time."""

    startup_s: float | None = Field(None, ge=0, description="a fixed load time (s)")
    load_gbps: float | None = Field(None, gt=0, description="or: the model's weight bytes over this load bandwidth "
                                                           "(GB/s)")

    @model_validator(mode="after")
    def _one(self):
        if (self.startup_s is None) == (self.load_gbps is None):
            raise ValueError("give exactly one of startup_s or load_gbps")
        return self


class FaultsConfig(_Strict):
    """``[backends.faults]``: the faults of one backend (gateway/faults.py)."""

    allow_header: bool = Field(False, description="honour the X-Emugate-Fault request header (off: 400)")
    allow_on_real: bool = Field(False, description="let front-door and mid-stream faults act on a real backend")
    seed: int = Field(0, description="seed of the fault draws")
    scenario: str | None = Field(None, description="a TOML file with more [[http]], [[stream]], [[engine]] tables "
                                                   "(relative to the config file)")
    http: list[HttpFault] = Field(default_factory=list, description="front-door faults")
    stream: list[StreamFault] = Field(default_factory=list, description="mid-stream faults")
    engine: list[EngineFault] = Field(default_factory=list, description="engine faults (emulated backends)")
    cold_start: ColdStart | None = Field(None, description="readiness delayed by the model's load time")


# --------------------------------------------------------------------------- vLLM's own error bodies
#: (type, message) vLLM 0.32 sends per status (vllm/exceptions.py: GenerationError, QueueOverflowError;
#: vllm/renderers/params.py: the context-length VLLMValidationError). 429 is no vLLM error: it is what a
#: rate-limiting front end sends, with type HTTPStatus.phrase as vLLM's GracefulHTTPError types are.
VLLM_ERRORS = {
    500: ("InternalServerError", "Internal server error"),
    503: ("Service Unavailable", "The engine is currently busy and cannot accept new requests. "
                                 "Please try again later or on a different instance."),
    429: ("Too Many Requests", "Too many requests: rate limit exceeded. Please retry later."),
}


def vllm_error(f: HttpFault, max_model_len: int | None = None) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
    """(status, body, extra headers) of an HTTP fault, shaped as vLLM sends it."""
    param = None
    if f.status == 400:
        mml = max_model_len or 131072
        n = mml + 1
        msg = (f"This model's maximum context length is {mml} tokens. However, your prompt contains {n} input tokens, "
               f"which exceeds this limit even without any output tokens. Please reduce the length of the input "
               f"prompt. (parameter=input_tokens, value={n})")
        type_, param = "BadRequestError", "input_tokens"
    else:
        type_, msg = VLLM_ERRORS[f.status]
    body = json.dumps({"error": {"message": f.message or msg, "type": type_, "param": param,
                                 "code": f.status}}).encode()
    headers = []
    ra = f.retry_after_s if f.retry_after_s is not None else (1.0 if f.status in (429, 503) else None)
    if ra is not None:
        headers.append((b"retry-after", str(max(0, math.ceil(ra))).encode()))
    return f.status, body, headers


# --------------------------------------------------------------------------- header
def parse_header(value: bytes) -> HttpFault | StreamFault:
    """``X-Emugate-Fault`` -> the fault it asks for.

    Forms: ``http=429[;retry_after=2]``, ``http=500``, ``http=503``, ``http=400``,
    ``stream=cut|cut_done|reset[;after=N]``, ``stream=stall[;after=N][;s=SECONDS]``.

    Raises:
        ValueError: anything else (the message says what is accepted).
    """
    usage = ("X-Emugate-Fault: write http=429|500|503|400[;retry_after=S] or "
             "stream=cut|cut_done|stall|reset[;after=N][;s=S]")
    try:
        parts = dict(p.strip().split("=", 1) for p in value.decode("ascii").split(";") if p.strip())
    except (ValueError, UnicodeDecodeError):
        raise ValueError(usage) from None
    try:
        if set(parts) <= {"http", "retry_after"} and "http" in parts:
            ra = parts.get("retry_after")
            return HttpFault(status=int(parts["http"]), retry_after_s=float(ra) if ra is not None else None)
        if set(parts) <= {"stream", "after", "s"} and "stream" in parts:
            kw = {"action": parts["stream"], "after_chunks": int(parts.get("after", 1))}
            if "s" in parts:
                kw["stall_s"] = float(parts["s"])
            return StreamFault(**kw)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{usage} ({str(e).splitlines()[0] if str(e) else e.__class__.__name__})") from None
    raise ValueError(usage)


# --------------------------------------------------------------------------- runtime
class FrontDoor:
    """One backend's front-door and mid-stream faults: which fault (if any) a request gets.

    Args:
        faults: the backend's faults config (None: none configured).
        key_index: maps a client key (secret) to the gateway's key index (None if it is not one).
        started: the gateway's start (``time.monotonic()`` s).
    """

    def __init__(self, faults: FaultsConfig | None, key_index, started: float) -> None:
        self.config = faults
        self.started = started
        self.rng = random.Random(faults.seed if faults else 0)
        self.http: list[tuple[HttpFault, set | None]] = []
        self.stream: list[tuple[StreamFault, set | None]] = []
        self.counts: dict[int, int] = {}
        self.extra: list[tuple[int, HttpFault | StreamFault]] = []  # admin-added (id, fault)
        for f in (faults.http if faults else []):
            self.http.append((f, self._keys(f, key_index)))
        for f in (faults.stream if faults else []):
            self.stream.append((f, self._keys(f, key_index)))
        self._key_index = key_index

    @staticmethod
    def _keys(f: Trigger, key_index) -> set | None:
        return None if f.keys is None else {key_index(k) for k in f.keys} - {None}

    @property
    def header_allowed(self) -> bool:
        return bool(self.config and self.config.allow_header)

    def add(self, fid: int, f: HttpFault | StreamFault) -> None:
        """An admin-added fault (removed with :meth:`remove`)."""
        self.extra.append((fid, f))

    def remove(self, fid: int | None = None) -> int:
        """Remove the admin-added fault ``fid`` (None: all of them); returns how many."""
        before = len(self.extra)
        self.extra = [(i, f) for i, f in self.extra if fid is not None and i != fid]
        return before - len(self.extra)

    def _fires(self, slot: int, f: Trigger, keys: set | None, model: str, key: int | None, replica: int,
               now: float) -> bool:
        if f.models is not None and model not in f.models:
            return False
        if keys is not None and key not in keys:
            return False
        if f.replicas is not None and replica not in f.replicas:
            return False
        if f.window_s is not None and not (f.window_s[0] <= now - self.started < f.window_s[1]):
            return False
        n = self.counts[slot] = self.counts.get(slot, 0) + 1
        if f.first_n is not None and n > f.first_n:
            return False
        if f.every_n is not None and n % f.every_n:
            return False
        return f.probability >= 1.0 or self.rng.random() < f.probability

    def pick(self, model: str, key: int | None, replica: int) -> tuple[HttpFault | None, StreamFault | None]:
        """The HTTP fault and the stream fault (each the first that fires, or None) for one request."""
        now = time.monotonic()
        http = stream = None
        extra_http = [(f, self._keys(f, self._key_index)) for _, f in self.extra if isinstance(f, HttpFault)]
        extra_stream = [(f, self._keys(f, self._key_index)) for _, f in self.extra if isinstance(f, StreamFault)]
        for i, (f, keys) in enumerate(self.http + extra_http):
            if self._fires(i, f, keys, model, key, replica, now):
                http = f
                break
        if http is None:
            for i, (f, keys) in enumerate(self.stream + extra_stream):
                if self._fires(10_000 + i, f, keys, model, key, replica, now):
                    stream = f
                    break
        return http, stream


class EngineFaults:
    """Which engine faults are on for each replica of one backend at a time (module docstring)."""

    def __init__(self, backend: str, replicas: int, faults: FaultsConfig | None, started: float) -> None:
        self.backend = backend
        self.replicas = replicas
        self.started = started
        # (id, fault, start (monotonic s), fired-per-replica for crash)
        self.items: list[tuple[int, EngineFault, float]] = [(-1 - i, f, started + f.at_s)
                                                             for i, f in enumerate(faults.engine if faults else [])]
        self.crashed: set[tuple[int, int]] = set()  # (fault id, replica) crash faults already fired

    def rebase(self, started: float) -> None:
        """The gateway (re)started its clock at ``started``: configured faults count ``at_s`` from it."""
        self.items = [(i, f, started + f.at_s) if i < 0 else (i, f, t) for i, f, t in self.items]
        self.started = started

    def add(self, fid: int, f: EngineFault, now: float | None = None) -> None:
        """An admin-added fault, starting ``f.at_s`` seconds from now."""
        self.items.append((fid, f, (time.monotonic() if now is None else now) + f.at_s))

    def remove(self, fid: int | None = None, kind: str | None = None) -> int:
        """Remove faults by id, kind, or all (both None); returns how many."""
        before = len(self.items)
        self.items = [(i, f, t) for i, f, t in self.items
                      if not ((fid is None or i == fid) and (kind is None or f.kind == kind))]
        return before - len(self.items)

    def active(self, replica: int, now: float) -> list[tuple[int, EngineFault]]:
        """The faults on for ``replica`` at ``now`` (monotonic s)."""
        out = []
        for fid, f, t0 in self.items:
            if f.replicas is not None and replica not in f.replicas:
                continue
            if now < t0 or (f.duration_s is not None and now >= t0 + f.duration_s):
                continue
            if f.kind == "crash" and (fid, replica) in self.crashed:
                continue
            out.append((fid, f))
        return out

    def state(self, replica: int, now: float) -> dict:
        """The faults file's content for ``replica`` (:mod:`emu_executor.faults`)."""
        st: dict = {}
        for _, f in self.active(replica, now):
            if f.kind == "slow":
                st["slow"] = st.get("slow", 1.0) * f.factor
            elif f.kind == "spikes":
                st["spikes"] = [f.probability, f.factor]
            elif f.kind == "kv_pressure":
                st["kv_fraction"] = min(st.get("kv_fraction", 1.0), f.fraction)
            elif f.kind == "hang":
                st["hang"] = True
            elif f.kind == "crash":
                if f.after_requests is not None:
                    st["crash_after_requests"] = f.after_requests
                else:
                    st["crash"] = True
        return st

    def mark_crashed(self, replica: int, now: float) -> list[int]:
        """A replica went down: its active crash faults have fired (never again). Returns their ids."""
        ids = [fid for fid, f in self.active(replica, now) if f.kind == "crash"]
        for fid in ids:
            self.crashed.add((fid, replica))
        return ids


def write_state(path: Path, state: dict) -> None:
    """Write a replica's faults file atomically (0600: in the gateway's private runtime directory)."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(state, f)
    os.replace(tmp, path)


def startup_seconds(cold: ColdStart | None, model_dir: str, dtype: str | None, tp: int) -> float:
    """Cold-start seconds: ``startup_s``, or the model's weight bytes per GPU / ``load_gbps`` (GB/s).

    Weight bytes come from the model's config.json (:class:`profiles.synth.ModelDims`), 2 bytes per
    parameter (bf16/fp16), 1 for fp8.
    """
    if cold is None:
        return 0.0
    if cold.startup_s is not None:
        return float(cold.startup_s)
    from profiles.synth import ModelDims
    dims = ModelDims.from_config(Path(model_dir) / "config.json")
    wb = dims.weight_bytes("fp8" if (dtype or "").startswith("fp8") else "bf16", tp)
    return wb / (cold.load_gbps * 1e9)


async def run_engine_loop(gw) -> None:
    """The gateway's engine-fault loop: every :data:`LOOP_S`, write each emulated replica's faults file
    when its faults change, log starts and stops, set ``emugate_fault_active``, and mark crash faults
    fired once their replica goes down."""
    last: dict[tuple[str, int], dict] = {}
    kinds_on: dict[tuple[str, int], set[str]] = {}
    was_ready: dict[tuple[str, int], bool] = {}
    while True:
        now = time.monotonic()
        for reps in gw.supervisor.replicas.values():
            for r in reps:
                ef = gw.engine_faults.get(r.backend.name)
                path = gw.supervisor.faults_file(r)
                if ef is None or path is None:
                    continue
                k = (r.backend.name, r.index)
                if was_ready.get(k) and not r.ready and any(c in last.get(k, {}) for c in
                                                              ("crash", "crash_after_requests")):
                    for fid in ef.mark_crashed(r.index, now):
                        log.warning("fault %s: crash fired on %s (it will not fire again)", fid, r.name)
                was_ready[k] = r.ready
                st = ef.state(r.index, now)
                if st != last.get(k):
                    write_state(path, st)
                    last[k] = st
                on = {f.kind for _, f in ef.active(r.index, now)}
                was = kinds_on.get(k, set())
                for kind in sorted(on - was):
                    log.warning("fault on: %s %s", r.name, kind)
                for kind in sorted(was - on):
                    log.warning("fault off: %s %s", r.name, kind)
                for kind in on | was:
                    gw.metrics.fault_active.labels(r.backend.name, str(r.index), kind).set(1 if kind in on else 0)
                kinds_on[k] = on
        await asyncio.sleep(LOOP_S)
