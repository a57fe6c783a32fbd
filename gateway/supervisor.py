"""Supervisor: starts every backend replica, watches its health, restarts it.

Life of a replica (:class:`Replica`)::

    starting --/health 200--> ready --process exits / health fails--> down
        ^                                                          |
        +------------- restart after backoff (1, 2, 4 ... 30 s) ---+

The proxy routes only to ``ready`` replicas. A replica marked down has its
in-flight streams fail with an error (the proxy sees the connection drop)
and is restarted with exponential backoff; ``stop()`` terminates every
process group (SIGTERM, then SIGKILL after a grace period) so no vLLM
process outlives the gateway.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import time
from dataclasses import dataclass, field

import aiohttp

from gateway.config import BackendConfig, Config
from gateway.launch import ServerProcess, free_port, vllm_command

log = logging.getLogger("emugate.supervisor")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
HEALTH_INTERVAL_S = 1.0
HEALTH_FAILURES_DOWN = 3


@dataclass(eq=False)
class Replica:
    """One vLLM server of a backend, as the proxy and router see it."""

    backend: BackendConfig
    index: int
    port: int
    host: str = "127.0.0.1"
    state: str = "starting"  # starting | ready | down | stopped
    outstanding: int = 0
    restarts: int = 0
    process: ServerProcess | None = None
    # backend-reported load (kv_aware routing), refreshed from /metrics
    num_waiting: float = 0.0
    kv_usage: float = 0.0
    started_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return f"{self.backend.name}/{self.index}"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"


class Supervisor:
    """Owns the replicas of every backend in a :class:`Config`.

    Args:
        config: the gateway config.
        launch: False to attach to already-running servers on the configured
            ports (no processes started; used by tests and ``--no-launch``).
        log_stream: where prefixed backend log lines go (default stderr).
    """

    def __init__(self, config: Config, launch: bool = True, log_stream=None):
        self.config = config
        self.launch = launch
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.replicas: dict[str, list[Replica]] = {}
        for b in config.backends:
            reps = []
            for i in range(b.replicas):
                port = b.ports[i] if b.ports else free_port()
                reps.append(Replica(b, i, port))
            self.replicas[b.model_name] = reps
        self._tasks: list[asyncio.Task] = []
        self._session: aiohttp.ClientSession | None = None
        self._stopping = False

    # -------------------------------------------------------------- API
    def all_replicas(self) -> list[Replica]:
        return [r for reps in self.replicas.values() for r in reps]

    async def start(self, wait: bool = True) -> None:
        """Start every replica and the watcher tasks; with ``wait``, return once
        each backend has at least one ready replica.

        Raises:
            TimeoutError: a backend had no ready replica within
                ``gateway.startup_timeout_s``.
        """
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        for r in self.all_replicas():
            if self.launch:
                self._spawn(r)
            self._tasks.append(asyncio.create_task(self._watch(r), name=f"watch-{r.name}"))
        if wait:
            await self.wait_ready(self.config.gateway.startup_timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        t0 = time.monotonic()
        while True:
            missing = [m for m, reps in self.replicas.items() if not any(r.ready for r in reps)]
            if not missing:
                return
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"no ready replica after {timeout_s:.0f} s for: {missing}")
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        """Stop watchers and terminate every replica's process group."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        procs = [r for r in self.all_replicas() if r.process is not None]
        await asyncio.gather(*(loop.run_in_executor(None, r.process.stop, 20.0) for r in procs))
        for r in self.all_replicas():
            r.state = "stopped"
        if self._session:
            await self._session.close()

    # ---------------------------------------------------------- internals
    def _spawn(self, r: Replica) -> None:
        argv, env = vllm_command(r.backend, r.port, r.index, r.host)
        r.process = ServerProcess(r.name, argv, env, log=self.log_stream)
        r.process.start()
        r.state = "starting"
        r.started_at = time.monotonic()
        log.info("started %s (pid %s, port %d, mode %s)", r.name, r.process.pid, r.port, r.backend.mode)

    async def _healthy(self, r: Replica) -> bool:
        try:
            async with self._session.get(f"{r.url}/health") as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def _watch(self, r: Replica) -> None:
        failures = 0
        while not self._stopping:
            exited = r.process is not None and r.process.poll() is not None
            if exited:
                code = r.process.poll()
                r.state = "down"
                delay = BACKOFF_S[min(r.restarts, len(BACKOFF_S) - 1)]
                log.warning("%s exited with code %s; restarting in %.0f s", r.name, code, delay)
                r.process.stop(grace_s=1)
                await asyncio.sleep(delay)
                if self._stopping:
                    return
                r.restarts += 1
                self._spawn(r)
                failures = 0
                continue
            ok = await self._healthy(r)
            if ok:
                failures = 0
                if r.state != "ready":
                    log.info("%s ready after %.1f s", r.name, time.monotonic() - r.started_at)
                    r.state = "ready"
            elif r.state == "ready":
                failures += 1
                if failures >= HEALTH_FAILURES_DOWN:
                    log.warning("%s failed %d health checks; not routing to it", r.name, failures)
                    r.state = "down"
            await asyncio.sleep(HEALTH_INTERVAL_S if r.state == "ready" else 0.25)
