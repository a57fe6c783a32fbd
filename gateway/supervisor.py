"""Supervisor: starts every backend replica, watches its health, restarts it.

Life of a replica (:class:`Replica`)::

    starting --/health 200--> ready --process exits / 3 failed health checks--> down
        ^  |                                                                     |
        |  +-- exits max_start_failures times in a row before ever being ready,  |
        |      or not healthy within startup_timeout_s --> failed (not restarted) |
        +------------- stop the group, restart after backoff (1, 2, 4 ... 30 s) --+

The proxy routes only to ``ready`` replicas. A replica marked down has its
in-flight streams fail with an error (the proxy sees the connection drop),
its process group is stopped (off the event loop) and it is restarted with
exponential backoff; the backoff resets once a replica has stayed ready for
``BACKOFF_RESET_S``. A replica that keeps crashing before its first ready
state (a typo in ``extra_args``, a model that does not fit) is marked
``failed`` and its last log lines are logged with its name, instead of
looping forever; when every replica of every backend has failed, the
``on_fatal`` callback fires (the CLI exits 1). ``stop()`` terminates every
process group (SIGTERM, then SIGKILL after a grace period); the
:class:`gateway.launch.Reaper` does the same if the gateway dies without
stopping (SIGKILL included), so no vLLM process outlives the gateway.

Isolation of the replicas it starts:

* Each replica listens on a Unix socket (vLLM's ``--uds``) in the
  supervisor's private runtime directory (``mkdtemp``: mode 0700, under
  ``$XDG_RUNTIME_DIR`` when set, else the system temp directory), so no other
  local user can connect to any of its routes (``/tokenize``, ``/metrics``,
  ``/sleep``... included). A backend with ``ports`` listens on those loopback
  ports instead (for ``--no-launch`` attachment and tools that need a port).
* Each start of a replica gets a fresh random key (``VLLM_API_KEY``,
  :func:`secrets.token_urlsafe`, 32 bytes) that only the gateway holds, so no
  other process of this user reaches a replica's ``/v1`` routes around the
  gateway's keys and ``queue_limit`` either. Attached servers
  (``launch=False``) get no key.
* A replica's environment is an allowlist (:func:`gateway.launch.replica_env`),
  never the variable ``api_keys_env`` names.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import aiohttp

from gateway.config import BackendConfig, Config
from gateway.launch import ServerProcess, free_port, vllm_command
from gateway.upstream import SessionPool

log = logging.getLogger("emugate.supervisor")

BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
#: A replica ready this long (s) has its restart backoff reset to the first step.
BACKOFF_RESET_S = 60.0
HEALTH_INTERVAL_S = 1.0
HEALTH_FAILURES_DOWN = 3
#: Grace (s) between SIGTERM and SIGKILL when a down replica is stopped for a restart.
RESTART_GRACE_S = 5.0
HEALTH_TIMEOUT = aiohttp.ClientTimeout(total=5)


@dataclass(eq=False)
class Replica:
    """One vLLM server of a backend, as the proxy and router see it."""

    backend: BackendConfig
    index: int
    port: int | None
    host: str = "127.0.0.1"
    uds: str | None = None  # Unix socket path (then port is None)
    state: str = "starting"  # starting | ready | down | failed | stopped
    outstanding: int = 0
    restarts: int = 0
    backoff_step: int = 0
    start_failures: int = 0
    process: ServerProcess | None = None
    auth_header: tuple[str, str] | None = None  # ("Authorization", "Bearer <this start's key>")
    auth_bytes: tuple[bytes, bytes] | None = None  # the same, as the data path sends it
    # backend-reported load (kv_aware routing), refreshed from /metrics
    num_waiting: float = 0.0
    kv_usage: float = 0.0
    started_at: float = field(default_factory=time.monotonic)
    ready_since: float | None = None
    scheme: str = "http"
    remote: bool = False  # a server named in the backend's ``urls``: never started or stopped here
    ssl: Any = None  # https: an SSLContext, or False when tls_verify = false; None for http
    reason: str = ""  # why it is not ready (shown by /ready and logged when it changes)

    @property
    def name(self) -> str:
        return f"{self.backend.name}/{self.index}"

    @property
    def url(self) -> str:
        """Base URL of the replica (for a Unix socket the host part is only the ``Host`` header)."""
        return "http://localhost" if self.uds else f"{self.scheme}://{self.host}:{self.port}"

    @property
    def aiohttp_ssl(self) -> Any:
        """aiohttp's ``ssl`` argument for this replica (True: the default verification)."""
        return True if self.ssl is None else self.ssl

    @property
    def address(self) -> str:
        """Where it listens, for log lines: ``unix:PATH`` or ``HOST:PORT``."""
        return f"unix:{self.uds}" if self.uds else f"{self.host}:{self.port}"

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def auth_headers(self) -> dict[str, str]:
        """The header that opens this replica's ``/v1`` routes (empty for attached servers)."""
        return dict([self.auth_header]) if self.auth_header else {}


def _remote_replica(b: BackendConfig, i: int, url: str) -> Replica:
    """A Replica for server ``url`` of backend ``b`` (its key from ``api_key_env``/``api_key_file``)."""
    import ssl as _ssl
    from urllib.parse import urlsplit
    p = urlsplit(url)
    https = p.scheme == "https"
    ctx: Any = None
    if https:
        if not b.tls_verify:
            ctx = False
        else:
            ctx = _ssl.create_default_context(cafile=b.ca_file) if b.ca_file else _ssl.create_default_context()
    r = Replica(b, i, p.port or (443 if https else 80), host=p.hostname, scheme=p.scheme, remote=True, ssl=ctx)
    key = b.remote_key()
    if key is not None:
        v = key.get_secret_value()
        r.auth_header = ("Authorization", f"Bearer {v}")
        r.auth_bytes = (b"authorization", f"Bearer {v}".encode())
    return r


class Supervisor:
    """Owns the replicas of every backend in a :class:`Config`.

    Args:
        config: the gateway config.
        launch: False to attach to already-running servers on the configured
            ports (no processes started; used by tests and ``--no-launch``).
        log_stream: where prefixed backend log lines go (default stderr).
        on_fatal: called once, with a message, when every replica has failed.
    """

    def __init__(self, config: Config, launch: bool = True, log_stream=None,
                 on_fatal: Callable[[str], None] | None = None):
        self.config = config
        self.launch = launch
        self.log_stream = log_stream if log_stream is not None else sys.stderr
        self.on_fatal = on_fatal
        self.replicas: dict[str, list[Replica]] = {}
        self.runtime_dir: str | None = None
        if launch and any(not b.ports or b.faults is not None for b in config.backends):
            self.runtime_dir = tempfile.mkdtemp(prefix="emugate-", dir=os.environ.get("XDG_RUNTIME_DIR") or None)
        g = config.gateway
        self.sessions = SessionPool(g.connect_timeout_s, g.idle_timeout_s)
        for bi, b in enumerate(config.backends):
            reps = []
            if b.urls is not None:
                reps = [_remote_replica(b, i, u) for i, u in enumerate(b.urls)]
                self.replicas[b.model_name] = reps
                continue
            for i in range(b.replicas):
                if b.ports:
                    reps.append(Replica(b, i, b.ports[i]))
                elif self.runtime_dir:
                    reps.append(Replica(b, i, None, uds=os.path.join(self.runtime_dir, f"b{bi}r{i}.sock")))
                else:
                    reps.append(Replica(b, i, free_port()))
            self.replicas[b.model_name] = reps
        self._tasks: list[asyncio.Task] = []
        self._stopping = False

    # -------------------------------------------------------------- API
    def faults_file(self, r: Replica) -> Path | None:
        """Where replica ``r`` reads its engine faults (:mod:`gateway.faults`), in the private runtime
        directory; None for a real backend, one without ``faults``, or attached servers."""
        b = r.backend
        if b.mode != "emulate" or b.faults is None or not self.runtime_dir or not self.launch:
            return None
        return Path(self.runtime_dir) / f"faults-{b.name}-{r.index}.json"

    def all_replicas(self) -> list[Replica]:
        return [r for reps in self.replicas.values() for r in reps]

    async def start(self, wait: bool = True) -> None:
        """Start every replica and the watcher tasks; with ``wait``, return once
        each backend has at least one ready replica.

        Raises:
            TimeoutError: with ``wait``, a backend had no ready replica within
                ``gateway.startup_timeout_s``.
        """
        for r in self.all_replicas():
            if r.remote:
                self._tasks.append(asyncio.create_task(self._watch_remote(r), name=f"watch-{r.name}"))
                continue
            if self.launch:
                self._spawn(r)
            self._tasks.append(asyncio.create_task(self._watch(r), name=f"watch-{r.name}"))
        if wait:
            await self.wait_ready(self.config.gateway.startup_timeout_s)

    async def wait_ready(self, timeout_s: float) -> None:
        """Return once every model has a ready replica.

        Raises:
            TimeoutError: not within ``timeout_s``, or every replica of a model failed.
        """
        t0 = time.monotonic()
        while True:
            missing = [m for m, reps in self.replicas.items() if not any(r.ready for r in reps)]
            if not missing:
                return
            failed = [m for m in missing if all(r.state == "failed" for r in self.replicas[m])]
            if failed or time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"no ready replica after {time.monotonic() - t0:.0f} s for: {missing}"
                                   + (f" (failed: {failed})" if failed else ""))
            await asyncio.sleep(0.25)

    async def stop(self) -> None:
        """Stop watchers and terminate every replica's process group (off the event loop)."""
        self._stopping = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        procs = [r for r in self.all_replicas() if r.process is not None]
        await asyncio.gather(*(loop.run_in_executor(None, r.process.stop, 20.0) for r in procs))
        for r in self.all_replicas():
            r.state = "stopped"
        await self.sessions.close()
        if self.runtime_dir:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # ---------------------------------------------------------- internals
    def _spawn(self, r: Replica) -> None:
        key = secrets.token_urlsafe(32)
        r.auth_header = ("Authorization", f"Bearer {key}")
        r.auth_bytes = (b"authorization", f"Bearer {key}".encode())
        withhold = {self.config.gateway.api_keys_env} if self.config.gateway.api_keys_env else set()
        argv, env = vllm_command(r.backend, r.port, r.index, r.host, api_key=key, uds=r.uds,
                                 withhold_env=withhold, runtime_dir=self.runtime_dir)
        fpath = self.faults_file(r)
        if fpath is not None:
            from gateway.faults import startup_seconds, write_state
            from gateway.launch import resolve_model
            if not fpath.exists():
                write_state(fpath, {})
            env["EMUGATE_FAULTS_FILE"] = str(fpath)
            b = r.backend
            startup = startup_seconds(b.faults.cold_start, resolve_model(b.model), b.dtype, b.tensor_parallel_size)
            if startup > 0:
                env["EMUGATE_STARTUP_S"] = f"{startup:.3f}"
        if r.uds and os.path.lexists(r.uds):
            os.unlink(r.uds)  # a previous start's socket: vLLM binds a fresh one
        r.process = ServerProcess(r.name, argv, env, log=self.log_stream)
        r.process.start()
        r.state = "starting"
        r.started_at = time.monotonic()
        r.ready_since = None
        log.info("started %s (pid %s, %s, mode %s)", r.name, r.process.pid, r.address, r.backend.mode)

    async def _stop_process(self, r: Replica, grace_s: float) -> None:
        if r.process is not None:
            await asyncio.get_running_loop().run_in_executor(None, r.process.stop, grace_s)

    async def _healthy(self, r: Replica) -> bool:
        try:
            async with self.sessions.get(r.uds).get(f"{r.url}/health", timeout=HEALTH_TIMEOUT,
                                                    ssl=r.aiohttp_ssl) as resp:
                return resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def check_remote(self, r: Replica) -> str:
        """Why remote replica ``r`` cannot serve its model now ("" when it can): unreachable, unhealthy,
        refusing the backend's key, or serving other models."""
        s = self.sessions.get(None)
        try:
            async with s.get(f"{r.url}/health", timeout=HEALTH_TIMEOUT, ssl=r.aiohttp_ssl) as resp:
                if resp.status != 200:
                    return f"/health answered {resp.status}"
            async with s.get(f"{r.url}/v1/models", headers=r.auth_headers(), timeout=HEALTH_TIMEOUT,
                             ssl=r.aiohttp_ssl) as resp:
                if resp.status in (401, 403):
                    return (f"/v1/models answered {resp.status}: the server refused the backend's key (set "
                            "api_key_env or api_key_file to the server's own key)")
                if resp.status != 200:
                    return f"/v1/models answered {resp.status}"
                ids = [m.get("id") for m in (await resp.json(content_type=None)).get("data", [])]
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError, AttributeError) as e:
            return f"unreachable ({e.__class__.__name__}: {str(e)[:200]})"
        if r.backend.model_name not in ids:
            return f"serves {ids}, not {r.backend.model_name!r} (set served_model_name to the name the server uses)"
        return ""

    async def _watch_remote(self, r: Replica) -> None:
        """Health of a server named in ``urls``: ready when it answers and serves the backend's model;
        down after failed checks; never started, stopped or restarted here."""
        failures = 0
        delay = 0.25
        while not self._stopping:
            why = await self.check_remote(r) if not r.ready else ("" if await self._healthy(r) else "/health failed")
            if not why:
                failures, delay = 0, HEALTH_INTERVAL_S
                if not r.ready:
                    log.info("%s (%s) ready", r.name, r.url)
                    r.state, r.ready_since, r.reason = "ready", time.monotonic(), ""
            else:
                failures += 1
                if r.ready and failures < HEALTH_FAILURES_DOWN:
                    pass
                else:
                    if why != r.reason:
                        log.warning("%s (%s) not ready: %s", r.name, r.url, why)
                    r.state = "down" if r.ready or r.state == "down" else "starting"
                    r.reason = why
                    delay = min(5.0, delay * 2)
            await asyncio.sleep(delay)

    def _tail(self, r: Replica) -> str:
        """The replica's last 15 output lines for an error message, each cut at 400 characters (vLLM's
        argparse usage line alone is ~10 kB and says nothing the error line after it does not)."""
        lines = list(r.process.tail) if r.process is not None else []
        cut = (lambda ln: ln if len(ln) <= 400 else ln[:400] + f" ... ({len(ln) - 400} more characters)")  # noqa: E731
        return "\n".join(f"    [{r.name}] {cut(ln)}" for ln in lines[-15:]) or "    (no output)"

    def _fail(self, r: Replica, why: str) -> None:
        r.state = "failed"
        log.error("%s (backend %s) failed to start: %s; not restarting it. Its last log lines:\n%s",
                  r.name, r.backend.name, why, self._tail(r))
        if self.launch and all(x.state == "failed" for x in self.all_replicas()) and self.on_fatal:
            self.on_fatal(f"every replica failed to start (last: {r.name}: {why})")

    async def _restart(self, r: Replica, why: str) -> None:
        """Stop ``r``'s group and start it again after the backoff step."""
        r.state = "down"
        delay = BACKOFF_S[min(r.backoff_step, len(BACKOFF_S) - 1)]
        log.warning("%s %s; restarting in %.0f s", r.name, why, delay)
        await self._stop_process(r, RESTART_GRACE_S)
        await asyncio.sleep(delay)
        if self._stopping:
            return
        r.restarts += 1
        r.backoff_step += 1
        self._spawn(r)

    async def _watch(self, r: Replica) -> None:
        g = self.config.gateway
        failures = 0
        while not self._stopping:
            code = r.process.poll() if r.process is not None else None
            if code is not None:
                if r.ready_since is None and r.state == "starting":
                    r.start_failures += 1
                    if r.start_failures >= g.max_start_failures:
                        await self._stop_process(r, 1.0)
                        return self._fail(r, f"vLLM exited with code {code} {r.start_failures} times "
                                             "before becoming ready")
                await self._restart(r, f"exited with code {code}")
                failures = 0
                continue
            ok = await self._healthy(r)
            now = time.monotonic()
            if ok:
                failures = 0
                if r.state != "ready":
                    log.info("%s ready after %.1f s", r.name, now - r.started_at)
                    r.state, r.ready_since, r.start_failures = "ready", now, 0
                elif r.backoff_step and now - r.ready_since >= BACKOFF_RESET_S:
                    r.backoff_step = 0
            elif r.state == "ready":
                failures += 1
                if failures >= HEALTH_FAILURES_DOWN:
                    if not self.launch:
                        log.warning("%s failed %d health checks; not routing to it", r.name, failures)
                        r.state = "down"
                    else:
                        await self._restart(r, f"failed {failures} health checks")
                        failures = 0
                        continue
            elif r.state == "starting" and self.launch and now - r.started_at > g.startup_timeout_s:
                await self._stop_process(r, RESTART_GRACE_S)
                return self._fail(r, f"not healthy within startup_timeout_s ({g.startup_timeout_s:g} s)")
            await asyncio.sleep(HEALTH_INTERVAL_S if r.state == "ready" else 0.25)
