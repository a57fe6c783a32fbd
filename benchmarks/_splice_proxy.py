"""The floor of any proxy on this host: a TCP byte splicer (uvloop), no HTTP parsing, no features.

Each client connection gets its own upstream connection and bytes are copied both ways as they
arrive. What it adds over direct access is the two extra loopback hops and the process wake-ups
they cost, nothing else: ``gateway_overhead.py --floor`` puts it beside the gateway as the lower
bound a Python gateway could reach here.

    python benchmarks/_splice_proxy.py LISTEN_PORT UPSTREAM_PORT
"""
from __future__ import annotations

import asyncio
import sys

import uvloop


class _Pipe(asyncio.Protocol):
    def __init__(self, peer: "_Pipe | None" = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.peer is not None:
            self.peer.peer = self
            for d in self.peer.pending:
                transport.write(d)
            self.peer.pending.clear()

    def data_received(self, data: bytes) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connection_lost(self, exc) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


async def main(listen: int, upstream: int) -> None:
    loop = asyncio.get_running_loop()

    def client_side() -> _Pipe:
        side = _Pipe()
        loop.create_task(loop.create_connection(lambda: _Pipe(side), "127.0.0.1", upstream))
        return side

    server = await loop.create_server(client_side, "127.0.0.1", listen)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
