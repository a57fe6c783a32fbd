"""The gateway's HTTP/1.1 client for the data path to its replicas: lean, on llhttp.

Why not aiohttp here: measured on this 2-core host (``python benchmarks/gateway_overhead.py``
and ``benchmarks/gateway_profile.py``), aiohttp's client was ~0.38 of the gateway's 0.55 ms of
CPU per proxied request (a bare uvicorn app costs 0.17 ms, a byte splicer 0.09 ms), and every
millisecond of gateway CPU here is taken from vLLM's API server on the same cores. The hop is
plain HTTP/1.1 to vLLM servers the gateway knows (loopback TCP or a Unix socket), so the client
needs only what this module does; aiohttp stays for the control plane (health checks, metric
scrapes, model lists: :mod:`gateway.upstream`).

What it does, and what ``tests/test_gateway_http.py`` (a scripted raw-socket upstream) holds it to:

* Parsing is llhttp's (``httptools.HttpResponseParser``, the parser of Node.js): status line,
  headers, Content-Length, chunked bodies with extensions and trailers.
* Interim responses (1xx other than 101) are skipped: their messages are parsed and dropped and
  the final response that follows on the same connection is the answer (a response mix-up once seen here:
  an earlier client took a replica's ``100 Continue`` for the answer and pooled the connection
  with the real response still in flight).
* Framing: Content-Length, chunked, or close-delimited (no length, not chunked: the body ends
  when the replica closes). A body cut short raises :class:`UpstreamError`.
* Chunk boundaries: for a chunked response each upstream chunk is delivered as one piece
  (``on_chunk_complete``), however TCP split or merged it, so SSE events are forwarded as vLLM
  framed them.
* Pooling: a connection goes back to its pool only after its whole response was read and both
  sides keep it alive; idle connections older than :data:`KEEPALIVE_S` are dropped (vLLM's
  uvicorn closes idle ones after 5 s). Bytes arriving on an idle connection close it.
* Flow control: reading pauses when more than :data:`HIGH_WATER` bytes are buffered unread and
  resumes below :data:`LOW_WATER`, so a slow client stalls the replica (TCP backpressure)
  instead of growing the gateway's memory. Large request bodies are written in
  :data:`BODY_SLICE` slices, each after the transport drained.
* Errors are typed so the proxy can tell what is safe to retry: :class:`UpstreamConnectError`
  (nothing was sent), :class:`UpstreamDisconnected` (closed or reset before any response byte),
  :class:`UpstreamError` (a malformed or cut response), ``TimeoutError`` (silent for
  ``idle_timeout_s``).
* Cancellation (the client left, or the gateway's deadline passed) aborts the connection, so vLLM
  sees it close and aborts the request.
"""
from __future__ import annotations

import asyncio
import time
from collections import deque

import httptools

from gateway.upstream import KEEPALIVE_S  # idle keep-alive bound (s), shared with the control plane's client

#: Unread response bytes (per connection) above which reading pauses; it resumes below LOW_WATER.
HIGH_WATER = 128 * 1024
LOW_WATER = 32 * 1024
#: Request bodies above this many bytes are written in BODY_SLICE slices, waiting for the transport to drain.
LARGE_BODY = 1 << 20
BODY_SLICE = 256 * 1024
_NO_BODY_STATUS = (204, 304)


class UpstreamError(Exception):
    """The replica's response was malformed or cut short."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed or reset before any response byte (a stale keep-alive connection, or a replica
    that died); nothing reached the client, so another attempt is safe."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened (refused, unreachable, or not within the connect timeout)."""


class H1Response:
    """One response: ``status``, ``headers`` (raw ``(name, value)`` bytes, as received), and the body.

    Read the body with :meth:`next_chunk` (one piece per upstream chunk, ``None`` at the end) or
    :meth:`read`; then call :meth:`release` exactly once (the connection goes back to the pool only
    when the response was read whole; otherwise it is closed, which aborts the request in vLLM).
    """

    __slots__ = ("status", "headers", "chunked", "close_delimited", "content_length", "complete", "error",
                 "_conn", "_pieces", "_buffered", "_waiter", "_timer")

    def __init__(self, conn: "_Conn") -> None:
        self._conn = conn
        self.status: int | None = None
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.close_delimited = False
        self.content_length: int | None = None
        self.complete = False
        self.error: BaseException | None = None
        self._pieces: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (case-insensitive), or None."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return None

    # ---------------------------------------------------------------- consumer side
    async def next_chunk(self) -> bytes | None:
        """The next body piece, or None once the body is complete.

        Raises:
            UpstreamError: the body was cut short or malformed.
            TimeoutError: the replica sent nothing for ``idle_timeout_s``.
        """
        while True:
            if self._pieces:
                data = self._pieces.popleft()
                self._buffered -= len(data)
                if self._buffered < LOW_WATER:
                    self._conn.resume()
                return data
            if self.complete:
                return None
            if self.error is not None:
                raise self.error
            await self._conn.wait(self)

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while (c := await self.next_chunk()) is not None:
            parts.append(c)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def release(self) -> None:
        """Return the connection to its pool if the response was read whole and is reusable, else close it."""
        self._conn.finish(self)

    # ---------------------------------------------------------------- producer side (the connection)
    def _push(self, data: bytes) -> None:
        self._pieces.append(data)
        self._buffered += len(data)
        if self._buffered > HIGH_WATER:
            self._conn.pause()
        self._conn.wake()


class _Conn(asyncio.Protocol):
    """One keep-alive connection: its transport, its llhttp parser and the response in flight."""

    def __init__(self, pool: "H1Pool", key: str) -> None:
        self.pool, self.key = pool, key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: H1Response | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reusable = False
        self._interim = False
        self._partial: list[bytes] = []
        self._paused = False
        self._write_paused = False
        self._drain: asyncio.Future | None = None
        self._waiter: asyncio.Future | None = None

    # ---------------------------------------------------------------- asyncio.Protocol
    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.resp is None:  # bytes on an idle connection: nothing may arrive there; drop it
            self.abort()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            self._fail(UpstreamError(f"malformed response from the replica ({e.__class__.__name__}: {e})"))
            self.abort()

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost decides what the EOF meant

    def connection_lost(self, exc) -> None:
        self.closed = True
        r = self.resp
        if r is not None and not r.complete:
            if r.status is None:
                self._fail(UpstreamDisconnected(f"the replica closed the connection before answering"
                                                f"{f' ({exc})' if exc else ''}"))
            elif r.close_delimited and exc is None:
                self._flush_partial()
                r.complete = True  # a close-delimited body ends when the replica closes
                self.wake()
            else:
                self._fail(UpstreamError(f"the replica closed the connection mid-response"
                                         f"{f' ({exc})' if exc else ''}"))
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamDisconnected("the replica closed the connection"))

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    # ---------------------------------------------------------------- llhttp callbacks
    def on_message_begin(self) -> None:
        if self.resp is None or self.resp.complete:  # a second response to one request: the connection is unusable
            raise UpstreamError("the replica sent bytes after its response")
        self._interim = False
        self.resp.headers = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        r = self.resp
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            self._interim = True  # an interim response: parsed and dropped; the final one follows
            return
        r.status = status
        te = r.header(b"transfer-encoding")
        cl = r.header(b"content-length")
        r.chunked = te is not None and b"chunked" in te.lower()
        if cl is not None and not r.chunked:
            r.content_length = int(cl)
        r.close_delimited = not r.chunked and cl is None and status not in _NO_BODY_STATUS
        self.wake()

    def on_body(self, body: bytes) -> None:
        if self._interim:
            return
        if self.resp.chunked:
            self._partial.append(body)
        else:
            self.resp._push(body)

    def on_chunk_complete(self) -> None:
        self._flush_partial()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        r = self.resp
        self._flush_partial()
        r.complete = True
        self.reusable = self.parser.should_keep_alive()
        self.wake()

    # ---------------------------------------------------------------- helpers
    def _flush_partial(self) -> None:
        if self._partial:
            p = self._partial
            self.resp._push(p[0] if len(p) == 1 else b"".join(p))
            p.clear()

    def _fail(self, err: BaseException) -> None:
        r = self.resp
        if r is not None and not r.complete and r.error is None:
            r.error = err
            self.wake()

    def wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    async def wait(self, r: H1Response) -> None:
        """Until the parser has news for ``r``, at most ``idle_timeout_s``.

        Raises:
            TimeoutError: nothing arrived within ``idle_timeout_s``.
        """
        loop = asyncio.get_running_loop()
        fut = self._waiter = loop.create_future()
        timer = loop.call_later(self.pool.idle_timeout_s, _expire, fut)
        try:
            await fut
        finally:
            timer.cancel()
            self._waiter = None

    def pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            if self.transport is not None:
                self.transport.abort()

    async def write_body(self, body: bytes | bytearray) -> None:
        view = memoryview(body)
        for i in range(0, len(view), BODY_SLICE):
            if self.closed:
                raise UpstreamDisconnected("the replica closed the connection while the request was sent")
            self.transport.write(view[i:i + BODY_SLICE])
            if self._write_paused:
                self._drain = asyncio.get_running_loop().create_future()
                try:
                    await self._drain
                finally:
                    self._drain = None

    def finish(self, r: H1Response) -> None:
        if self.resp is not r:
            return
        self.resp = None
        if r.complete and self.reusable and not self.closed and not self._partial:
            self.resume()
            self.pool.put(self)
        else:
            self.abort()


def _insecure_context():
    """TLS without certificate verification (a backend's ``tls_verify = false``)."""
    import ssl as _ssl
    ctx = _ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = _ssl.CERT_NONE
    return ctx


def _expire(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("the replica sent nothing for idle_timeout_s"))


class H1Pool:
    """Keep-alive connections to the replicas, by address; :meth:`request` sends one request.

    Args:
        connect_timeout_s: to open a connection (s).
        idle_timeout_s: longest silence while waiting for the response head or any body piece (s).
    """

    def __init__(self, connect_timeout_s: float = 5.0, idle_timeout_s: float = 300.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self._idle: dict[str, list[_Conn]] = {}

    def put(self, c: _Conn) -> None:
        c.idle_since = time.monotonic()
        self._idle.setdefault(c.key, []).append(c)

    async def _connect(self, host: str, port: int | None, uds: str | None, ssl=None,
                       connect_timeout_s: float | None = None) -> tuple[_Conn, bool]:
        key = uds or f"{'https' if ssl is not None else 'http'}://{host}:{port}"
        idle = self._idle.get(key)
        now = time.monotonic()
        while idle:
            c = idle.pop()
            if not c.closed and now - c.idle_since < KEEPALIVE_S:
                return c, True
            c.abort()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(connect_timeout_s or self.connect_timeout_s):
                if uds:
                    _, c = await loop.create_unix_connection(lambda: _Conn(self, key), uds)
                elif ssl is not None:  # https (False: without certificate verification)
                    ctx = ssl if ssl is not False else _insecure_context()
                    _, c = await loop.create_connection(lambda: _Conn(self, key), host, port, ssl=ctx,
                                                        server_hostname=host)
                else:
                    _, c = await loop.create_connection(lambda: _Conn(self, key), host, port)
        except (OSError, TimeoutError) as e:
            raise UpstreamConnectError(f"cannot connect to {key}: {e.__class__.__name__}: {e}") from None
        return c, False

    async def request(self, method: str, target: str, headers: list[tuple[bytes, bytes]], body: bytes | bytearray,
                      host: str = "127.0.0.1", port: int | None = None, uds: str | None = None, ssl=None,
                      connect_timeout_s: float | None = None) -> H1Response:
        """Send one request; returns once the final response's head has arrived.

        Args:
            method, target: the request line's method and target (path and query, already checked).
            headers: end-to-end headers to send (no ``Host``, ``Content-Length`` or hop-by-hop ones).
            body: the request body (``Content-Length`` is set from it).
            host, port: a TCP replica; ``uds``: a replica on a Unix socket (then ``Host: localhost``).
            ssl: for an https replica, an ``ssl.SSLContext`` (or False: TLS without certificate checks).
            connect_timeout_s: this request's connect timeout (default: the pool's).

        Raises:
            UpstreamConnectError, UpstreamDisconnected, UpstreamError, TimeoutError: see the module docstring.
        """
        c, _ = await self._connect(host, port, uds, ssl, connect_timeout_s)
        r = H1Response(c)
        c.resp = r
        c.reusable = False
        hostname = b"localhost" if uds else f"{host}:{port}".encode()
        head = [method.encode(), b" ", target.encode(), b" HTTP/1.1\r\nhost: ", hostname,
                b"\r\ncontent-length: %d\r\n" % len(body)]
        for k, v in headers:
            head += (k, b": ", v, b"\r\n")
        head.append(b"\r\n")
        try:
            if len(body) > LARGE_BODY:
                c.transport.write(b"".join(head))
                await c.write_body(body)
            else:
                head.append(body)
                c.transport.write(b"".join(head))
            while r.status is None:
                if r.error is not None:
                    raise r.error
                await c.wait(r)
        except BaseException:
            c.resp = None
            c.abort()
            raise
        return r

    def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for c in conns:
                c.abort()
        self._idle.clear()
