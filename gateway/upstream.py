"""A lean HTTP/1.1 client for the gateway's hop to its vLLM replicas.

Why not aiohttp/httpx: on this 2-core host every CPU millisecond the gateway
spends is taken from vLLM's API server (BASELINES.md: httpx costs ~0.8 ms CPU
per POST; aiohttp measured ~0.5 ms of our 0.72 ms per request). The hop is
always plain HTTP/1.1 over loopback to a vLLM server we started, so a small
client suffices: one ``asyncio.Protocol`` per keep-alive connection, responses
parsed by ``httptools`` (llhttp, C), the request written with one
``transport.write``.

Chunk boundaries: for a chunked response the parser reports each chunk's end
(``on_chunk_complete``), and :meth:`UpstreamResponse.chunks` yields exactly
one item per upstream chunk, however TCP split or merged them, so SSE events
are forwarded as vLLM framed them.

Pooling: idle connections per (host, port), reused LIFO when idle for less
than ``IDLE_S`` (uvicorn, vLLM's server, closes idle keep-alive connections
after 5 s), discarded otherwise.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

import httptools

#: Reuse an idle connection only if it has been idle less than this (s).
IDLE_S = 4.0


class UpstreamError(Exception):
    """The replica could not be reached or dropped the connection."""


class ConnectError(UpstreamError):
    """Connecting failed, or the connection died before any response byte: safe to retry elsewhere."""


class _Conn(asyncio.Protocol):
    def __init__(self, pool: "UpstreamPool", key: tuple[str, int]):
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.resp: UpstreamResponse | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.closed = False
        self.idle_since = 0.0

    # -- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed response from upstream: {e}"))
            self.transport.abort()

    def connection_lost(self, exc) -> None:
        self.closed = True
        if self.resp is not None and not self.resp.complete:
            if self.resp.status is None:
                self._fail(ConnectError("connection closed before a response"))
            else:
                self._fail(UpstreamError("connection closed mid-response"))

    def _fail(self, err: Exception) -> None:
        r = self.resp
        if r is not None and not r.complete:
            r.error = err
            r._wake()

    # -- httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.resp
        r.status = self.parser.get_status_code()
        r.chunked = any(k.lower() == b"transfer-encoding" and b"chunked" in v.lower() for k, v in r.headers)
        r._wake()

    def on_body(self, body: bytes) -> None:
        r = self.resp
        if r.chunked:
            r._partial.append(body)
        else:
            r._chunks.append(body)
            r._wake()

    def on_chunk_complete(self) -> None:
        r = self.resp
        if r._partial:
            r._chunks.append(b"".join(r._partial) if len(r._partial) > 1 else r._partial[0])
            r._partial.clear()
            r._wake()

    def on_message_complete(self) -> None:
        r = self.resp
        r.complete = True
        r.keep_alive = self.parser.should_keep_alive()
        r._wake()


class UpstreamResponse:
    """Status, raw headers and body of one upstream response.

    ``headers``: list of (name, value) bytes as received. Iterate
    :meth:`chunks` (one item per upstream HTTP chunk) or call :meth:`read`;
    then :meth:`release` (returns the connection to the pool when the
    response is complete) or :meth:`close` (drops the connection).
    """

    def __init__(self, conn: _Conn, timeout: float):
        self._conn = conn
        self.timeout = timeout
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.complete = False
        self.keep_alive = False
        self.error: Exception | None = None
        self._chunks: deque[bytes] = deque()
        self._partial: list[bytes] = []
        self._waiter: asyncio.Future | None = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def _wait(self) -> None:
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(self._waiter, self.timeout)
        except asyncio.TimeoutError:
            raise asyncio.TimeoutError(f"upstream sent nothing for {self.timeout:.0f} s") from None
        finally:
            self._waiter = None

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    async def chunks(self):
        """Yield body pieces: one per upstream chunk (chunked) or as received (otherwise).

        Raises UpstreamError if the connection drops before the message ends.
        """
        while True:
            while self._chunks:
                yield self._chunks.popleft()
            if self.complete:
                return
            if self.error is not None:
                raise self.error
            await self._wait()

    async def read(self) -> bytes:
        """The whole body."""
        parts = [c async for c in self.chunks()]
        return b"".join(parts)

    def release(self) -> None:
        """Return the connection to the pool if reusable, else close it."""
        c = self._conn
        c.resp = None
        if self.complete and self.keep_alive and not c.closed:
            c.pool._put(c)
        else:
            self.close()

    def close(self) -> None:
        """Drop the connection (used when the client went away: vLLM then aborts the request)."""
        c = self._conn
        if not c.closed and c.transport is not None:
            c.closed = True
            c.transport.abort()
        if not self.complete and self.error is None:
            self.error = UpstreamError("closed by the gateway")
            self._wake()


class UpstreamPool:
    """Keep-alive connections to replicas. ``request`` sends one request and
    returns once the response headers have arrived.

    Args:
        connect_timeout: seconds to open a connection.
        timeout: seconds to wait for headers, and for each body piece.
    """

    def __init__(self, connect_timeout: float = 5.0, timeout: float = 600.0):
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self._idle: dict[tuple[str, int], list[_Conn]] = {}

    def _put(self, c: _Conn) -> None:
        c.idle_since = time.monotonic()
        self._idle.setdefault(c.key, []).append(c)

    async def _get(self, key: tuple[str, int]) -> tuple[_Conn, bool]:
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if not c.closed and now - c.idle_since < IDLE_S:
                return c, True
            if not c.closed:
                c.transport.close()
        loop = asyncio.get_running_loop()
        try:
            _, c = await asyncio.wait_for(loop.create_connection(lambda: _Conn(self, key), key[0], key[1]),
                                          self.connect_timeout)
        except (OSError, asyncio.TimeoutError) as e:
            raise ConnectError(f"cannot connect to {key[0]}:{key[1]}: {e}") from None
        return c, False

    async def request(self, host: str, port: int, method: str, target: str,
                      headers: list[tuple[bytes, bytes]], body: bytes) -> UpstreamResponse:
        """Send a request; raises ConnectError (retry elsewhere is safe) or UpstreamError."""
        key = (host, port)
        head = [f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\n".encode()]
        head += [k + b": " + v + b"\r\n" for k, v in headers]
        if body or method in ("POST", "PUT", "PATCH"):
            head.append(b"content-length: %d\r\n" % len(body))
        head.append(b"\r\n")
        payload = b"".join(head) + body
        for attempt in (0, 1):
            c, reused = await self._get(key)
            resp = UpstreamResponse(c, self.timeout)
            c.resp = resp
            c.parser = httptools.HttpResponseParser(c)
            c.transport.write(payload)
            try:
                while resp.status is None:
                    if resp.error is not None:
                        raise resp.error
                    await resp._wait()
            except ConnectError:
                c.resp = None
                if reused and attempt == 0:
                    continue  # a stale keep-alive connection: once more on a fresh one
                raise
            return resp
        raise ConnectError("unreachable")  # pragma: no cover

    def close(self) -> None:
        for conns in self._idle.values():
            for c in conns:
                if c.transport is not None:
                    c.transport.close()
        self._idle.clear()
