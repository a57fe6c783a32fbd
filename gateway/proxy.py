"""The gateway's HTTP surface: a Starlette app that forwards to vLLM replicas.

Routes:

* ``POST /v1/*`` and vLLM's other model paths (``/tokenize``, ``/detokenize``,
  ``/pooling``, ``/score``, ``/rerank``...): routed by the body's ``model``
  (the only served model when the body names none); an unknown model gets
  OpenAI's 404 error JSON; a model with no ready replica gets 503 with
  ``Retry-After``.
* ``GET /v1/models``: the union of every ready replica's model list.
* ``GET /health``: liveness, 200 while the gateway process is sound (with each
  replica's state in the body); ``GET /ready``: readiness, 200 when every
  model (or ``?model=NAME``) has a ready replica, else 503, per model.
* ``GET /metrics``: the gateway's metrics plus each ready replica's
  ``vllm:*`` metrics labelled by backend, replica and mode (one valid
  exposition: :func:`gateway.metrics.merge_vllm_metrics`).

Security boundary:

* Path rule, keys and the route allowlist: :class:`gateway.guard.Guard`, the
  one middleware every request passes (400 for dot segments, encoded
  characters and empty segments; 401 without a key; only
  :data:`gateway.guard.FORWARDED_ROUTES` reach a replica). The client's
  ``Authorization`` is never forwarded: each replica has its own generated
  key (the supervisor's), sent by the gateway alone.
* Admission: ``queue_limit`` (requests in flight through the gateway) and
  ``max_concurrency_per_key`` are checked when a request arrives, before its
  body is read, so refused uploads never land in memory; 429 with
  ``Retry-After``.
* Input: bodies over ``max_body_bytes`` get 413 (from ``Content-Length``
  before reading, else while reading); headers not complete within
  ``header_timeout_s`` and bodies not complete within ``body_timeout_s`` get
  408 (:mod:`gateway.server`). The body is parsed only for what routing needs
  (``model``; the prompt under ``prefix_affinity``) with msgspec, which
  validates the whole document but builds no objects for the rest; invalid
  JSON or UTF-8 and nesting too deep for the parser are a 400, not a 500.
  Every error the gateway itself writes is OpenAI's error JSON naming the
  request id.
* Isolation: the hop to the replica is :mod:`gateway.h1` (llhttp): 1xx
  interim responses are skipped, ``Expect`` and hop-by-hop headers are not
  forwarded (:mod:`gateway.upstream`), and a connection goes back to the pool
  only after its whole response was read, so no response can reach another
  client.

Transparency: status, headers (less hop-by-hop ones) and body bytes come
back as vLLM sent them; a streamed response is forwarded one upstream HTTP
chunk at a time, so SSE chunk boundaries and their timing are kept; a
response with Content-Length is answered in one piece with the same length.
``X-Request-Id``: the client's (up to 128 of ``[A-Za-z0-9._:-]``) or a new
one, returned on every response and named in the gateway's error bodies and
log lines; it is not sent to vLLM (a client could otherwise collide with
another client's request id inside the engine).

Lifecycle of one request: the whole exchange has ``request_timeout_s`` from
its first byte (``asyncio.timeout_at``); a client that disconnects at any
point (before the replica answered, or mid-stream) makes the request's one
watcher task cancel the request's own task, which closes the upstream
connection, so vLLM aborts it. Past the deadline: 504 if nothing was sent
yet, else an SSE ``error`` event ends the stream. A replica that refuses the
connection, or drops it before answering, is retried on another ready replica
(nothing has reached the client yet). Once bytes have been sent, an upstream
failure ends a stream with an SSE ``error`` event in OpenAI's error shape.
"""
from __future__ import annotations

import asyncio
import codecs
import contextlib
import itertools
import json
import logging
import socket
import struct
import time
from typing import Any, Callable

import aiohttp
import msgspec
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import Config
from gateway.errors import error_body, request_id
from gateway.faults import HEADER as FAULT_HEADER
from gateway.faults import EngineFaults, FrontDoor, HttpFault, run_engine_loop, vllm_error
from gateway.faults import parse_header as parse_fault_header
from gateway.guard import FORWARDED_ROUTES, ApiKeys, Guard
from gateway.metrics import GatewayMetrics, merge_vllm_metrics, scrape_value
from gateway.routing import affinity_key, pick
from gateway.supervisor import Replica, Supervisor
from gateway.h1 import H1Pool, H1Response, UpstreamConnectError, UpstreamDisconnected, UpstreamError
from gateway.upstream import forward_headers, response_headers

log = logging.getLogger("emugate.proxy")

#: Bodies larger than this (bytes) are parsed in a worker thread, off the event loop.
PARSE_OFF_LOOP_BYTES = 256 * 1024
#: Timeout of the gateway's own GETs to a replica (model list, metric scrapes).
SCRAPE_TIMEOUT = aiohttp.ClientTimeout(total=10)


def error_response(request: Request, status: int, message: str, type_: str, code: int | str | None = None,
                   param: str | None = None, headers: dict[str, str] | None = None) -> Response:
    """OpenAI error JSON for the gateway's Starlette routes, naming (and returning) the request id."""
    rid = request_id(request.scope["headers"]).decode()
    return Response(error_body(message, type_, status if code is None else code, param, rid), status,
                    media_type="application/json", headers={**(headers or {}), "x-request-id": rid})


class _Reject(Exception):
    """A request the gateway answers itself: status, OpenAI error fields, extra headers."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None,
                 kind: str = "bad_request", headers: list | None = None, close: bool = False,
                 code: int | str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.kind = status, message, type_, param, kind
        self.code = status if code is None else code
        self.headers = list(headers or [])
        if close:
            self.headers.append((b"connection", b"close"))


class _ClientGone(Exception):
    """The client disconnected while the gateway was reading its request."""


class _Peek(msgspec.Struct):
    """What routing reads of a request body; msgspec validates the rest of the document but builds nothing."""

    model: Any = None


class _PeekAffinity(msgspec.Struct):
    """What the affinity policies read as well (:func:`gateway.routing.affinity_key`)."""

    model: Any = None
    user: Any = None
    messages: Any = None
    prompt: Any = None


_PEEK = msgspec.json.Decoder(_Peek)
_PEEK_AFFINITY = msgspec.json.Decoder(_PeekAffinity)
_UTF8_SLICE = 1 << 20


def _utf8_ok(body: bytes | bytearray) -> bool:
    """Whether ``body`` is valid UTF-8, checked in 1 MiB slices (never a whole decoded copy)."""
    if body.isascii():
        return True
    dec = codecs.getincrementaldecoder("utf-8")()
    mv = memoryview(body)
    try:
        for i in range(0, len(mv), _UTF8_SLICE):
            dec.decode(mv[i:i + _UTF8_SLICE])
        dec.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _peek(body: bytes | bytearray, affinity: bool) -> Any:
    """The body's routing fields (a msgspec Struct), or None when the top level is not a JSON object.

    Raises:
        _Reject: 400 for invalid JSON or UTF-8, or nesting too deep to parse.
    """
    try:
        try:
            doc = (_PEEK_AFFINITY if affinity else _PEEK).decode(body)
        except msgspec.ValidationError:  # the top level is not an object: the whole document still has to parse
            msgspec.json.decode(body)
            doc = None  # valid JSON, not an object: vLLM answers it (routed to the only model, if one)
    except RecursionError:
        raise _Reject(400, "The request body nests JSON too deeply to parse", "BadRequestError") from None
    except msgspec.DecodeError as e:
        raise _Reject(400, f"The request body is not valid JSON: {e}", "BadRequestError") from None
    if not _utf8_ok(body):
        raise _Reject(400, "The request body is not valid UTF-8", "BadRequestError")
    return doc


class _Exchange:
    """What has been sent to the client so far (the deadline handler needs it)."""

    __slots__ = ("send", "started", "is_sse", "finished", "status", "replica", "served_by", "tail", "transport")

    def __init__(self, send, keep_tail: bool = False, transport=None) -> None:
        self.send = send
        self.transport = transport  # the client connection (gateway.server puts it in the scope): TCP reset faults
        self.started = False
        self.is_sse = False
        self.finished = False
        self.status = 0
        self.replica = "-"
        self.served_by: Replica | None = None
        self.tail: list[bytes] | None = [] if keep_tail else None  # the response's last pieces (recording)

    async def start(self, status: int, headers: list) -> None:
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, more: bool) -> None:
        if not more:
            self.finished = True
        if self.tail is not None and data:
            self.tail = self.tail[-1:] + [data]
        await self.send({"type": "http.response.body", "body": data, "more_body": more})

    async def json(self, status: int, body: bytes, headers: list) -> None:
        """A whole JSON answer (an error the gateway writes itself)."""
        await self.start(status, [(b"content-type", b"application/json"),
                                  (b"content-length", str(len(body)).encode())] + headers)
        await self.body(body, more=False)


async def _until_disconnect(receive) -> None:
    # the request body has been read, so receive() now returns only when the
    # client disconnects (or after our response completed)
    while (await receive())["type"] != "http.disconnect":
        pass


#: A request's disconnect watcher starts this long (s) after the request was sent upstream: most
#: non-streaming requests are answered before, and spare the watcher task; a client that left
#: earlier is noticed then (its request is aborted in vLLM at most this late).
WATCH_AFTER_S = 0.05


class _Watch:
    """Cancels a request's task when its ``request_timeout_s`` deadline passes (``reason = "timeout"``) or its
    client disconnects (``reason = "gone"``); the task tells the two apart by :attr:`reason` (None: neither).

    One timer per request for the deadline, and a disconnect watcher task started only for requests still
    running after :data:`WATCH_AFTER_S`.
    """

    __slots__ = ("task", "reason", "receive", "ex", "_deadline", "_start", "_watcher")

    def __init__(self, task: asyncio.Task, t_deadline: float, receive, ex: "_Exchange") -> None:
        loop = asyncio.get_running_loop()
        self.task, self.receive, self.ex = task, receive, ex
        self.reason: str | None = None
        self._watcher: asyncio.Task | None = None
        self._deadline = loop.call_at(t_deadline, self._cancel, "timeout")
        self._start = loop.call_later(WATCH_AFTER_S, self._start_watcher)

    def _cancel(self, reason: str) -> None:
        if self.reason is None and not self.ex.finished:
            self.reason = reason
            self.task.cancel()

    def _start_watcher(self) -> None:
        self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        await _until_disconnect(self.receive)
        self._cancel("gone")

    def close(self) -> None:
        """Stop watching (the request is over, or being answered with an error)."""
        self._deadline.cancel()
        self._start.cancel()
        if self._watcher is not None:
            self._watcher.cancel()


class Forwarder:
    """ASGI endpoint that forwards one request to a replica of its model.

    Reached only through :class:`gateway.guard.Guard` (path rule and key
    already checked, ``scope["path"]`` normalized, ``scope["emugate.key"]``
    the client key's index when keys are configured).
    """

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw

    async def __call__(self, scope, receive, send) -> None:
        gw = self.gw
        t_recv = time.perf_counter()
        t_deadline = asyncio.get_running_loop().time() + gw.config.gateway.request_timeout_s
        headers = scope["headers"]
        rid = request_id(headers)
        rid_hdr = [(b"x-request-id", rid)]
        ex = _Exchange(send, keep_tail=gw.recorder is not None, transport=scope.get("emugate.transport"))
        # admission, before a byte of the body is read
        key = scope.get("emugate.key")
        refused = gw.admit(key)
        if refused:
            gw.metrics.errors.labels("-", "queue_full").inc()
            return await ex.json(429, error_body(refused, "RateLimitError", 429, request_id=rid.decode()),
                                 [(b"retry-after", b"1")] + rid_hdr)
        try:
            await self._handle(ex, scope, receive, headers, rid, t_recv, t_deadline)
        finally:
            gw.release(key)

    async def _handle(self, ex: _Exchange, scope, receive, headers, rid: bytes, t_recv: float,
                      t_deadline: float) -> None:
        gw = self.gw
        rid_s = rid.decode()
        affinity = gw.routing in ("prefix_affinity", "session_affinity")
        try:
            body = await self._read_body(receive, headers)
            doc: Any = None
            if body:
                if len(body) > PARSE_OFF_LOOP_BYTES:
                    doc = await asyncio.to_thread(_peek, body, affinity)
                else:
                    doc = _peek(body, affinity)
            model, replicas = self._route(doc)
        except _ClientGone:
            gw.metrics.errors.labels("-", "client_disconnect").inc()
            return
        except _Reject as r:
            gw.metrics.errors.labels("-", r.kind).inc()
            return await ex.json(r.status, error_body(r.message, r.type, r.code, r.param, rid_s),
                                 r.headers + [(b"x-request-id", rid)])
        backend = replicas[0].backend.name
        forced = None
        fault_hdr = next((v for k, v in headers if k == FAULT_HEADER), None)
        if fault_hdr is not None:
            fd = gw.front_doors.get(backend)
            try:
                if fd is None or not fd.header_allowed:
                    raise ValueError(f"X-Emugate-Fault is not enabled for backend {backend!r} (set "
                                     "faults.allow_header = true in its [backends.faults] table)")
                forced = parse_fault_header(fault_hdr)
            except ValueError as e:
                gw.metrics.errors.labels(backend, "bad_request").inc()
                return await ex.json(400, error_body(str(e), "invalid_request_error", 400, "X-Emugate-Fault", rid_s),
                                     [(b"x-request-id", rid)])
        hdrs = forward_headers(headers)
        key = None
        if affinity:
            hmap = {k.decode(): v.decode(errors="replace") for k, v in hdrs}
            fields = None if doc is None else {"user": doc.user, "messages": doc.messages, "prompt": doc.prompt}
            key = affinity_key(gw.routing, fields, hmap)
        del doc
        path = scope["path"]  # normalized by the Guard; forwarded as it is
        if scope.get("query_string"):
            path += "?" + scope["query_string"].decode("ascii")
        series = gw.children(backend)
        series.in_flight.inc()
        task = asyncio.current_task()
        watch = _Watch(task, t_deadline, receive, ex)
        try:
            await self._dispatch(ex, replicas, model, key, scope["method"], path, body, hdrs, t_recv, backend, rid,
                                 scope.get("emugate.key"), forced)
        except asyncio.CancelledError:
            if watch.reason is None:
                raise
            task.uncancel()
            watch.close()
            if watch.reason == "timeout":
                gw.metrics.errors.labels(backend, "timeout").inc()
                log.warning("request %s: request_timeout_s (%g s) reached; upstream request cancelled", rid_s,
                            gw.config.gateway.request_timeout_s)
                await self._fail(ex, 504, f"The request did not complete within request_timeout_s "
                                          f"({gw.config.gateway.request_timeout_s:g} s)", "GatewayTimeoutError", rid)
            else:  # the client left: vLLM sees its connection close and aborts the request
                gw.metrics.errors.labels(backend, "client_disconnect").inc()
                log.info("request %s: client disconnected; upstream request cancelled", rid_s)
        finally:
            watch.close()
            series.in_flight.dec()
            if gw.config.gateway.log_requests:
                log.info("request %s: model %s, replica %s, status %s, %.1f ms", rid_s, model, ex.replica,
                         ex.status or "-", (time.perf_counter() - t_recv) * 1e3)
            if gw.recorder is not None and ex.status and ex.served_by is not None:
                gw.recorder.submit(gw.record(ex, model, scope["path"], body, time.time() - (time.perf_counter()
                                                                                           - t_recv)))

    async def _read_body(self, receive, headers) -> bytearray | bytes:
        """The whole request body within ``max_body_bytes`` and ``body_timeout_s``.

        One buffer, sized from ``Content-Length`` when declared, so a body
        costs its own size in memory once.

        Raises:
            _Reject: 413 (too large; decided from Content-Length before
                reading when it is declared) or 408 (too slow).
            _ClientGone: the client disconnected.
        """
        g = self.gw.config.gateway
        limit = g.max_body_bytes
        declared = next((v for k, v in headers if k == b"content-length"), None)
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise _Reject(413, f"The request body is {int(declared)} bytes; this gateway accepts at most {limit} "
                               "(max_body_bytes)", "invalid_request_error", kind="too_large")
        buf: bytearray | None = None
        try:
            async with asyncio.timeout(g.body_timeout_s):
                while True:
                    msg = await receive()  # usually the whole body, already buffered by the server
                    if msg["type"] == "http.disconnect":
                        raise _ClientGone
                    b = msg.get("body", b"")
                    more = msg.get("more_body", False)
                    if buf is None:
                        if not more:
                            return b  # the common case: one message, no copy
                        buf = bytearray()
                    if len(buf) + len(b) > limit:
                        raise _Reject(413, f"The request body exceeds {limit} bytes (max_body_bytes)",
                                      "invalid_request_error", kind="too_large")
                    buf += b
                    if not more:
                        return buf
        except TimeoutError:
            raise _Reject(408, f"The request body did not arrive within body_timeout_s ({g.body_timeout_s:g} s)",
                          "invalid_request_error", kind="timeout", close=True) from None

    def _route(self, doc: Any) -> tuple[str, list[Replica]]:
        """(model, its replicas) for a peeked body; raises :class:`_Reject` (400 / 404)."""
        reps = self.gw.supervisor.replicas
        model = None if doc is None else doc.model
        if model is None:
            if len(reps) == 1:
                model = next(iter(reps))
            else:
                raise _Reject(400, f"The request names no `model`; this gateway serves {sorted(reps)}",
                              "invalid_request_error", "model")
        replicas = reps.get(model) if isinstance(model, str) else None
        if replicas is None and isinstance(model, str) and model in self.gw.adapters:
            replicas = reps.get(self.gw.adapters[model])  # a LoRA adapter: its base model's replicas
        if replicas is None:
            shown = model if isinstance(model, str) and len(model) <= 200 else f"{str(model)[:200]}..."
            raise _Reject(404, f"The model `{shown}` does not exist. Served models: {sorted(reps)}",
                          "NotFoundError", "model", kind="unknown_model")
        return model, replicas

    async def _fail(self, ex: _Exchange, status: int, message: str, type_: str, rid: bytes) -> None:
        """End the exchange with an error: JSON if nothing was sent, else an SSE error event (or cut the body)."""
        body = error_body(message, type_, status, request_id=rid.decode())
        if not ex.started:
            await ex.json(status, body, [(b"x-request-id", rid)])
        elif ex.finished:
            return
        elif ex.is_sse:
            await ex.body(b"data: " + body + b"\n\n", more=False)
        else:
            # a non-SSE body cut short: end it without the terminating chunk, so the client sees truncation
            raise ConnectionAbortedError(message)

    async def _dispatch(self, ex: _Exchange, replicas: list[Replica], model: str, key: str | None, method: str,
                        path: str, body: bytes, hdrs: list, t_recv: float, backend: str, rid: bytes,
                        client_key: int | None = None, forced=None) -> None:
        """Pick replicas until one answers; retries only where nothing reached the client or a replica.

        Faults (:mod:`gateway.faults`): once a replica is picked, the backend's front door (or the
        request's ``X-Emugate-Fault``) may answer instead with vLLM's error body (not retried: it stands
        for the replica's answer), or act on the stream it returns."""
        gw = self.gw
        tried: set[int] = set()
        outcome = ""
        while True:
            r = pick(replicas, gw.routing, key, tried)
            if r is None and outcome == "disconnected":
                await ex.json(502, error_body(
                    f"Every ready replica of `{model}` closed the connection before answering", "BadGatewayError",
                    502, request_id=rid.decode()), [(b"x-request-id", rid)])
                return
            if r is None:
                gw.metrics.errors.labels(backend, "no_replica").inc()
                msg = f"No ready replica for model `{model}` (starting or restarting); retry shortly"
                await ex.json(503, error_body(msg, "ServiceUnavailableError", 503, request_id=rid.decode()),
                              [(b"retry-after", b"2"), (b"x-request-id", rid)])
                return
            tried.add(id(r))
            ex.replica, ex.served_by = r.name, r
            http_fault = stream_fault = None
            if forced is not None:
                http_fault, stream_fault = (forced, None) if isinstance(forced, HttpFault) else (None, forced)
            elif (fd := gw.front_doors.get(backend)) is not None:
                http_fault, stream_fault = fd.pick(model, client_key, r.index)
            if http_fault is not None:
                status, fbody, fhdrs = vllm_error(http_fault, r.backend.max_model_len)
                gw.metrics.faults_injected.labels(backend, f"http_{status}").inc()
                gw.children(backend).observe(time.perf_counter() - t_recv, status)
                await ex.json(status, fbody, fhdrs + [(b"x-request-id", rid)])
                return
            r.outstanding += 1
            try:
                for attempt in (0, 1):
                    outcome = await self._forward(ex, r, method, path, body, hdrs, t_recv, backend, rid,
                                                  stream_fault)
                    if outcome != "disconnected" or attempt == 1:
                        break
                    # the replica closed a pooled connection before answering: once more, on a fresh one
            finally:
                r.outstanding -= 1
            if outcome == "done":
                return

    async def _forward(self, ex: _Exchange, r: Replica, method: str, path: str, body: bytes, hdrs: list,
                       t_recv: float, backend: str, rid: bytes, stream_fault=None) -> str:
        """Forward to ``r``. Returns "done", or "unreachable"/"disconnected" when nothing was answered."""
        gw = self.gw
        rid_s = rid.decode()
        if r.auth_bytes:
            hdrs = hdrs + [r.auth_bytes]
        t_sent = time.perf_counter()
        try:
            # the path passed the Guard's rule and is sent as it is
            resp = await gw.h1.request(method, path, hdrs, body, host=r.host, port=r.port, uds=r.uds,
                                       ssl=r.ssl if r.ssl is not None else None,
                                       connect_timeout_s=r.backend.connect_timeout_s)
        except UpstreamConnectError as e:
            gw.metrics.errors.labels(backend, "connect").inc()
            log.warning("request %s: %s unreachable (%s); trying another replica", rid_s, r.name, e)
            return "unreachable"
        except UpstreamDisconnected as e:
            # closed or reset before any response byte (e.g. a pooled connection the replica was closing)
            gw.metrics.errors.labels(backend, "connect").inc()
            log.warning("request %s: %s closed the connection before answering (%s)", rid_s, r.name, e)
            return "disconnected"
        except (UpstreamError, TimeoutError) as e:
            timeout = isinstance(e, TimeoutError)
            log.warning("request %s: %s failed before answering (%s: %s)", rid_s, r.name, e.__class__.__name__, e)
            gw.metrics.errors.labels(backend, "timeout" if timeout else "stream").inc()
            what = f"sent no response head for idle_timeout_s ({gw.config.gateway.idle_timeout_s:g} s)" \
                if timeout else f"failed before answering ({e})"
            await self._fail(ex, 504 if timeout else 502, f"Replica {r.name} {what}",
                             "GatewayTimeoutError" if timeout else "BadGatewayError", rid)
            return "done"
        try:
            await self._relay(ex, r, resp, t_sent, t_recv, backend, rid, stream_fault)
        finally:
            resp.release()  # closes the connection unless the whole body was read
        return "done"

    async def _relay(self, ex: _Exchange, r: Replica, resp: H1Response, t_sent: float,
                     t_recv: float, backend: str, rid: bytes, fault=None) -> None:
        """Send ``resp`` to the client: whole (Content-Length) or one upstream chunk at a time.

        ``fault``: a mid-stream fault (:class:`gateway.faults.StreamFault`) acting on a streamed (SSE)
        response after ``fault.after_chunks`` chunks; cut and reset return with the upstream response
        unread, so the caller's ``release()`` closes that connection and vLLM aborts the request."""
        gw = self.gw
        series = gw.children(backend)
        t_head = time.perf_counter()
        out_headers = response_headers(resp.headers)
        out_headers.append((b"x-request-id", rid))
        ctype = resp.header(b"content-type")
        ex.is_sse = ctype is not None and ctype.split(b";", 1)[0].strip().lower() == b"text/event-stream"
        try:
            if resp.content_length is not None and not ex.is_sse:
                data = await resp.read()
                out_headers.append((b"content-length", str(len(data)).encode()))
                t0 = time.perf_counter()
                await ex.start(resp.status, out_headers)
                await ex.body(data, more=False)
                series.observe((t_sent - t_recv) + (t0 - t_head), resp.status)
                return
            t0 = time.perf_counter()
            await ex.start(resp.status, out_headers)
            timed = ex.is_sse and resp.status == 200
            if fault is not None and not timed:
                fault = None  # mid-stream faults act on streamed answers only
            last = None
            n = 0
            while (data := await resp.next_chunk()) is not None:
                if fault is not None and n == fault.after_chunks:
                    gw.metrics.faults_injected.labels(backend, f"stream_{fault.action}").inc()
                    if fault.action == "stall":
                        await asyncio.sleep(fault.stall_s)
                        fault = None
                    else:
                        log.info("request %s: mid-stream fault %s after %d chunks", rid.decode(), fault.action, n)
                        if fault.action == "reset":
                            _reset(ex)
                            return
                        await ex.body(b"data: [DONE]\n\n" if fault.action == "cut_done" else b"", more=False)
                        series.observe((t_sent - t_recv) + (t0 - t_head), resp.status)
                        return
                n += 1
                await ex.body(data, more=True)
                if timed:
                    now = time.perf_counter()
                    if last is None:
                        series.ttft.observe(now - t_recv)
                    else:
                        series.itl.observe(now - last)
                    last = now
            await ex.body(b"", more=False)
            series.observe((t_sent - t_recv) + (t0 - t_head), resp.status)
        except (UpstreamError, TimeoutError) as e:
            gw.metrics.errors.labels(backend, "stream").inc()
            log.warning("request %s: %s failed mid-response (%s: %s)", rid.decode(), r.name,
                        e.__class__.__name__, e)
            await self._fail(ex, 502, f"The backend replica {r.name} failed while sending this response "
                                      f"({e.__class__.__name__}: {e}); the response is incomplete",
                             "BadGatewayError", rid)


def _reset(ex: _Exchange) -> None:
    """Reset the client's TCP connection (RST: SO_LINGER 0, then abort): the ``reset`` stream fault."""
    t = ex.transport
    if t is None:
        raise ConnectionResetError("mid-stream reset fault")  # no transport: end the response abnormally
    sock = t.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    ex.finished = True
    t.abort()


class BackendSeries:
    """A backend's metric children: added latency, TTFT/ITL, in-flight gauge, per-status counters."""

    def __init__(self, metrics: GatewayMetrics, backend: str) -> None:
        self._metrics, self._backend = metrics, backend
        self.added = metrics.added_latency.labels(backend)
        self.ttft = metrics.ttft.labels(backend)
        self.itl = metrics.itl.labels(backend)
        self.in_flight = metrics.in_flight.labels(backend)
        self._codes: dict[int, Any] = {}

    def observe(self, added_s: float, status: int) -> None:
        self.added.observe(added_s)
        c = self._codes.get(status)
        if c is None:
            c = self._codes[status] = self._metrics.requests.labels(self._backend, str(status))
        c.inc()


class Gateway:
    """Holds the supervisor, the admission counters and the metrics the routes share.

    Args:
        config: the gateway config.
        supervisor: an existing supervisor (default: one for ``config``).
        launch: False to attach to servers already running (``--no-launch``).
        on_fatal: called when no backend can ever become ready (every replica
            failed to start); the CLI stops the server and exits 1.
    """

    def __init__(self, config: Config, supervisor: Supervisor | None = None, launch: bool = True,
                 on_fatal: Callable[[str], None] | None = None):
        self.config = config
        self.supervisor = supervisor or Supervisor(config, launch=launch, on_fatal=on_fatal)
        self.metrics = GatewayMetrics()
        self.api_keys = ApiKeys(config.gateway.resolved_api_keys())
        self.routing = config.gateway.routing
        #: LoRA adapter name -> its backend's model name: from each backend's ``--lora-modules`` and from
        #: what its replicas list in /v1/models (adapters loaded at runtime), so requests naming an adapter
        #: reach the backend that serves it
        self.adapters: dict[str, str] = {n: b.model_name for b in config.backends for n in lora_module_names(
            b.extra_args)}
        self.queue_limit = config.gateway.queue_limit
        self.per_key_limit = config.gateway.max_concurrency_per_key
        self.in_flight = 0
        self.key_in_flight: dict[int, int] = {}
        self._children: dict[str, BackendSeries] = {}
        self._poller: asyncio.Task | None = None
        #: the data path's upstream client (the control plane's GETs use aiohttp: supervisor.sessions)
        self.h1 = H1Pool(config.gateway.connect_timeout_s, config.gateway.idle_timeout_s)
        g = config.gateway
        self.started = time.monotonic()
        self.admin_keys = ApiKeys(g.resolved_admin_keys())
        self.front_doors = {b.name: FrontDoor(b.faults, self.api_keys.index_of, self.started)
                            for b in config.backends if b.faults is not None}
        self.engine_faults = {b.name: EngineFaults(b.name, b.replicas, b.faults, self.started)
                              for b in config.backends if b.faults is not None and b.mode == "emulate" and not b.urls}
        self._fault_ids = itertools.count(1)
        self._fault_loop: asyncio.Task | None = None
        self.recorder = None
        if g.record_trace:
            from gateway.recorder import TraceRecorder
            self.recorder = TraceRecorder(g.record_trace, g.record_trace_block_size, g.record_trace_max_bytes,
                                          g.record_trace_keep)

    async def record(self, ex: "_Exchange", model: str, endpoint: str, body: bytes, arrival_unix_s: float) -> None:
        """Record one answered request (``[gateway] record_trace``; :mod:`gateway.recorder`), off its path."""
        from gateway.recorder import prompt_token_ids, tokenize_request, usage_from_response
        try:
            doc = json.loads(body) if body else {}
            if not isinstance(doc, dict):
                return
            tokens = prompt_token_ids(doc)
            r = ex.served_by
            req = None if tokens is not None else tokenize_request(endpoint, model, doc)
            if req is not None and r is not None:
                async with self.supervisor.sessions.get(r.uds).post(f"{r.url}/tokenize", json=req,
                                                                    headers=r.auth_headers(), ssl=r.aiohttp_ssl,
                                                                    timeout=SCRAPE_TIMEOUT) as resp:
                    if resp.status == 200:
                        tokens = (await resp.json()).get("tokens")
            usage = usage_from_response(None if ex.is_sse else (ex.tail[-1] if ex.tail else None),
                                        ex.tail if ex.is_sse else None)
            await self.recorder.record(arrival_unix_s=arrival_unix_s, model=model, endpoint=endpoint, body=doc,
                                       status=ex.status, usage=usage, tokens=tokens)
        except Exception as e:  # noqa: BLE001 - recording must never hurt serving
            log.warning("trace recording of a %s request failed: %s: %s", endpoint, e.__class__.__name__, e)

    def admit(self, key: int | None) -> str | None:
        """Count a request in (``key``: the client key's index), or say why not (the 429 message).

        Every admitted request must be :meth:`release` d once.
        """
        if self.queue_limit and self.in_flight >= self.queue_limit:
            return (f"The gateway has {self.in_flight} requests in flight (queue_limit {self.queue_limit}); "
                    "retry later")
        if self.per_key_limit and key is not None and self.key_in_flight.get(key, 0) >= self.per_key_limit:
            return (f"This API key has {self.per_key_limit} requests in flight (max_concurrency_per_key); "
                    "retry later")
        self.in_flight += 1
        if key is not None:
            self.key_in_flight[key] = self.key_in_flight.get(key, 0) + 1
        return None

    def release(self, key: int | None) -> None:
        """Count an admitted request out."""
        self.in_flight -= 1
        if key is not None:
            self.key_in_flight[key] -= 1

    def children(self, backend: str) -> "BackendSeries":
        """Per-backend metric children, resolved once (``labels()`` costs ~10 us a call)."""
        c = self._children.get(backend)
        if c is None:
            c = self._children[backend] = BackendSeries(self.metrics, backend)
        return c

    async def startup(self) -> None:
        """Start the replicas; returns at once (the gateway listens while they boot)."""
        self.started = time.monotonic()
        for fd in self.front_doors.values():
            fd.started = self.started
        for ef in self.engine_faults.values():
            ef.rebase(self.started)
        await self.supervisor.start(wait=False)
        if self.routing == "kv_aware":
            self._poller = asyncio.create_task(self._poll_load())
        if self.engine_faults:
            self._fault_loop = asyncio.create_task(run_engine_loop(self), name="engine-faults")

    async def shutdown(self) -> None:
        if self._poller:
            self._poller.cancel()
        if self._fault_loop:
            self._fault_loop.cancel()
        if self.recorder is not None:
            await self.recorder.close()
        self.h1.close()
        await self.supervisor.stop()

    async def _get(self, r: Replica, path: str) -> aiohttp.ClientResponse:
        return await self.supervisor.sessions.get(r.uds).get(f"{r.url}{path}", headers=r.auth_headers(),
                                                              ssl=r.aiohttp_ssl,
                                                              timeout=SCRAPE_TIMEOUT)

    async def _poll_load(self) -> None:
        while True:
            for r in self.supervisor.all_replicas():
                if not r.ready:
                    continue
                with contextlib.suppress(Exception):
                    async with await self._get(r, "/metrics") as resp:
                        text = await resp.text()
                    r.num_waiting = scrape_value(text, "vllm:num_requests_waiting") or 0.0
                    r.kv_usage = scrape_value(text, "vllm:kv_cache_usage_perc") or 0.0
            await asyncio.sleep(self.config.gateway.metrics_poll_s)

    # ------------------------------------------------------------ routes (keys checked by the Guard)
    async def health(self, request: Request) -> Response:
        """Liveness: 200 while the gateway serves HTTP; the body lists each replica's state."""
        state = {m: [r.state for r in reps] for m, reps in self.supervisor.replicas.items()}
        return JSONResponse({"status": "ok", "models": state})

    async def ready(self, request: Request) -> Response:
        """Readiness: 200 when every model (or ``?model=``) has a ready replica, else 503 with Retry-After."""
        only = request.query_params.get("model")
        reps = self.supervisor.replicas
        if only is not None and only not in reps:
            return error_response(request, 404, f"The model `{only}` does not exist. Served models: {sorted(reps)}",
                                  "NotFoundError", param="model")
        models = {m: {"ready": sum(r.ready for r in rs), "replicas": [r.state for r in rs],
                      **({"not_ready": {r.name: r.reason for r in rs if r.reason and not r.ready}}
                         if any(r.reason and not r.ready for r in rs) else {})}
                  for m, rs in reps.items() if only is None or m == only}
        ok = all(v["ready"] > 0 for v in models.values())
        return JSONResponse({"status": "ready" if ok else "not_ready", "models": models},
                            status_code=200 if ok else 503, headers=None if ok else {"retry-after": "2"})

    async def models(self, request: Request) -> Response:
        """``GET /v1/models``: the union of every ready replica's model list."""
        seen: dict[str, dict] = {}
        for model, reps in self.supervisor.replicas.items():
            for r in reps:
                if not r.ready:
                    continue
                with contextlib.suppress(Exception):
                    async with await self._get(r, "/v1/models") as resp:
                        for m in (await resp.json()).get("data", []):
                            seen.setdefault(m["id"], m)
                            mid = m["id"]
                            if mid != model and m.get("parent") == model and mid not in self.supervisor.replicas:
                                self.adapters[mid] = model  # a LoRA adapter vLLM lists under its base model
                    break
        return JSONResponse({"object": "list", "data": list(seen.values())})

    async def metrics_route(self, request: Request) -> Response:
        """``GET /metrics``: the gateway's own series and every ready replica's, labelled."""
        async def fetch(r: Replica) -> tuple[dict[str, str], str]:
            labels = {"backend": r.backend.name, "replica": str(r.index), "mode": r.backend.mode}
            try:
                async with await self._get(r, "/metrics") as resp:
                    return labels, await resp.text()
            except Exception:
                return labels, ""

        results = await asyncio.gather(*(fetch(r) for r in self.supervisor.all_replicas() if r.ready))
        text = self.metrics.render() + merge_vllm_metrics(list(results))
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")


async def _openai_http_error(request: Request, exc: HTTPException) -> Response:
    """Starlette's own 404/405 as OpenAI error JSON (bad input never gets a bare text page)."""
    msg = {404: f"No route for {request.method} {request.url.path}",
           405: f"Method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
    return error_response(request, exc.status_code, msg, "invalid_request_error", headers=exc.headers)


def lora_module_names(extra_args: list[str]) -> list[str]:
    """Adapter names in a vLLM command line's ``--lora-modules`` (``name=path`` or JSON ``{"name": ...}``
    entries, up to the next option)."""
    names, on = [], False
    for a in extra_args:
        if a.startswith("--"):
            on = a == "--lora-modules" or a.startswith("--lora-modules=")
            if "=" in a and on:
                a = a.split("=", 1)[1]
            else:
                continue
        if on:
            if a.lstrip().startswith("{"):
                with contextlib.suppress(ValueError, AttributeError):
                    names.append(str(json.loads(a)["name"]))
            elif "=" in a:
                names.append(a.split("=", 1)[0])
    return names


def create_app(config: Config, supervisor: Supervisor | None = None, launch: bool = True,
               on_fatal: Callable[[str], None] | None = None) -> Guard:
    """The gateway ASGI app: :class:`gateway.guard.Guard` in front of its routes; its lifespan starts and
    stops the backends. ``app.gateway`` is the :class:`Gateway`.

    Raises:
        gateway.config.ConfigError: an ``api_keys_env``/``api_keys_file`` source is missing or empty.
    """
    gw = Gateway(config, supervisor, launch, on_fatal)
    fwd = Forwarder(gw)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await gw.startup()
        try:
            yield
        finally:
            await gw.shutdown()

    routes = [
        Route("/health", gw.health, methods=["GET"]),
        Route("/ready", gw.ready, methods=["GET"]),
        Route("/metrics", gw.metrics_route, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
    ] + [Route(p, fwd, methods=["POST"]) for p in sorted(FORWARDED_ROUTES)]
    inner = Starlette(routes=routes, lifespan=lifespan,
                      exception_handlers={404: _openai_http_error, 405: _openai_http_error})
    public = {(m, p) for p in ("/health", "/ready") for m in ("GET", "HEAD")}
    if not config.gateway.metrics_require_key:
        public |= {("GET", "/metrics"), ("HEAD", "/metrics")}
    admin = None
    if gw.admin_keys:
        from gateway.admin import create_admin_app
        admin = create_admin_app(gw)
    app = Guard(inner, gw.api_keys, public, fwd, on_reject=lambda kind: gw.metrics.errors.labels("-", kind).inc(),
                admin=admin, admin_keys=gw.admin_keys)
    app.gateway = gw
    inner.state.gateway = gw
    return app
