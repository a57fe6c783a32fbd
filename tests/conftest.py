"""Shared test helpers: start real vLLM / gateway processes on loopback ports.

Servers are expensive (~16-30 s to start on 2 cores), so each test module
starts the ones it needs once (module-scoped fixtures) and stops them at the
end, killing the whole process group.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.launch import ServerProcess, free_port, wait_healthy  # noqa: E402
from profiles.assets import resolve_model_dir  # noqa: E402

MODEL = "mistral-h1024-l8"
BUNDLED_PROFILE = "cpu-epyc-2c_mistral-h1024-l8"
LOG_DIR = ROOT / "runs" / "test-logs"


def real_cpu_dtype() -> str:
    """The dtype a real vLLM-CPU test server (dummy weights) computes in on this host: ``"bfloat16"``
    where the CPU has native BF16 instructions (``avx512_bf16`` or ``amx_bf16`` among
    :func:`profiles.hostinfo.host_cpu`'s ISA flags), else ``"float32"``.

    Without them vLLM-CPU logs "Failed to create oneDNN linear, fallback to torch linear" and a BF16
    prefill crawls: on an AVX2-only EPYC (Zen 3) host a 512x1024 by 1024x4096 linear took 455 ms in
    bfloat16 against 58 ms in float32 (torch 2.13 CPU, one thread), and the capture test's
    1,536-token prefill step took 36 s, which ran that test past its 600 s timeout. The tests that
    use this check what a real server does, not BF16 numerics (its weights are dummy).
    """
    from profiles.hostinfo import host_cpu
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & set(host_cpu()["isa"]) else "float32"


@contextlib.contextmanager
def vllm_server(name: str, extra_args: list[str], env: dict[str, str] | None = None,
                emulate: bool = True, profile: str | None = BUNDLED_PROFILE, step_ms: float | None = None,
                model: str = MODEL):
    """Start ``python -m vllm.entrypoints.openai.api_server`` (emulated by default); yield its URL."""
    port = free_port()
    model_dir = resolve_model_dir(model)
    mistral = ["--tokenizer-mode", "mistral"] if (model_dir / "tekken.json").exists() else []
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", model, *mistral, "--host", "127.0.0.1",
            "--port", str(port), *extra_args]
    e = {k: v for k, v in os.environ.items() if not k.startswith("EMUGATE_")}
    e["HF_HUB_OFFLINE"] = "1"
    if emulate:
        argv += ["--distributed-executor-backend", "emu_executor.EmulatedExecutor"]
        if step_ms is not None:
            e["EMUGATE_STEP_MS"] = str(step_ms)
        if profile:
            from profiles.assets import resolve_profile
            e["EMUGATE_PROFILE"] = str(resolve_profile(profile))
    e.update(env or {})
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_file = LOG_DIR / f"{name}.log"
    log_file.unlink(missing_ok=True)
    proc = ServerProcess(name, argv, e, log=open(os.devnull, "w"), log_file=log_file)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=300)
        yield url, proc, log_file
    finally:
        proc.stop(grace_s=15)


def post(url: str, path: str, body: dict, timeout: float = 120) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def sse_events(url: str, path: str, body: dict, timeout: float = 120) -> list[bytes]:
    """Raw SSE events (``data: ...`` blocks) of a streamed response, in order."""
    out = []
    with httpx.stream("POST", url + path, json=body, timeout=timeout) as r:
        assert r.status_code == 200, r.read()
        buf = b""
        for chunk in r.iter_raw():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                if ev.strip():
                    out.append(ev)
    return out


def start_gateway(name: str, cfg: Path, *args: str, env: dict[str, str] | None = None
                  ) -> tuple[ServerProcess, Path]:
    """Start ``python -m gateway --config cfg *args`` with its log in ``runs/test-logs/<name>.log``.

    Returns (process, log file) right after the start; the caller waits (``/ready``) and stops it.
    """
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log = LOG_DIR / f"{name}.log"
    log.unlink(missing_ok=True)
    proc = ServerProcess(name, [sys.executable, "-m", "gateway", "--config", str(cfg), *args],
                         {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, log=open(os.devnull, "w"),
                         log_file=log)
    proc.start()
    return proc, log


def status_of(url: str) -> int | None:
    """GET ``url``'s status code, or None when nothing answers (not listening yet, or gone)."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.HTTPError:
        return None


def wait_for(pred, timeout_s: float, interval_s: float = 0.25, what: str = "condition"):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        v = pred()
        if v:
            return v
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


#: Tier markers (pyproject.toml [tool.pytest.ini_options] markers); a test with none of these is `unit`.
TIERS = ("e2e", "synth", "slow")


def pytest_collection_modifyitems(config, items):
    """Give every test without a tier marker the `unit` marker, so `-m unit` selects exactly the unit tier."""
    for item in items:
        if not any(item.get_closest_marker(t) for t in TIERS):
            item.add_marker(pytest.mark.unit)


def has_module(name: str) -> bool:
    """Whether an optional dependency is importable (for `synth` tests' skip reasons)."""
    import importlib.util
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


def run_py(*args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python *args`` from the repo root, capturing output."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
