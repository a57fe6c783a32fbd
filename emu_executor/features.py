"""SchedulerOutput -> step features, shared by the emulated and profiling executors.

Keeps a small per-request table (prompt length) because a cached request's
``SchedulerOutput`` entry carries its computed and output token counts but not
its prompt length. Rules (VLLM_NOTES.md, checked against vLLM 0.32's GPU
runner ``discard_request_mask``):

* a request's output token is *due* in a step when
  ``num_computed + num_scheduled >= prompt_len + num_output_tokens``
  (the scheduler's ``num_output_tokens`` already counts async placeholders);
  a partial chunked prefill gets no token;
* a scheduled request is *decode* when it schedules exactly one token and its
  prompt is already computed; every other scheduled request is *prefill*
  (first prefill, a chunk of a chunked prefill, or a recompute after preemption);
* a request samples *randomly* when its ``SamplingParams.temperature`` is at
  least vLLM's ``_SAMPLING_EPS`` (1e-5, ``vllm/sampling_params.py``), else
  greedily; a step whose batch holds one random request runs the sampler's
  random path over all its rows (``StepFeatures.random_rows``).
"""
from __future__ import annotations

from dataclasses import dataclass

from profiles.oracle import StepFeatures


@dataclass(slots=True)
class ScheduledRequest:
    """One request's part in a step. Token counts are tokens."""

    req_id: str
    num_scheduled: int
    num_computed: int
    num_output_tokens: int  # output tokens before this step (incl. async placeholders)
    prompt_len: int
    due: bool  # this step emits an output token for it
    random: bool = False  # samples with temperature > 0 (vLLM's random path), else greedy
    num_spec: int = 0  # draft tokens scheduled for verification (speculative decoding), within num_scheduled


#: vLLM's ``_SAMPLING_EPS`` (``vllm/sampling_params.py``): below it a temperature is greedy.
SAMPLING_EPS = 1e-5


def samples_randomly(sampling_params) -> bool:
    """Whether a request's ``SamplingParams`` take vLLM's random sampling path
    (temperature >= ``SAMPLING_EPS``); False for None (pooling requests)."""
    t = getattr(sampling_params, "temperature", None)
    return t is not None and t >= SAMPLING_EPS


class RequestTable:
    """Tracks prompt lengths and sampling mode across steps (rows are dropped
    when vLLM lists the id in ``finished_req_ids``)."""

    def __init__(self) -> None:
        self.prompt_len: dict[str, int] = {}
        self.random: set[str] = set()

    def update(self, so) -> list[ScheduledRequest]:
        """Register new requests, forget finished ones, and list the step's requests."""
        for rid in so.finished_req_ids:
            self.forget(rid)
        nst = so.num_scheduled_tokens
        out: list[ScheduledRequest] = []
        for nr in so.scheduled_new_reqs:
            plen = nr.prompt_len
            self.prompt_len[nr.req_id] = plen
            rnd = samples_randomly(getattr(nr, "sampling_params", None))
            if rnd:
                self.random.add(nr.req_id)
            n = nst.get(nr.req_id, 0)
            if n:
                out.append(ScheduledRequest(nr.req_id, n, nr.num_computed_tokens, 0, plen,
                                            nr.num_computed_tokens + n >= plen, rnd))
        cr = so.scheduled_cached_reqs
        spec = getattr(so, "scheduled_spec_decode_tokens", None) or {}
        for i, rid in enumerate(cr.req_ids):
            n = nst.get(rid, 0)
            if not n:
                continue
            plen = self.prompt_len.get(rid)
            if plen is None:  # resumed with all tokens; prompt length unknown to us
                plen = len(cr.all_token_ids.get(rid, ())) - cr.num_output_tokens[i]
                self.prompt_len[rid] = plen
            comp, nout = cr.num_computed_tokens[i], cr.num_output_tokens[i]
            out.append(ScheduledRequest(rid, n, comp, nout, plen, comp + n >= plen + nout, rid in self.random,
                                        len(spec.get(rid, ()))))
        return out

    def forget(self, req_id: str) -> None:
        self.prompt_len.pop(req_id, None)
        self.random.discard(req_id)


def step_features(reqs: list[ScheduledRequest]) -> StepFeatures:
    """Aggregate a step's requests into the oracle's :class:`StepFeatures`."""
    num_tokens = prefill_tokens = decode_reqs = prefill_reqs = context = 0
    attn = 0.0
    for r in reqs:
        n = r.num_scheduled
        num_tokens += n
        context += r.num_computed
        attn += n * (r.num_computed + n / 2)
        if n - r.num_spec == 1 and r.num_computed >= r.prompt_len:  # a decode (verifying its drafts, if any)
            decode_reqs += 1
        else:
            prefill_reqs += 1
            prefill_tokens += n
    random_rows = len(reqs) if any(r.random for r in reqs) else 0
    return StepFeatures(num_tokens, len(reqs), prefill_tokens, decode_reqs, prefill_reqs,
                        context, int(attn), random_rows)


@dataclass(slots=True)
class EngineStep:
    """What the scheduler did in one step, beyond the oracle's features. Counts are
    requests, token counts tokens.

    ``preempted_reqs``: requests vLLM preempted while scheduling this step
    (``SchedulerOutput.preempted_req_ids``); ``resumed_reqs``: preempted requests
    scheduled again (``scheduled_cached_reqs.resumed_req_ids``);
    ``recomputed_tokens``: scheduled tokens whose KV the request had already
    computed before a preemption threw it away (below its high-water mark);
    ``cached_tokens``: tokens a request skipped on (re)admission because the
    prefix cache held them.
    """

    preempted_reqs: int
    resumed_reqs: int
    recomputed_tokens: int
    cached_tokens: int


class RecomputeTracker:
    """Per-request high-water mark of computed tokens, to count recomputation after preemption.

    vLLM's V1 scheduler preempts by freeing a request's KV blocks and setting
    ``num_computed_tokens = 0`` (``vllm/v1/core/sched/scheduler.py``,
    ``_preempt_request``); when it is resumed, the tokens it computes again
    (less any prefix-cache hit) are recomputation.
    """

    def __init__(self) -> None:
        self._high: dict[str, int] = {}

    def update(self, so, reqs: list[ScheduledRequest]) -> EngineStep:
        """Account one ``SchedulerOutput`` whose requests ``reqs`` came from :meth:`RequestTable.update`."""
        for rid in so.finished_req_ids:
            self._high.pop(rid, None)
        resumed = so.scheduled_cached_reqs.resumed_req_ids
        new_ids = {nr.req_id for nr in so.scheduled_new_reqs}
        recomputed = cached = 0
        for r in reqs:
            hi = self._high.get(r.req_id, 0)
            end = r.num_computed + r.num_scheduled
            recomputed += max(0, min(end, hi) - r.num_computed)
            if r.req_id in new_ids or r.req_id in resumed:
                cached += r.num_computed
            if end > hi:
                self._high[r.req_id] = end
        return EngineStep(len(so.preempted_req_ids or ()), len(resumed), recomputed, cached)
