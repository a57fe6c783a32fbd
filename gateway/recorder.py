"""The gateway's own traffic as a replayable trace (``[gateway] record_trace = "FILE"``, opt-in).

Per request, once its response has been sent (never on the request's path): the arrival time, model,
endpoint, streamed or not, prompt and completion token counts (from the response's ``usage``),
``max_tokens``, the status, and the prompt's prefix-block hash ids, in the JSONL format
:func:`loadtests.trace.read_trace` loads (``{"format": "emugate-trace", ...}`` header, then Mooncake's
keys plus the above), which converts to Mooncake JSONL.

Hash ids: the prompt's tokens come from the replica's own ``/tokenize`` (chat requests with their
``messages``, so the chat template is applied as vLLM applies it). They are cut into blocks of
``record_trace_block_size`` tokens; each block's id is a chain hash (HMAC-SHA256 of the previous
block's digest and this block's tokens) under a key made at start and never written, mapped to small
integers in first-seen order (Mooncake's remapping). Equal ids mean an equal prefix up to and
including that block, as in Mooncake's traces. No prompt text and no token id is ever written.

Rotation: when the file passes ``record_trace_max_bytes`` it is renamed ``FILE.1`` (older ones shift
to ``.2``... up to ``record_trace_keep``) and a new file with a new header starts.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("emugate.recorder")


class TraceRecorder:
    """Writes one line per completed request (module docstring).

    Args:
        path: the trace file (appended; a header line starts each file).
        block_size: prefix-block size for hash ids (tokens).
        max_bytes: rotate past this size (bytes).
        keep: rotated files kept.
    """

    def __init__(self, path: str | Path, block_size: int = 64, max_bytes: int = 64 << 20, keep: int = 3) -> None:
        self.path, self.block_size, self.max_bytes, self.keep = Path(path), block_size, max_bytes, keep
        self._key = os.urandom(32)  # never written: hash ids cannot be matched to any text or token
        self._ids: dict[bytes, int] = {}
        self._t0 = time.time()
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size == 0:
            self._write_header()

    def _write_header(self) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"format": "emugate-trace", "version": 1, "block_size": self.block_size,
                                "started_unix_s": round(self._t0, 3)}) + "\n")

    def hash_ids(self, tokens: list[int]) -> list[int]:
        """The prefix-block ids of a token sequence (the last, partial block included)."""
        out, digest = [], b""
        for i in range(0, len(tokens), self.block_size):
            block = tokens[i:i + self.block_size]
            digest = hmac.new(self._key, digest + b"|" + ",".join(map(str, block)).encode(), hashlib.sha256).digest()
            out.append(self._ids.setdefault(digest, len(self._ids)))
        return out

    def submit(self, coro) -> None:
        """Run a recording off the request's path (the task is kept until it ends)."""
        t = asyncio.ensure_future(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    async def record(self, *, arrival_unix_s: float, model: str, endpoint: str, body: dict, status: int,
                     usage: dict | None, tokens: list[int] | None) -> None:
        """Append one request. ``tokens``: the prompt's token ids (None when ``/tokenize`` failed: no hash ids)."""
        prompt_tokens = (usage or {}).get("prompt_tokens")
        if prompt_tokens is None and tokens is not None:
            prompt_tokens = len(tokens)
        row: dict[str, Any] = {
            "timestamp": int(round((arrival_unix_s - self._t0) * 1000)),
            "input_length": int(prompt_tokens or 0), "output_length": int((usage or {}).get("completion_tokens") or 0),
            "hash_ids": self.hash_ids(tokens) if tokens else [], "model": model, "endpoint": endpoint,
            "stream": bool(body.get("stream")),
            "max_tokens": body.get("max_completion_tokens", body.get("max_tokens")), "status": status}
        line = json.dumps(row) + "\n"
        async with self._lock:
            if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                self._rotate()
            with open(self.path, "a") as f:
                f.write(line)

    def _rotate(self) -> None:
        for i in range(self.keep - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{i + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))
        self._write_header()

    async def close(self) -> None:
        """Wait for recordings still running (at shutdown)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def usage_from_response(body: bytes | None, sse_tail: list[bytes] | None) -> dict | None:
    """The ``usage`` object of a response: a JSON body's, or the last SSE event that carries one."""
    try:
        if sse_tail:
            for chunk in reversed(sse_tail):
                for ev in reversed(chunk.split(b"\n\n")):
                    if ev.startswith(b"data: {") and b'"usage"' in ev:
                        u = json.loads(ev[6:]).get("usage")
                        if u:
                            return u
            return None
        if body:
            return json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    return None


def tokenize_request(endpoint: str, model: str, body: dict) -> dict | None:
    """The ``/tokenize`` request that yields a request's prompt tokens as vLLM counts them, or None when the
    request has no prompt to tokenize (token-id prompts are taken as they are, see :func:`prompt_token_ids`)."""
    if endpoint.endswith("/chat/completions") and isinstance(body.get("messages"), list):
        return {"model": model, "messages": body["messages"], "add_generation_prompt": True}
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return {"model": model, "prompt": prompt}
    return None


def prompt_token_ids(body: dict) -> list[int] | None:
    """A completions request's prompt when it is already token ids (one prompt), else None."""
    p = body.get("prompt")
    if isinstance(p, list) and p and all(isinstance(x, int) for x in p):
        return p
    return None
