"""The error answers the gateway writes itself: OpenAI's error JSON, named by request id.

Every 4xx/5xx the gateway produces (as opposed to one a replica sent, which
passes through unchanged) has the body ``{"error": {"message", "type",
"param", "code"}}`` that OpenAI's API and vLLM's server use, and carries the
request's ``X-Request-Id`` in its headers and at the end of its message.
"""
from __future__ import annotations

import itertools
import json
import os
import re

_RID_OK = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
#: Generated request ids: 16 random hex digits per gateway process, then a 16-digit hex counter (32 in all):
#: unique within a process and across restarts, without a system call per request as uuid4 makes.
_RID_PREFIX = os.urandom(8).hex()
_RID_COUNTER = itertools.count()


def error_body(message: str, type_: str, code: int | str, param: str | None = None,
               request_id: str | None = None) -> bytes:
    """OpenAI's error JSON: {"error": {"message", "type", "param", "code"}}; the request id ends the message."""
    if request_id:
        message = f"{message} (request id {request_id})"
    return json.dumps({"error": {"message": message, "type": type_, "param": param, "code": code}}).encode()


def request_id(headers: list[tuple[bytes, bytes]]) -> bytes:
    """The client's ``X-Request-Id`` if well-formed (1-128 of ``[A-Za-z0-9._:-]``), else a new 32-hex-digit id."""
    for k, v in headers:
        if k == b"x-request-id" and _RID_OK.fullmatch(v):
            return v
    return f"{_RID_PREFIX}{next(_RID_COUNTER):016x}".encode()


async def send_error(send, status: int, message: str, type_: str, rid: bytes, code: int | str | None = None,
                     param: str | None = None, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    """Answer an ASGI request with OpenAI's error JSON (``code`` defaults to ``status``)."""
    body = error_body(message, type_, status if code is None else code, param, rid.decode())
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"x-request-id", rid), *(headers or [])]})
    await send({"type": "http.response.body", "body": body, "more_body": False})
