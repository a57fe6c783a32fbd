"""``GET /ready`` for a standalone emulated server (a Kubernetes readiness probe), via vLLM's
``--middleware`` plug point.

vLLM's OpenAI server answers ``/health`` (200 while its engine is up, 503 once it died) and starts
listening only after its engine started, so readiness is exactly its health: this ASGI middleware
serves ``GET``/``HEAD /ready`` by asking the app for ``/health`` and passing its answer on.
``emugate emulate`` adds it (``--middleware emu_executor.ready.ReadyMiddleware``).
"""
from __future__ import annotations


class ReadyMiddleware:
    """ASGI middleware: ``/ready`` is answered as ``/health`` (same status and body)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope.get("path") == "/ready" and scope.get("method") in ("GET", "HEAD"):
            scope = {**scope, "path": "/health", "raw_path": b"/health"}
        await self.app(scope, receive, send)
