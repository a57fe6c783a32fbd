"""ProfilingExecutor: vLLM's own executor, timed per step, for real-mode capture.

``--distributed-executor-backend emu_executor.ProfilingExecutor``: it wraps
the executor vLLM itself would pick (UniProcExecutor for one GPU,
MultiprocExecutor for tensor parallel and on CPU; see
:class:`ProfilingExecutor`); ``emu_executor.profiling.UniProcProfilingExecutor``
and ``...MultiprocProfilingExecutor`` name one explicitly. The forward pass is untouched; around it we
record, per step:

* the step features from ``SchedulerOutput`` (:mod:`emu_executor.features`);
* the host gap ``t_submit[i] - t_done[i-1]``: the engine's own work between
  steps (scheduling, output processing), which on a small CPU host competes
  with the forward pass and is part of every inter-token latency; 0 when the
  steps overlapped (async scheduling) or the engine was idle;
* the device service time. With async scheduling the host submits step i
  while step i-1 may still run, so the service time is
  ``t_done[i] - max(t_submit[i], t_done[i-1])`` (LLM-Emu sec. 3.2);
  without it this reduces to ``t_done[i] - t_submit[i]``;

and per request the natural output length (requests that ended with EOS),
plus a fingerprint of the engine (model, device, block_size, KV blocks...).

The trace goes to ``EMUGATE_TRACE`` (JSON lines, appended in chunks of
``FLUSH_EVERY`` steps and by a flusher thread every ``FLUSH_S`` seconds, so a
killed server loses at most the last ``FLUSH_S`` seconds);
``python -m profiles build TRACE -o PROFILE`` turns it into a profile.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from concurrent.futures import Future

from vllm.v1.executor.abstract import Executor
from vllm.v1.executor.multiproc_executor import MultiprocExecutor
from vllm.v1.executor.uniproc_executor import UniProcExecutor

from emu_executor.executor import EmulatedExecutor
from emu_executor.features import EngineStep, RecomputeTracker, RequestTable, step_features
from emu_executor.fingerprint import engine_fingerprint
from profiles.format import STEP_COLUMNS
from profiles.hostinfo import host_cpu

logger = logging.getLogger("vllm.emugate.profiling")

FLUSH_EVERY = 256
FLUSH_S = 2.0  # the flusher thread's period (seconds)
_STEP_FIELDS = [c[0] for c in STEP_COLUMNS if c[0] not in ("latency_us", "host_gap_us")]
#: Engine columns recorded beside the profile's (not part of a profile): what the scheduler did
#: (:class:`emu_executor.features.EngineStep`) and when the step was submitted, in us since the
#: recorder started; read by :func:`profiles.build.read_trace_columns` for engine timelines.
ENGINE_FIELDS = ["t_submit_us", *EngineStep.__slots__]
#: A gap longer than this (s) between steps is idleness (no work), not host overhead.
MAX_HOST_GAP_S = 0.25


class _StepRecorder:
    """Mixin: wraps execute_model/sample_tokens of a vLLM executor with timing."""

    def _recorder_init(self) -> None:
        self._trace_path = os.environ.get("EMUGATE_TRACE")
        if not self._trace_path:
            raise RuntimeError("ProfilingExecutor needs EMUGATE_TRACE=<trace file to append to>")
        self._requests = RequestTable()
        self._recompute = RecomputeTracker()
        self._t0 = time.perf_counter()
        self._inflight: deque = deque()
        self._last_done = 0.0
        self._lock = threading.Lock()  # guards the row buffers
        self._io_lock = threading.Lock()  # one writer to the trace file at a time
        self._rows: list[list[int]] = []
        self._out_count: dict[str, int] = {}
        self._last_tok: dict[str, int] = {}
        self._out_lens: list[int] = []
        eos = getattr(self.model_config.hf_config, "eos_token_id", None)
        self._eos = eos[0] if isinstance(eos, list) and eos else eos
        self._stop = threading.Event()
        threading.Thread(target=self._flusher, daemon=True, name="emugate-trace-flush").start()
        logger.info("emugate: profiling executor recording steps to %s", self._trace_path)

    def _flusher(self) -> None:
        while not self._stop.wait(FLUSH_S):
            self._flush()

    # -- trace file
    def _write(self, obj: dict) -> None:
        with open(self._trace_path, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def _flush(self) -> None:
        with self._lock:
            rows, self._rows = self._rows, []
            lens, self._out_lens = self._out_lens, []
        with self._io_lock:
            if rows:
                cols = list(zip(*rows))
                self._write({"type": "steps", "columns": _STEP_FIELDS + ENGINE_FIELDS + ["latency_us", "host_gap_us"],
                             "rows": [list(c) for c in cols]})
            if lens:
                self._write({"type": "output_lengths", "values": lens})

    def _write_fingerprint(self) -> None:
        from vllm import __version__
        from vllm.platforms import current_platform
        fp = engine_fingerprint(self.vllm_config)
        try:
            dev, mem = current_platform.get_device_name(), int(current_platform.get_device_total_memory())
        except Exception:
            dev, mem = "unknown", 0
        backend = getattr(getattr(self.vllm_config, "attention_config", None), "backend", None)
        fp.update({
            "vllm_version": __version__, "device_name": dev, "device_memory_bytes": mem,
            "device_type": str(current_platform.device_type),
            "num_kv_blocks": self.vllm_config.cache_config.num_gpu_blocks,
            "attention_backend": str(backend) if backend else "auto",
            "cudagraph_mode": str(getattr(self.vllm_config.compilation_config, "cudagraph_mode", None)),
            "host_cpu": host_cpu(),
            "executor": next(c.__name__ for c in type(self).__mro__
                             if c.__name__ in ("UniProcExecutor", "MultiprocExecutor", "EmulatedExecutor")),
        })
        self._write({"type": "fingerprint", "fingerprint": fp})

    # -- hooks
    def _on_execute(self, so) -> None:
        for rid in so.finished_req_ids:
            n = self._out_count.pop(rid, None)
            if n is not None and self._last_tok.pop(rid, None) == self._eos:
                with self._lock:
                    self._out_lens.append(n)
        reqs = self._requests.update(so)
        eng = self._recompute.update(so, reqs)
        if so.total_num_scheduled_tokens:
            f = step_features(reqs)
            t = time.perf_counter()
            self._inflight.append(([getattr(f, k) for k in _STEP_FIELDS] + [int((t - self._t0) * 1e6)]
                                   + [getattr(eng, k) for k in EngineStep.__slots__], t))

    def _on_done(self, output) -> None:
        t_done = time.perf_counter()
        feats, t_submit = self._inflight.popleft()
        service = t_done - max(t_submit, self._last_done)
        gap = t_submit - self._last_done  # host work between steps (negative when overlapped)
        gap_us = int(gap * 1e6) if 0 < gap < MAX_HOST_GAP_S else 0
        self._last_done = t_done
        with self._lock:
            self._rows.append(feats + [max(1, int(service * 1e6)), gap_us])
        if output is not None:
            for rid, toks in zip(output.req_ids, output.sampled_token_ids):
                if toks:
                    self._out_count[rid] = self._out_count.get(rid, 0) + len(toks)
                    self._last_tok[rid] = toks[-1]
        if len(self._rows) >= FLUSH_EVERY:
            self._flush()

    def _timed(self, out, non_block: bool):
        if not non_block:
            self._on_done(out)
            return out
        timed: Future = Future()

        def _resolve(_=None):
            try:
                res = out.result()
            except Exception as e:
                timed.set_exception(e)
                return
            self._on_done(res)
            timed.set_result(res)

        class _Lazy(Future):
            # vLLM's async output futures compute on result(): keep it lazy.
            def result(self_inner, timeout=None):
                if not timed.done():
                    _resolve()
                return timed.result()

            def done(self_inner):
                return timed.done() or out.done()

        return _Lazy()


def _make(base):
    class _Profiling(_StepRecorder, base):
        def _init_executor(self) -> None:
            super()._init_executor()
            self._recorder_init()

        def initialize_from_config(self, kv_cache_configs) -> None:
            super().initialize_from_config(kv_cache_configs)
            self._write_fingerprint()

        def execute_model(self, scheduler_output, non_block: bool = False):
            self._on_execute(scheduler_output)
            out = super().execute_model(scheduler_output, non_block=non_block)
            if scheduler_output.total_num_scheduled_tokens and self._inflight:
                # A runner that returns its output from execute_model (no
                # sample_tokens call follows) finishes the step here.
                res = out.result() if non_block and out.done() else (None if non_block else out)
                if res is not None:
                    self._on_done(res)
            return out

        def sample_tokens(self, grammar_output, non_block: bool = False):
            out = super().sample_tokens(grammar_output, non_block=non_block)
            return self._timed(out, non_block)

        def shutdown(self) -> None:
            try:
                self._stop.set()
                self._flush()
            finally:
                super().shutdown()

    return _Profiling


class UniProcProfilingExecutor(_make(UniProcExecutor)):
    """UniProcExecutor that records a step trace (see module docstring)."""


class MultiprocProfilingExecutor(_make(MultiprocExecutor)):
    """MultiprocExecutor (tensor parallel, and vLLM's CPU platform) that records a step trace."""


class EmulatedProfilingExecutor(_make(EmulatedExecutor)):
    """EmulatedExecutor that records its own steps in the trace format above.

    ``latency_us`` is the emulated step's service time as served (the oracle's
    draw, plus any part of the drawn host gap that the emulated host did not
    already spend), ``host_gap_us`` the emulated engine's own work between
    steps. Comparing such a trace with a real one of the same workload
    (``benchmarks/step_trace_compare.py``) separates oracle error from
    scheduling differences. Chosen by the gateway when an emulated backend
    sets ``capture_trace``; needs ``EMUGATE_TRACE``.
    """


class ProfilingExecutor(Executor):
    """Records a step trace around the executor vLLM itself would have chosen.

    A profile is only faithful if it times the engine that real serving runs:
    vLLM uses UniProcExecutor for one GPU, MultiprocExecutor for tensor
    parallel, and on its CPU platform always MultiprocExecutor (the CPU
    platform turns "uni" into "mp": the worker process gets its own OMP set-up
    and one core stays reserved). Measured here: a UniProc capture on CPU
    made decode steps ~30% faster than mp serving. So instantiating this class
    returns a :class:`UniProcProfilingExecutor` or a
    :class:`MultiprocProfilingExecutor`, as vLLM would choose.
    """

    uses_ray = False
    supports_pp = False

    def __new__(cls, vllm_config):
        from vllm.platforms import current_platform
        multi = current_platform.is_cpu() or vllm_config.parallel_config.world_size > 1
        impl = MultiprocProfilingExecutor if multi else UniProcProfilingExecutor
        obj = impl.__new__(impl)
        obj.__init__(vllm_config)
        return obj

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True

    def _init_executor(self) -> None:  # pragma: no cover - never instantiated itself
        raise AssertionError("ProfilingExecutor dispatches in __new__")

    def collective_rpc(self, *a, **k):  # pragma: no cover
        raise AssertionError("ProfilingExecutor dispatches in __new__")

    def check_health(self) -> None:  # pragma: no cover
        raise AssertionError("ProfilingExecutor dispatches in __new__")
