"""The gateway's HTTP client for its hop to the vLLM replicas: aiohttp, set up for a proxy.

Why aiohttp (issue 11): the earlier hand-written httptools client took vLLM's
interim ``100 Continue`` for the final response and put the connection back
in the pool with the real answer still in flight, so the next client on that
connection got someone else's completion. aiohttp's client skips 1xx interim
responses, reads Content-Length, chunked (trailers included) and
close-delimited bodies, and returns a connection to its pool only after the
whole response was read (an unread or failed one is closed). The gateway
strips ``Expect`` and every hop-by-hop header before forwarding
(:func:`forward_headers`), so the replica never sends ``100 Continue`` at all.
benchmarks/gateway_overhead.py measures the cost (README, Gateway section).

Chunk boundaries: :func:`http_chunks` yields one item per upstream HTTP chunk
(aiohttp's ``iter_chunks`` reports where each ends, however TCP split or
merged them), so SSE events are forwarded as vLLM framed them.

Flow control: aiohttp pauses reading a connection once ``READ_BUFSIZE`` x 2
bytes are buffered and unread; the proxy reads the next chunk only after the
client's socket accepted the previous one (uvicorn's ``send`` waits for the
transport to drain), so a slow client stalls the upstream read instead of
growing the gateway's memory, and TCP backpressure reaches vLLM.
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import aiohttp
from aiohttp.abc import AbstractStreamWriter
from aiohttp.payload import Payload

#: Per-connection read buffer (bytes); reading pauses at twice this.
READ_BUFSIZE = 64 * 1024
#: Idle keep-alive connections are dropped after this long (s). vLLM's uvicorn
#: closes idle keep-alive connections after 5 s; staying under it avoids
#: writing a request onto a connection the replica is closing.
KEEPALIVE_S = 4.0

#: Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself; never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"host", b"content-length",
    b"authorization", b"x-request-id",
})
#: Response headers not copied back to the client (uvicorn writes its own framing, date and server).
RESPONSE_SKIP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length", b"date",
    b"server", b"trailer", b"upgrade", b"x-request-id",
})


def _connection_listed(headers) -> set[bytes]:
    """Header names listed in ``Connection`` (also hop-by-hop by definition, RFC 9110 7.6.1)."""
    named: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            named.update(t.strip().lower() for t in v.split(b",") if t.strip())
    return named


def forward_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's request headers minus hop-by-hop ones, ``Expect``, auth and framing.

    Args:
        headers: ASGI ``scope["headers"]`` (lower-case names, bytes).
    """
    drop = HOP_BY_HOP | _connection_listed(headers)
    return [(k, v) for k, v in headers if k not in drop]


def response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """An upstream response's raw headers minus hop-by-hop and framing ones, names lower-cased."""
    drop = RESPONSE_SKIP | _connection_listed(raw)
    out = []
    for k, v in raw:
        k = k.lower()
        if k not in drop:
            out.append((k, v))
    return out


#: Request bodies above this size (bytes) are sent as :class:`BufferPayload` (slice by slice).
LARGE_BODY_BYTES = 1 << 20
#: Slice written per event-loop turn for a large body (bytes).
BODY_SLICE = 256 * 1024


class BufferPayload(Payload):
    """A request body already in memory, written to the upstream socket in :data:`BODY_SLICE` slices.

    aiohttp's own bytes payload hands the whole buffer to the transport at once, which then keeps
    what the socket did not take at once as a second copy (a 32 MiB upload costing ~64 MiB while it
    is sent). Here each slice waits for the transport to drain, so a body costs its own size plus one
    slice. The size is known, so the request carries ``Content-Length`` (never chunked).

    Args:
        value: the body (``bytes`` or ``bytearray``; not copied).
    """

    def __init__(self, value: bytes | bytearray, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("content_type", "application/octet-stream")
        super().__init__(value, *args, **kwargs)
        self._size = len(value)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return bytes(self._value).decode(encoding, errors)

    async def write(self, writer: AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: AbstractStreamWriter, content_length: int | None) -> None:
        view = memoryview(self._value)
        end = len(view) if content_length is None else min(content_length, len(view))
        for i in range(0, end, BODY_SLICE):
            await writer.write(view[i:min(i + BODY_SLICE, end)])
            await writer.drain()


def request_body(body: bytes | bytearray) -> bytes | BufferPayload:
    """What to pass as aiohttp's ``data``: the bytes themselves, or a :class:`BufferPayload` when large."""
    return BufferPayload(body) if len(body) > LARGE_BODY_BYTES else body


def make_session(connect_timeout_s: float, idle_timeout_s: float, uds: str | None = None) -> aiohttp.ClientSession:
    """A pooled session set up for proxying.

    Args:
        connect_timeout_s: to open a connection (s).
        idle_timeout_s: longest wait for the response head or for any body
            piece (s). The whole-request deadline is the proxy's.
        uds: connect to this Unix socket instead of TCP (every URL's host
            is then only the ``Host`` header).
    """
    if uds:
        connector: aiohttp.BaseConnector = aiohttp.UnixConnector(path=uds, limit=0, keepalive_timeout=KEEPALIVE_S)
    else:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=KEEPALIVE_S, use_dns_cache=False)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, read_bufsize=READ_BUFSIZE,
        timeout=aiohttp.ClientTimeout(total=None, connect=connect_timeout_s, sock_read=idle_timeout_s),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        cookie_jar=aiohttp.DummyCookieJar(),
    )


class SessionPool:
    """The gateway's upstream sessions: one shared for TCP replicas, one per Unix-socket replica.

    aiohttp binds a Unix connector to one socket path, so each replica that
    listens on a socket gets its own session (and connection pool); TCP
    replicas share one. Proxied requests, health checks and metric scrapes
    all use these (scrapes and checks pass a per-request total timeout).

    Args:
        connect_timeout_s, idle_timeout_s: as for :func:`make_session` (s).
    """

    def __init__(self, connect_timeout_s: float, idle_timeout_s: float) -> None:
        self._args = (connect_timeout_s, idle_timeout_s)
        self._sessions: dict[str | None, aiohttp.ClientSession] = {}

    def get(self, uds: str | None = None) -> aiohttp.ClientSession:
        """The session for a replica listening on ``uds`` (None: TCP); made on first use, in the event loop."""
        s = self._sessions.get(uds)
        if s is None or s.closed:
            s = self._sessions[uds] = make_session(*self._args, uds=uds)
        return s

    async def close(self) -> None:
        """Close every session (and its pooled connections)."""
        sessions, self._sessions = list(self._sessions.values()), {}
        for s in sessions:
            await s.close()


async def http_chunks(resp: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The body of ``resp``: one item per upstream HTTP chunk when chunked, else pieces as they arrive.

    Raises whatever aiohttp raises when the connection drops mid-body
    (``aiohttp.ClientPayloadError``, ``aiohttp.ClientConnectionError``) or
    stays silent past the idle timeout (``asyncio.TimeoutError``).
    """
    chunked = resp.headers.get("Transfer-Encoding", "").lower().endswith("chunked")
    if not chunked:
        async for data in resp.content.iter_any():
            yield data
        return
    partial: list[bytes] = []
    async for data, end_of_chunk in resp.content.iter_chunks():
        if not end_of_chunk:
            if data:
                partial.append(data)
            continue
        if partial:
            partial.append(data)
            data = b"".join(partial)
            partial.clear()
        if data:
            yield data
    if partial:
        yield b"".join(partial)
