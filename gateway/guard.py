"""The gateway's front door: one path rule and one key check that every request passes.

:class:`Guard` is the outermost ASGI middleware of the gateway app; nothing
reaches a route, the gateway's own or a forwarded one, without going through it:

1. **Path rule** (:func:`normalize_path`). The request target's path, exactly
   as the client sent it (``raw_path``), must be an absolute path made of
   non-empty segments of RFC 3986 path characters: no ``.``/``..`` segments,
   no empty segments (``//``, a trailing ``/``), no percent-encoding at all
   (so ``%2e``, ``%2f``, ``%5c`` and double encodings are never decoded into
   something else downstream), no ``;`` parameters, backslashes, control or
   non-ASCII bytes, at most :data:`MAX_PATH_BYTES` bytes. Anything else is a
   400 (414 when too long) before routing. A path that passes is its own
   decoded, normalized form: the gateway routes on it and forwards exactly it,
   and the upstream URL is built from it without re-normalization
   (:mod:`gateway.proxy`). The query string may hold only RFC 3986 query
   characters (400 otherwise).
2. **Keys** (:class:`ApiKeys`). With client keys configured, every request
   needs ``Authorization: Bearer <key>``, unknown paths included (401 before
   404, so routes cannot be probed without a key), except the routes listed
   as public (``GET /health``, ``GET /ready``, and ``GET /metrics`` when
   ``metrics_require_key = false``). The matched key's index goes into the
   scope (``scope["emugate.key"]``) for per-key limits.
3. **Route allowlist.** Only :data:`FORWARDED_ROUTES` reach a replica (POST,
   dispatched straight to the forwarder without a route table walk); every
   other path goes to the gateway's own routes, which answer 404/405 for what
   they do not know. vLLM's other routes (``/sleep``, ``/wake_up``,
   ``/reset_prefix_cache``, ``/collective_rpc``, ``/pause``, profiler and
   LoRA-loading routes...) are never forwarded.
4. **Admin API** (``/admin/...``, :mod:`gateway.admin`): exists only when
   ``[gateway] admin_keys`` are configured (otherwise the path is an unknown
   route like any other), and opens only with an admin key: a client key gets
   401 there, as no key does.

Every refusal is OpenAI's error JSON with the request id
(:func:`gateway.errors.send_error`) and is counted by the ``on_reject``
callback (``emugate_errors_total{kind="bad_path"|"auth"}``).
"""
from __future__ import annotations

import hashlib
import hmac
import re
from typing import Any, Awaitable, Callable, Iterable

from gateway.errors import request_id, send_error

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

#: POST routes forwarded to a replica: vLLM 0.32's inference and tokenizer routes
#: (vllm/entrypoints/openai/*/api_router.py, vllm/entrypoints/serve/*). Everything else stays at the gateway.
FORWARDED_ROUTES = frozenset({
    "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
    "/v1/messages/count_tokens", "/v1/score", "/v1/rerank",
    "/tokenize", "/detokenize", "/pooling", "/score", "/rerank", "/classify", "/invocations",
})
#: Longest accepted request path (bytes); longer ones get 414.
MAX_PATH_BYTES = 2048
# RFC 3986 pchar without ';' (path parameters) and '%' (percent-encoding): unreserved / sub-delims / ':' / '@'
_SEGMENT = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,=:@]+")
# RFC 3986 query: pchar / '/' / '?', with percent-encoding
_QUERY = re.compile(rb"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]*")


class PathRefused(ValueError):
    """A request target the path rule refuses: ``status`` (400 or 414) and why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def normalize_path(raw: bytes) -> str:
    """The request path as the gateway routes and forwards it.

    Args:
        raw: the path as sent (ASGI ``raw_path``; the query string excluded).

    Returns:
        The same path as ``str``: a path that passes the rule is already
        decoded and normalized (it holds no percent-encoding and no dot or
        empty segments).

    Raises:
        PathRefused: 414 over :data:`MAX_PATH_BYTES`; 400 for a path that is
            not absolute, has a ``.``/``..`` or empty segment, holds ``%``,
            ``;``, a backslash, a control or non-ASCII byte.
    """
    if len(raw) > MAX_PATH_BYTES:
        raise PathRefused(414, f"The request path is {len(raw)} bytes; this gateway accepts at most "
                               f"{MAX_PATH_BYTES}")
    if not raw.startswith(b"/"):
        raise PathRefused(400, "The request target must be an absolute path starting with '/'")
    if raw == b"/":
        return "/"
    for seg in raw[1:].split(b"/"):
        if not seg:
            raise PathRefused(400, "The request path has an empty segment ('//' or a trailing '/')")
        if seg in (b".", b".."):
            raise PathRefused(400, "The request path has a '.' or '..' segment")
        if not _SEGMENT.fullmatch(seg):
            raise PathRefused(400, "The request path holds a character this gateway refuses: percent-encoding "
                                   "(e.g. %2e, %2f), ';' parameters, '\\', or a control or non-ASCII byte")
    return raw.decode("ascii")


def check_query(qs: bytes) -> None:
    """Raises :class:`PathRefused` (400) unless ``qs`` holds only RFC 3986 query characters."""
    if qs and not _QUERY.fullmatch(qs):
        raise PathRefused(400, "The query string holds characters outside RFC 3986 (encode them as %XX)")


class ApiKeys:
    """The accepted client keys, checked in constant time; the keys themselves are not kept.

    Each key is kept only as its SHA-256 digest; a presented token is hashed
    and compared with :func:`hmac.compare_digest` against every digest with
    no early exit, so timing reveals neither which key nor which byte differs
    (the scheme of vLLM's own middleware, vllm/entrypoints/serve/middleware/
    authenticate.py). ``repr`` shows only the count.

    Args:
        keys: plain strings or pydantic ``SecretStr`` values.
    """

    def __init__(self, keys: Iterable[Any]) -> None:
        self._digests = [hashlib.sha256(_reveal(k).encode()).digest() for k in keys]

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        return f"ApiKeys({len(self._digests)} keys)"

    def match(self, headers: list[tuple[bytes, bytes]]) -> int | None:
        """Index of the key ``Authorization: Bearer <key>`` names (scheme case-insensitive), else None."""
        value = next((v for k, v in headers if k == b"authorization"), b"")
        scheme, _, token = value.strip().partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        digest = hashlib.sha256(token.strip()).digest()
        found = None
        for i, d in enumerate(self._digests):
            if hmac.compare_digest(digest, d) and found is None:
                found = i
        return found

    def check(self, headers: list[tuple[bytes, bytes]]) -> bool:
        """True when the request names an accepted key."""
        return self.match(headers) is not None

    def index_of(self, key: Any) -> int | None:
        """Index of ``key`` (a string or ``SecretStr``) among the accepted keys, else None."""
        digest = hashlib.sha256(_reveal(key).encode()).digest()
        found = None
        for i, d in enumerate(self._digests):
            if hmac.compare_digest(digest, d) and found is None:
                found = i
        return found


def _reveal(k: Any) -> str:
    return k.get_secret_value() if hasattr(k, "get_secret_value") else str(k)


#: The 401 text.
AUTH_MESSAGE = ("Invalid or missing API key: send `Authorization: Bearer <key>` with a key from the gateway "
                "config's [gateway] api_keys")


#: The 401 text of the admin API.
ADMIN_AUTH_MESSAGE = ("The admin API needs `Authorization: Bearer <admin key>` with a key from [gateway] admin_keys "
                      "(client keys do not open it)")


class Guard:
    """ASGI middleware: the path rule, then the key check, then dispatch (module docstring).

    Args:
        app: the gateway's own routes (Starlette), reached by everything not forwarded.
        keys: the client keys (empty: no key needed).
        public: ``(method, path)`` pairs open without a key.
        forward: the ASGI app that forwards to replicas, for POSTs to :data:`FORWARDED_ROUTES`.
        on_reject: called with ``"bad_path"`` or ``"auth"`` for each refusal.
    """

    def __init__(self, app: ASGIApp, keys: ApiKeys, public: set[tuple[str, str]], forward: ASGIApp,
                 on_reject: Callable[[str], None] = lambda kind: None, admin: ASGIApp | None = None,
                 admin_keys: ApiKeys | None = None) -> None:
        self.app, self.keys, self.public, self.forward, self.on_reject = app, keys, public, forward, on_reject
        self.admin, self.admin_keys = admin, admin_keys

    async def __call__(self, scope: dict, receive, send) -> None:
        kind = scope["type"]
        if kind == "websocket":  # nothing is served over WebSocket: refuse before any route sees it
            await send({"type": "websocket.close", "code": 1008})
            return
        if kind != "http":
            return await self.app(scope, receive, send)
        try:
            path = normalize_path(scope.get("raw_path") or scope["path"].encode("utf-8", "surrogateescape"))
            check_query(scope.get("query_string", b""))
        except PathRefused as e:
            self.on_reject("bad_path")
            return await send_error(send, e.status, str(e), "invalid_request_error", request_id(scope["headers"]))
        scope["path"] = path
        scope["raw_path"] = path.encode()
        method = scope["method"]
        if self.admin is not None and (path == "/admin" or path.startswith("/admin/")):
            # the admin API: its own keys only (a client key never opens it)
            if self.admin_keys is None or self.admin_keys.match(scope["headers"]) is None:
                self.on_reject("auth")
                return await send_error(send, 401, ADMIN_AUTH_MESSAGE, "authentication_error",
                                        request_id(scope["headers"]), code="invalid_api_key")
            return await self.admin(scope, receive, send)
        if self.keys and (method, path) not in self.public:
            k = self.keys.match(scope["headers"])
            if k is None:
                self.on_reject("auth")
                return await send_error(send, 401, AUTH_MESSAGE, "authentication_error",
                                        request_id(scope["headers"]), code="invalid_api_key")
            scope["emugate.key"] = k
        if method == "POST" and path in FORWARDED_ROUTES:
            return await self.forward(scope, receive, send)
        return await self.app(scope, receive, send)
