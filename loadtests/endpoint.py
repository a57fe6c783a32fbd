"""Waiting for an OpenAI endpoint to serve a model before a load test sends.

Kept apart from :mod:`loadtests.sharegpt` (a locustfile: importing it
imports Locust, which monkey-patches the process with gevent) so that
tests and other drivers can use it.
"""
from __future__ import annotations

import time


class EndpointNotReady(RuntimeError):
    """The endpoint did not list a usable model within ``--ready-check-timeout-sec`` (or refused the key)."""


def wait_for_model(host: str, model: str | None, headers: dict[str, str], timeout_s: float,
                   poll_s: float = 2.0, log=None) -> list[dict]:
    """Poll ``GET {host}/v1/models`` until it lists ``model`` (any model when None); return its ``data``.

    The gateway answers ``/v1/models`` as soon as it listens, with only the
    models that have a ready replica, so a load test started right after
    ``emugate serve`` would otherwise see an empty list while the backends
    load. Like ``vllm bench serve --ready-check-timeout-sec`` this waits
    (connection refused, 5xx and a list without the model all count as "not
    yet"), printing progress every 10 s through ``log``.

    :param timeout_s: seconds to wait in all; 0 polls once.
    :param poll_s: seconds between polls.
    :raises EndpointNotReady: after ``timeout_s`` without the model, or at once
        on 401/403 (a missing or wrong ``--api-key``) or another 4xx.
    """
    import httpx
    url = host.rstrip("/") + "/v1/models"
    t0 = time.monotonic()
    last_log, why = t0, "no answer yet"
    while True:
        try:
            r = httpx.get(url, headers=headers, timeout=10)
            if 400 <= r.status_code < 500:  # the client's fault: waiting will not mend it
                hint = "pass the gateway's key with --api-key or OPENAI_API_KEY " if r.status_code in (401, 403) \
                    else ""
                raise EndpointNotReady(f"GET {url} answered {r.status_code}: {hint}({r.text[:200]})")
            if r.status_code == 200:
                data = r.json().get("data") or []
                ids = [m.get("id") for m in data]
                if data and (model is None or model in ids):
                    return data
                why = f"models listed: {ids}" if data else "no model listed yet (backends still loading?)"
            else:
                why = f"HTTP {r.status_code}"
        except httpx.HTTPError as e:
            why = f"{type(e).__name__}: {e}"
        now = time.monotonic()
        if now - t0 >= timeout_s:
            want = f"model {model!r}" if model else "a model"
            raise EndpointNotReady(f"{url} did not list {want} within {timeout_s:g} s ({why}); is "
                                   f"`emugate serve` running and its backend healthy (GET /ready)? "
                                   f"Raise --ready-check-timeout-sec to wait longer.")
        if log and now - last_log >= 10:
            log(f"[sharegpt] waiting for {url} ({now - t0:.0f} s): {why}")
            last_log = now
        time.sleep(min(poll_s, max(0.0, timeout_s - (now - t0))))
