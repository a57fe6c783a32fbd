"""Replica selection for one request (the gateway's ``routing`` setting).

Policies (all consider only *ready* replicas, minus those already tried):

``least_outstanding`` (default)
    fewest requests in flight through the gateway; ties broken round-robin.
``kv_aware``
    lowest ``outstanding + W_WAIT * vllm:num_requests_waiting
    + W_KV * vllm:kv_cache_usage_perc`` as last scraped from the replica's
    /metrics (queue first: a waiting request costs a whole scheduling slot;
    KV usage predicts preemption).
``prefix_affinity``
    rendezvous (highest-random-weight) hash of the first ``PREFIX_CHARS``
    characters of the prompt, so shared prefixes hit the same replica's
    prefix cache; falls back to least outstanding when the chosen replica has
    ``IMBALANCE`` more requests in flight than the least loaded one.
``session_affinity``
    rendezvous hash of the ``x-session-id`` header (or the body's ``user``),
    same fallback; no key: least outstanding.
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Sequence

from gateway.supervisor import Replica

W_WAIT = 4.0
W_KV = 2.0
PREFIX_CHARS = 256
IMBALANCE = 8

_rr = itertools.count()


def _least(cands: Sequence[Replica]) -> Replica:
    lo = min(r.outstanding for r in cands)
    best = [r for r in cands if r.outstanding == lo]
    return best[next(_rr) % len(best)] if len(best) > 1 else best[0]


def _hrw(key: str, cands: Sequence[Replica]) -> Replica:
    def score(r: Replica) -> bytes:
        return hashlib.blake2b(f"{key}|{r.name}".encode(), digest_size=8).digest()
    return max(cands, key=score)


def affinity_key(policy: str, body: dict | None, headers: dict[str, str]) -> str | None:
    """The string hashed by the affinity policies (None: no affinity for this request)."""
    if policy == "session_affinity":
        return headers.get("x-session-id") or (body or {}).get("user")
    if policy == "prefix_affinity" and body:
        if "messages" in body and isinstance(body["messages"], list):
            text = "".join(str(m.get("content", "")) for m in body["messages"] if isinstance(m, dict))
        else:
            text = str(body.get("prompt", ""))
        return text[:PREFIX_CHARS] or None
    return None


def pick(replicas: Sequence[Replica], policy: str = "least_outstanding", key: str | None = None,
         exclude: set[int] | None = None) -> Replica | None:
    """Choose a replica; None when no ready replica remains (``exclude``: ids already tried)."""
    cands = [r for r in replicas if r.ready and (not exclude or id(r) not in exclude)]
    if not cands:
        return None
    if len(cands) == 1:
        return cands[0]
    if policy == "kv_aware":
        return min(cands, key=lambda r: (r.outstanding + W_WAIT * r.num_waiting + W_KV * r.kv_usage,
                                         next(_rr) % 7))
    if policy in ("prefix_affinity", "session_affinity") and key:
        chosen = _hrw(key, cands)
        least = _least(cands)
        return least if chosen.outstanding - least.outstanding >= IMBALANCE else chosen
    return _least(cands)
