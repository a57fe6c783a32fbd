"""A streaming OpenAI client that timestamps SSE messages as their bytes arrive.

Locust's FastHttpUser ``iter_content(1024)``/``iter_lines()`` wait for 1 KiB
before yielding, which delays TTFT and merges ITL gaps. Here each
``HTTPResponse.read1()`` returns whatever one socket read delivered (for a
chunked response: at most the rest of one HTTP chunk), the bytes go through
vLLM's own SSE splitting rules (:class:`SSEParser`, after
``vllm.benchmarks.lib.endpoint_request_func.StreamedResponseHandler``), and
every complete message is timestamped with ``time.perf_counter()`` when it
is parsed, exactly as vLLM's request functions do.

Blocking code on purpose: under Locust it runs on gevent (sockets are
monkey-patched, so each request is a cheap greenlet); elsewhere on threads.
"""
from __future__ import annotations

import codecs
import http.client
import json
import time
from collections import deque
from urllib.parse import urlsplit

from loadtests.metrics import RequestResult


class SSEParser:
    """Accumulates bytes and returns complete SSE messages (vLLM's rules)."""

    def __init__(self) -> None:
        self.buffer = ""
        self._decoder = codecs.getincrementaldecoder("utf-8")()

    def add(self, data: bytes) -> list[str]:
        self.buffer += self._decoder.decode(data)
        messages = []
        while "\n\n" in self.buffer:
            message, self.buffer = self.buffer.split("\n\n", 1)
            message = message.strip()
            if message:
                messages.append(message)
        if self.buffer.startswith("data: "):
            content = self.buffer.removeprefix("data: ").strip()
            if content == "[DONE]":
                messages.append(self.buffer.strip())
                self.buffer = ""
            elif content:
                try:
                    json.loads(content)
                    messages.append(self.buffer.strip())
                    self.buffer = ""
                except json.JSONDecodeError:
                    pass
        return messages


#: Reuse an idle connection only if idle less than this (s): uvicorn (vLLM's and
#: the gateway's server) closes idle keep-alive connections after 5 s.
IDLE_S = 4.0


class ConnectionPool:
    """Keep-alive HTTP/1.1 connections to one host (as aiohttp's session pools them).

    ``get`` returns (connection, reused); a reused connection that fails before
    any response byte is retried once on a fresh one by :func:`stream_request`.
    """

    def __init__(self, base_url: str, timeout: float = 600.0):
        u = urlsplit(base_url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or (443 if u.scheme == "https" else 80)
        self.https = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.timeout = timeout
        self._idle: deque[tuple[http.client.HTTPConnection, float]] = deque()

    def get(self) -> tuple[http.client.HTTPConnection, bool]:
        now = time.monotonic()
        while self._idle:
            conn, since = self._idle.pop()
            if now - since < IDLE_S:
                return conn, True
            conn.close()
        return self.fresh(), False

    def fresh(self) -> http.client.HTTPConnection:
        """A new (not yet connected) connection."""
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=self.timeout)

    def put(self, conn: http.client.HTTPConnection) -> None:
        self._idle.append((conn, time.monotonic()))


def build_payload(endpoint: str, model: str, prompt: str, max_tokens: int, ignore_eos: bool,
                  extra: dict | None = None) -> dict:
    """vLLM benchmark payloads: completions use ``prompt``/``max_tokens``; chat uses a
    single user message and ``max_completion_tokens``; both stream with usage."""
    if endpoint == "chat":
        p = {"model": model, "messages": [{"role": "user", "content": prompt}],
             "max_completion_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}}
    else:
        p = {"model": model, "prompt": prompt, "repetition_penalty": 1.0, "max_tokens": max_tokens,
             "logprobs": None, "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        p["ignore_eos"] = True
    if extra:
        p.update(extra)
    return p


def stream_request(pool: ConnectionPool, path: str, payload: dict, prompt_len: int, chat: bool,
                   headers: dict | None = None, result: RequestResult | None = None) -> RequestResult:
    """POST ``payload`` and measure it as vLLM's request functions do; never raises."""
    out = result or RequestResult()
    out.prompt_len = prompt_len
    body = json.dumps(payload).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    conn, reused = pool.get()
    st = time.perf_counter()
    out.start_time = st
    recent = st
    first = False
    text_parts: list[str] = []
    reusable = False
    try:
        try:
            conn.request("POST", pool.prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
        except (ConnectionError, http.client.RemoteDisconnected, http.client.BadStatusLine):
            if not reused:
                raise
            conn.close()  # the server closed this idle connection: once more on a fresh one
            conn = pool.fresh()
            conn.request("POST", pool.prefix + path, body=body, headers=hdrs)
            resp = conn.getresponse()
        if resp.status != 200:
            out.error = f"HTTP {resp.status}: {resp.read()[:500].decode(errors='replace')}"
            reusable = True
            return out
        parser = SSEParser()
        while True:
            data = resp.read1(65536)
            if not data:
                break
            data = data.strip()
            if not data:
                continue
            for message in parser.add(data):
                if message.startswith(":"):
                    continue
                chunk = message.removeprefix("data: ")
                if chunk == "[DONE]":
                    continue
                ts = time.perf_counter()
                doc = json.loads(chunk)
                if "error" in doc and not doc.get("choices"):
                    raise RuntimeError(f"error event in stream: {doc['error']}")
                choices = doc.get("choices")
                if choices:
                    if not first:
                        first = True
                        out.ttft = ts - st
                    else:
                        out.itl.append(ts - recent)
                    recent = ts
                    c0 = choices[0]
                    piece = (c0.get("delta") or {}).get("content") if chat else c0.get("text")
                    if piece:
                        text_parts.append(piece)
                elif usage := doc.get("usage"):
                    out.output_tokens = usage.get("completion_tokens") or 0
                    if usage.get("prompt_tokens") is not None:
                        out.prompt_len = usage["prompt_tokens"]
        reusable = not resp.will_close
        if first:
            out.success = True
        else:
            out.error = "Never received a valid chunk to calculate TTFT."
        out.generated_text = "".join(text_parts)
        out.latency = recent - st
    except Exception as e:  # noqa: BLE001 - a failed request is a measurement, not a crash
        out.success = False
        out.error = f"{e.__class__.__name__}: {e}"
    finally:
        if reusable:
            pool.put(conn)
        else:
            conn.close()
    return out
