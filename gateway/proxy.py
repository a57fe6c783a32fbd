"""The gateway's HTTP surface: a Starlette app that forwards to vLLM replicas.

Routes:

* ``POST /v1/*`` and vLLM's other model paths (``/tokenize``, ``/detokenize``,
  ``/pooling``, ``/score``, ``/rerank``...): routed by the body's ``model``
  (the only served model when the body names none); an unknown model gets
  OpenAI's 404 error JSON.
* ``GET /v1/models``: the union of every backend's model list.
* ``GET /health``: 200 when every model has a ready replica, else 503.
* ``GET /metrics``: the gateway's metrics plus each ready replica's
  ``vllm:*`` metrics labelled by backend, replica and mode.

Transparency: status, headers (less hop-by-hop ones) and body bytes come
back as vLLM sent them; a streamed response is forwarded one upstream HTTP
chunk at a time (:mod:`gateway.upstream` reports each chunk's end), so SSE
chunk boundaries and their timing are kept; a response with Content-Length
is answered in one piece with the same length. The forwarding route is a
plain ASGI callable (no Request/Response objects on the hot path) using one
pool of keep-alive connections (:class:`gateway.upstream.UpstreamPool`, a
lean httptools client: see its docstring and benchmarks/gateway_overhead.py).

Failures: a replica that refuses the connection (or drops it before any
response) is retried on another ready replica: nothing has reached the client
yet. Once bytes have been sent, an upstream failure ends a stream with an SSE
``error`` event in OpenAI's error shape (clients raise instead of hanging).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.config import Config
from gateway.metrics import GatewayMetrics, relabel_vllm_metrics, scrape_value
from gateway.routing import affinity_key, pick
from gateway.supervisor import Replica, Supervisor
from gateway.upstream import ConnectError, UpstreamError, UpstreamPool, UpstreamResponse

log = logging.getLogger("emugate.proxy")

_HOP = {b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te", b"trailers",
        b"transfer-encoding", b"upgrade", b"host", b"content-length", b"authorization"}
_RESP_SKIP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"date", b"server"}
MODEL_PATHS = ("/tokenize", "/detokenize", "/pooling", "/score", "/rerank", "/classify", "/invocations")


def error_body(message: str, type_: str, code: int | str, param: str | None = None) -> bytes:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}."""
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


async def _send_json(send, status: int, body: bytes, extra_headers: list | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())] + (extra_headers or [])})
    await send({"type": "http.response.body", "body": body})


class Forwarder:
    """ASGI endpoint that forwards one request to a replica of its model."""

    def __init__(self, gw: "Gateway") -> None:
        self.gw = gw

    async def __call__(self, scope, receive, send) -> None:
        gw = self.gw
        t_recv = time.perf_counter()
        headers = scope["headers"]
        if gw.api_keys:
            auth = next((v for k, v in headers if k == b"authorization"), b"")
            if auth.removeprefix(b"Bearer ").decode(errors="replace") not in gw.api_keys:
                gw.metrics.errors.labels("-", "auth").inc()
                return await _send_json(send, 401, error_body(
                    "Invalid or missing API key: send `Authorization: Bearer <key>` with a key from "
                    "the gateway config's [gateway].api_keys", "authentication_error", "invalid_api_key"))
        chunks = []
        more = True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            more = msg.get("more_body", False)
        body = b"".join(chunks)
        data: Any = None
        if body:
            try:
                data = json.loads(body)
            except ValueError as e:
                gw.metrics.errors.labels("-", "bad_request").inc()
                return await _send_json(send, 400, error_body(
                    f"The request body is not valid JSON: {e}", "BadRequestError", 400))
        model = data.get("model") if isinstance(data, dict) else None
        if model is None:
            if len(gw.supervisor.replicas) == 1:
                model = next(iter(gw.supervisor.replicas))
            else:
                gw.metrics.errors.labels("-", "bad_request").inc()
                return await _send_json(send, 400, error_body(
                    f"The request names no `model`; this gateway serves {sorted(gw.supervisor.replicas)}",
                    "invalid_request_error", 400, "model"))
        replicas = gw.supervisor.replicas.get(model) if isinstance(model, str) else None
        if replicas is None:
            gw.metrics.errors.labels("-", "unknown_model").inc()
            return await _send_json(send, 404, error_body(
                f"The model `{model}` does not exist. Served models: {sorted(gw.supervisor.replicas)}",
                "NotFoundError", 404, "model"))
        backend = replicas[0].backend.name
        if gw.queue_limit and gw.in_flight >= gw.queue_limit:
            gw.metrics.errors.labels(backend, "queue_full").inc()
            return await _send_json(send, 429, error_body(
                f"The gateway has {gw.in_flight} requests in flight (queue_limit {gw.queue_limit}); retry later",
                "RateLimitError", 429), [(b"retry-after", b"1")])
        hdrs = [(k, v) for k, v in headers if k not in _HOP]
        key = None
        if gw.routing in ("prefix_affinity", "session_affinity"):
            hmap = {k.decode(): v.decode(errors="replace") for k, v in hdrs}
            key = affinity_key(gw.routing, data if isinstance(data, dict) else None, hmap)
        path = scope["raw_path"].decode() if scope.get("raw_path") else scope["path"]
        if scope.get("query_string") and "?" not in path:
            path += "?" + scope["query_string"].decode()
        tried: set[int] = set()
        series = gw.children(backend)
        gw.in_flight += 1
        series.in_flight.inc()
        try:
            while True:
                r = pick(replicas, gw.routing, key, tried)
                if r is None:
                    gw.metrics.errors.labels(backend, "no_replica").inc()
                    return await _send_json(send, 503, error_body(
                        f"No ready replica for model `{model}` (starting or restarting); retry shortly",
                        "ServiceUnavailableError", 503), [(b"retry-after", b"2")])
                tried.add(id(r))
                r.outstanding += 1
                try:
                    done = await self._forward(r, scope["method"], path, body, hdrs, send, receive, t_recv,
                                               backend)
                finally:
                    r.outstanding -= 1
                if done:
                    return
        finally:
            gw.in_flight -= 1
            series.in_flight.dec()

    async def _forward_whole(self, r: Replica, resp: UpstreamResponse, out_headers: list, length: bytes, send,
                             t_sent: float, t_recv: float, t_head: float, backend: str) -> bool:
        """A response with Content-Length (not streamed): read it, answer in one send."""
        gw = self.gw
        try:
            data = await resp.read()
        except (UpstreamError, asyncio.TimeoutError) as e:
            gw.metrics.errors.labels(backend, "stream").inc()
            resp.close()
            await _send_json(send, 502, error_body(f"The backend replica {r.name} failed while sending this "
                                                   f"response ({e})", "BadGatewayError", 502))
            return True
        resp.release()
        out_headers.append((b"content-length", length))
        t0 = time.perf_counter()
        await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
        await send({"type": "http.response.body", "body": data})
        gw.children(backend).observe((t_sent - t_recv) + (t0 - t_head), resp.status)
        return True

    async def _forward(self, r: Replica, method: str, path: str, body: bytes, hdrs: list, send, receive,
                       t_recv: float, backend: str) -> bool:
        """Forward to ``r``; False means "not reached, try another replica"."""
        gw = self.gw
        t_sent = time.perf_counter()
        try:
            resp = await gw.upstream.request(r.host, r.port, method, path, hdrs, body)
        except ConnectError as e:
            gw.metrics.errors.labels(backend, "connect").inc()
            log.warning("%s unreachable (%s); trying another replica", r.name, e)
            return False
        except (UpstreamError, asyncio.TimeoutError) as e:
            gw.metrics.errors.labels(backend, "timeout" if isinstance(e, asyncio.TimeoutError) else "stream").inc()
            await _send_json(send, 504 if isinstance(e, asyncio.TimeoutError) else 502, error_body(
                f"Replica {r.name} failed before answering ({e})", "BadGatewayError", 502))
            return True
        t_head = time.perf_counter()
        out_headers = [(k, v) for k, v in resp.headers if k.lower() not in _RESP_SKIP]
        ctype = resp.header(b"content-type") or b""
        is_sse = ctype.startswith(b"text/event-stream")
        length = resp.header(b"content-length")
        if length is not None and not resp.chunked and not is_sse:
            return await self._forward_whole(r, resp, out_headers, length, send, t_sent, t_recv, t_head, backend)
        started = False
        client_gone = False

        async def watch_disconnect() -> None:
            # the body is consumed, so receive() now returns only on disconnect:
            # close upstream so vLLM aborts the request instead of generating for nobody
            nonlocal client_gone
            while (await receive())["type"] != "http.disconnect":
                pass
            client_gone = True
            resp.close()

        watcher = asyncio.create_task(watch_disconnect())
        try:
            t0 = time.perf_counter()
            await send({"type": "http.response.start", "status": resp.status, "headers": out_headers})
            started = True
            async for data in resp.chunks():
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            gw.children(backend).observe((t_sent - t_recv) + (t0 - t_head), resp.status)
        except (UpstreamError, asyncio.TimeoutError, ConnectionResetError) as e:
            if client_gone:
                gw.metrics.errors.labels(backend, "client_disconnect").inc()
                return True
            gw.metrics.errors.labels(backend, "stream").inc()
            log.warning("%s dropped a response mid-stream (%s)", r.name, e)
            msg = (f"The backend replica {r.name} failed while streaming this response "
                   f"({e.__class__.__name__}: {e}); the response is incomplete")
            if not started:
                await _send_json(send, 502, error_body(msg, "BadGatewayError", 502))
            elif is_sse:
                err = b"data: " + error_body(msg, "BadGatewayError", 502) + b"\n\n"
                await send({"type": "http.response.body", "body": err, "more_body": False})
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            resp.release()
        return True


class BackendSeries:
    """A backend's metric children: added latency, in-flight gauge, per-status counters."""

    def __init__(self, metrics: GatewayMetrics, backend: str) -> None:
        self._metrics, self._backend = metrics, backend
        self.added = metrics.added_latency.labels(backend)
        self.in_flight = metrics.in_flight.labels(backend)
        self._codes: dict[int, Any] = {}

    def observe(self, added_s: float, status: int) -> None:
        self.added.observe(added_s)
        c = self._codes.get(status)
        if c is None:
            c = self._codes[status] = self._metrics.requests.labels(self._backend, str(status))
        c.inc()


class Gateway:
    """Holds the supervisor, the upstream session and the counters the routes share."""

    def __init__(self, config: Config, supervisor: Supervisor | None = None, launch: bool = True):
        self.config = config
        self.supervisor = supervisor or Supervisor(config, launch=launch)
        self.metrics = GatewayMetrics()
        self.api_keys = set(config.gateway.api_keys)
        self.routing = config.gateway.routing
        self.queue_limit = config.gateway.queue_limit
        self.in_flight = 0
        self._children: dict[str, BackendSeries] = {}
        self.session: aiohttp.ClientSession | None = None
        self.upstream: UpstreamPool | None = None
        self._poller: asyncio.Task | None = None

    def children(self, backend: str) -> "BackendSeries":
        """Per-backend metric children, resolved once (``labels()`` costs ~10 us a call)."""
        c = self._children.get(backend)
        if c is None:
            c = self._children[backend] = BackendSeries(self.metrics, backend)
        return c

    async def startup(self) -> None:
        g = self.config.gateway
        self.upstream = UpstreamPool(connect_timeout=g.connect_timeout_s, timeout=g.request_timeout_s)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))  # scrapes only
        await self.supervisor.start(wait=True)
        if self.routing == "kv_aware":
            self._poller = asyncio.create_task(self._poll_load())

    async def shutdown(self) -> None:
        if self._poller:
            self._poller.cancel()
        await self.supervisor.stop()
        self.upstream.close()
        if self.session:
            await self.session.close()

    async def _poll_load(self) -> None:
        while True:
            for r in self.supervisor.all_replicas():
                if not r.ready:
                    continue
                with contextlib.suppress(Exception):
                    async with self.session.get(f"{r.url}/metrics") as resp:
                        text = await resp.text()
                    r.num_waiting = scrape_value(text, "vllm:num_requests_waiting") or 0.0
                    r.kv_usage = scrape_value(text, "vllm:kv_cache_usage_perc") or 0.0
            await asyncio.sleep(self.config.gateway.metrics_poll_s)

    # ------------------------------------------------------------ routes
    async def health(self, request: Request) -> Response:
        state = {m: [r.state for r in reps] for m, reps in self.supervisor.replicas.items()}
        ok = all(any(s == "ready" for s in states) for states in state.values())
        return JSONResponse({"status": "ok" if ok else "degraded", "models": state}, status_code=200 if ok else 503)

    async def models(self, request: Request) -> Response:
        seen: dict[str, dict] = {}
        for model, reps in self.supervisor.replicas.items():
            for r in reps:
                if not r.ready:
                    continue
                with contextlib.suppress(Exception):
                    async with self.session.get(f"{r.url}/v1/models") as resp:
                        for m in (await resp.json()).get("data", []):
                            seen.setdefault(m["id"], m)
                    break
        return JSONResponse({"object": "list", "data": list(seen.values())})

    async def metrics_route(self, request: Request) -> Response:
        parts = [self.metrics.render().decode()]
        seen: set[str] = set()

        async def fetch(r: Replica) -> tuple[Replica, str]:
            try:
                async with self.session.get(f"{r.url}/metrics") as resp:
                    return r, await resp.text()
            except Exception:
                return r, ""

        results = await asyncio.gather(*(fetch(r) for r in self.supervisor.all_replicas() if r.ready))
        for r, text in results:
            parts.append("\n".join(relabel_vllm_metrics(
                text, {"backend": r.backend.name, "replica": str(r.index), "mode": r.backend.mode}, seen)))
        return Response("\n".join(p for p in parts if p) + "\n", media_type="text/plain; version=0.0.4")


def create_app(config: Config, supervisor: Supervisor | None = None, launch: bool = True) -> Starlette:
    """The gateway ASGI app; its lifespan starts and stops the backends."""
    gw = Gateway(config, supervisor, launch)
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
        Route("/metrics", gw.metrics_route, methods=["GET"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/{rest:path}", fwd, methods=["POST"]),
    ] + [Route(p, fwd, methods=["POST"]) for p in MODEL_PATHS]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gw
    return app
