"""Running the gateway app under uvicorn, with a request-header deadline.

uvicorn's httptools protocol has no deadline for a request's headers: a
client that opens a connection and trickles bytes (slowloris) holds a socket
and a parser forever. :func:`deadline_protocol` subclasses it: a timer armed
when a connection opens and at the first byte of every request, disarmed when
the headers are complete; if it fires, the client gets ``408`` in OpenAI's
error JSON and the connection is closed. Once the headers are complete it
also pauses reading until the app asks for the body (uvicorn's ``receive``
resumes it), so a request refused at admission (429, before its body is
read) has no more of its body buffered than arrived with its headers. The body deadline
(``body_timeout_s``) is enforced by the proxy, which reads the body.
Between requests on a keep-alive connection uvicorn's own keep-alive timeout
(5 s) applies.

``HttpToolsProtocol`` is uvicorn's private class, so ``pyproject.toml`` pins
uvicorn to the range it was tested with (:data:`TESTED_UVICORN`), and
:func:`check_private_api` (run when the protocol is built, and by the unit
tests) fails loudly, naming the version, if a method the subclass hooks moved.
"""
from __future__ import annotations

import json

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

#: uvicorn versions this subclass was tested with (keep in step with pyproject.toml).
TESTED_UVICORN = ">=0.29,<0.55"
#: What the subclass relies on: the methods it overrides (called by httptools/asyncio) and attributes it reads.
HOOKED_METHODS = ("connection_made", "connection_lost", "on_message_begin", "on_headers_complete")
#: Attributes of an ``HttpToolsProtocol`` instance the subclass uses (checked on a live connection by the tests).
USED_ATTRIBUTES = ("loop", "transport", "flow")


def check_private_api(cls: type = HttpToolsProtocol) -> None:
    """Raise RuntimeError, naming uvicorn's version and :data:`TESTED_UVICORN`, if a hooked method is gone."""
    missing = [m for m in HOOKED_METHODS if not callable(getattr(cls, m, None))]
    if missing:
        raise RuntimeError(f"uvicorn {uvicorn.__version__}: HttpToolsProtocol no longer has {missing}; the gateway's "
                           f"header deadline (gateway/server.py) was tested with uvicorn {TESTED_UVICORN}. Install "
                           "a version in that range (pip install 'uvicorn[standard]" + TESTED_UVICORN + "').")


def _408(header_timeout_s: float) -> bytes:
    body = json.dumps({"error": {
        "message": f"The request headers did not arrive within header_timeout_s ({header_timeout_s:g} s)",
        "type": "invalid_request_error", "param": None, "code": 408}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n" % len(body)) + body


def deadline_protocol(header_timeout_s: float) -> type[HttpToolsProtocol]:
    """An ``HttpToolsProtocol`` subclass enforcing ``header_timeout_s`` (s); pass it as uvicorn's ``http``.

    Raises:
        RuntimeError: uvicorn's private protocol class changed (:func:`check_private_api`).
    """
    check_private_api()
    response = _408(header_timeout_s)

    class DeadlineHttpToolsProtocol(HttpToolsProtocol):
        _header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._header_timeout)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_timeout(self) -> None:
            self._header_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            scope = getattr(self, "scope", None)  # uvicorn's request scope, built in on_message_begin
            if scope is not None:
                scope["emugate.transport"] = self.transport  # the client connection: the reset stream fault
            super().on_headers_complete()
            # read no more of the body until the app asks for it (uvicorn's receive() resumes reading, and so
            # does the end of a response): a request refused before its body is read (429) buffers nothing
            self.flow.pause_reading()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return DeadlineHttpToolsProtocol
