"""The gateway's hop to its replicas: which headers cross it, and the control plane's HTTP client.

:func:`forward_headers` and :func:`response_headers` decide what crosses the hop in each
direction: never hop-by-hop headers (RFC 9110 7.6.1, those named in ``Connection`` included),
``Expect`` (so a replica never sends ``100 Continue``), framing, ``Host``, the client's
``Authorization`` (each replica has its own key) or ``X-Request-Id``.

:class:`SessionPool` holds aiohttp sessions for the gateway's own GETs to its replicas (health
checks, ``/metrics`` scrapes, ``/v1/models``): not on any request's path, so a well-kept library
serves them. Proxied requests go through :mod:`gateway.h1`.
"""
from __future__ import annotations

import aiohttp

#: Idle keep-alive connections are dropped after this long (s). vLLM's uvicorn
#: closes idle keep-alive connections after 5 s; staying under it avoids
#: writing a request onto a connection the replica is closing.
KEEPALIVE_S = 4.0

#: Hop-by-hop headers (RFC 9110 7.6.1) and those the gateway sets itself; never forwarded.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"trailers", b"transfer-encoding", b"upgrade", b"expect", b"host", b"content-length",
    b"authorization", b"x-request-id", b"x-emugate-fault",
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


def make_session(connect_timeout_s: float, idle_timeout_s: float, uds: str | None = None) -> aiohttp.ClientSession:
    """A pooled session for the control plane's requests to replicas.

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
        connector=connector, auto_decompress=False,
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
