"""A scripted raw-socket HTTP/1.1 server standing in for a vLLM replica in protocol edge cases.

Real vLLM never sends most of these byte sequences on purpose (interim 1xx
responses, trailers, close-delimited bodies, a connection cut mid-body), so
the gateway's conformance tests need a peer that does, byte for byte. The
request's ``x-script`` header picks the behaviour (the gateway forwards
end-to-end headers); ``GET /health`` always answers 200.

Every request is recorded (:attr:`ScriptedUpstream.requests`: method, path,
headers, body, connection number) so tests can check what crossed the hop.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time


class ScriptedUpstream:
    """Runs on 127.0.0.1:<port> in a background thread until :meth:`close`."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.connections = 0
        self.closed_by_peer: list[float] = []  # when the gateway closed a connection we held open (hang)
        self.flood_bytes = 0  # bytes the flood script managed to hand to the kernel
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="scripted-upstream")
        self._thread.start()
        self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._conn, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _read_request(self, reader: asyncio.StreamReader) -> dict | None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            if ln:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        return {"method": method, "path": path, "headers": headers, "body": body}

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        conn_no = self.connections
        try:
            while True:
                req = await self._read_request(reader)
                if req is None:
                    return
                req["conn"] = conn_no
                if req["path"] != "/health":
                    self.requests.append(req)
                keep = await self._answer(req, reader, writer)
                if not keep:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()

    @staticmethod
    def _json(status: str, doc: dict, extra: bytes = b"") -> bytes:
        body = json.dumps(doc).encode()
        return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                .encode() + extra + b"\r\n" + body)

    async def _answer(self, req: dict, reader, w: asyncio.StreamWriter) -> bool:
        script = req["headers"].get("x-script", "length")
        echo = {"echo": req["body"].decode(errors="replace"), "headers": req["headers"], "conn": req["conn"]}
        if req["path"] == "/health":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        elif script == "length":
            w.write(self._json("200 OK", echo, b"x-upstream: yes\r\nconnection: keep-alive, x-upstream\r\n"))
        elif script == "continue":  # interim responses before the real one, on the same connection
            w.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"HTTP/1.1 103 Early Hints\r\nlink: </x>; rel=preload\r\n\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(self._json("200 OK", echo))
        elif script == "chunked-trailers":  # SSE events, one per chunk, split across TCP writes, then trailers
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                    b"trailer: x-checksum\r\n\r\n")
            for i in range(3):
                ev = f"data: {{\"i\": {i}, \"echo\": {json.dumps(echo['echo'])}}}\n\n".encode()
                frame = b"%x\r\n" % len(ev) + ev + b"\r\n"
                half = len(frame) // 2
                w.write(frame[:half])
                await w.drain()
                await asyncio.sleep(0.02)
                w.write(frame[half:])
                await w.drain()
            w.write(b"0\r\nx-checksum: abc\r\n\r\n")
        elif script == "close-delimited":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\nconnection: close\r\n\r\n")
            for part in (b"part1;", b"part2;", b"part3"):
                w.write(part)
                await w.drain()
                await asyncio.sleep(0.02)
            await w.drain()
            return False
        elif script == "close-mid-body":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"partial")
            await w.drain()
            return False
        elif script == "close-mid-stream":
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            ev = b'data: {"i": 0}\n\n'
            w.write(b"%x\r\n" % len(ev) + ev + b"\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            return False
        elif script == "error":
            w.write(self._json("500 Internal Server Error", {"error": {"message": "scripted failure",
                                                                       "type": "InternalServerError",
                                                                       "param": None, "code": 500}}))
        elif script == "slow":  # SSE events 200 ms apart
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(5):
                ev = f"data: {{\"i\": {i}}}\n\n".encode()
                w.write(b"%x\r\n" % len(ev) + ev + b"\r\n")
                await w.drain()
                await asyncio.sleep(0.2)
            w.write(b"0\r\n\r\n")
        elif script == "flood":  # as many SSE bytes as the gateway will take, up to 256 MiB
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            ev = b"data: " + b"x" * 4090 + b"\n\n"
            frame = b"%x\r\n" % len(ev) + ev + b"\r\n"
            t0 = time.monotonic()
            while self.flood_bytes < 256 * 2**20 and time.monotonic() - t0 < 30:
                w.write(frame)
                await w.drain()
                self.flood_bytes += len(frame)
            return False
        elif script == "hang":  # never answer; note when the gateway gives up on the connection
            await reader.read()  # returns at EOF: the gateway closed its side
            self.closed_by_peer.append(time.monotonic())
            return False
        else:
            w.write(self._json("400 Bad Request", {"error": {"message": f"unknown script {script}"}}))
        await w.drain()
        return True
