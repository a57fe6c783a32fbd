"""Helpers shared by the benchmark scripts: start servers, print tables."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.launch import ServerProcess, free_port, wait_healthy  # noqa: E402
from profiles.assets import resolve_model_dir, resolve_profile  # noqa: E402

MODEL = "mistral-h1024-l8"
PROFILE = "cpu-epyc-2c_mistral-h1024-l8"


@contextlib.contextmanager
def emulated_server(extra_args=(), env=None, step_ms=None, profile=PROFILE, name="bench-emu", model=MODEL,
                    max_model_len=4096, log_file=None, timeout_s=300):
    """An emulated vLLM server (vLLM's OpenAI server with ``emu_executor.EmulatedExecutor``) on a
    free port; yields (base URL, process) and stops it on exit.

    ``model`` is a bundled model name or a model directory (served under its name; the Mistral
    tokenizer mode for the bundled Mistral model), ``profile`` a bundled profile name or file
    (``EMUGATE_PROFILE``) unless ``step_ms`` sets a constant step time in ms; ``extra_args`` are
    vLLM flags, ``env`` extra environment (``EMUGATE_*`` of the caller's environment are dropped
    first). The log goes to ``log_file`` (default ``runs/<name>.log``).

    Raises:
        RuntimeError: the server exited before answering /health (``wait_healthy``).
        TimeoutError: it did not answer /health within ``timeout_s`` s.
    """
    port = free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(resolve_model_dir(model)),
            "--served-model-name", Path(str(model)).name, "--port", str(port), "--host", "127.0.0.1",
            "--distributed-executor-backend", "emu_executor.EmulatedExecutor",
            "--max-model-len", str(max_model_len), *extra_args]
    if model == MODEL:
        argv += ["--tokenizer-mode", "mistral"]
    e = {k: v for k, v in os.environ.items() if not k.startswith("EMUGATE_")}
    e["HF_HUB_OFFLINE"] = "1"
    if step_ms is not None:
        e["EMUGATE_STEP_MS"] = str(step_ms)
    elif profile:
        e["EMUGATE_PROFILE"] = str(resolve_profile(profile))
    e.update(env or {})
    log = Path(log_file) if log_file else ROOT / "runs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = ServerProcess(name, argv, e, log=open(os.devnull, "w"), log_file=log)
    proc.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=timeout_s)
        yield url, proc
    finally:
        proc.stop(grace_s=30)


def start_gateway(name: str, config_toml: str, args: tuple[str, ...] = ()) -> tuple[str, "ServerProcess", Path]:
    """Start ``python -m gateway`` on a free port with ``[gateway]\nport = N\n`` + ``config_toml``.

    Returns (base URL, process, log file ``runs/<name>-gateway.log``) right after the start: wait with
    ``wait_healthy(url, proc, path="/ready")``; stop with ``proc.stop()``.
    """
    import tempfile
    port = free_port()
    cfg = Path(tempfile.mkdtemp()) / f"{name}.toml"
    cfg.write_text(f"[gateway]\nport = {port}\n{config_toml}")
    log = ROOT / "runs" / f"{name}-gateway.log"
    log.parent.mkdir(exist_ok=True)
    log.unlink(missing_ok=True)
    proc = ServerProcess("gateway", [sys.executable, "-m", "gateway", "--config", str(cfg), *args],
                         {**os.environ, "PYTHONUNBUFFERED": "1"}, log=open(os.devnull, "w"), log_file=log)
    proc.start()
    return f"http://127.0.0.1:{port}", proc, log


def pct(values, p):
    import numpy as np
    return float(np.percentile(values, p)) if len(values) else float("nan")


def fidelity_pair(config: str | Path, out: str | Path) -> tuple:
    """(real backend, emulated backend) of a fidelity config (the first of each mode); creates ``out``."""
    from gateway.config import load_config
    Path(out).mkdir(parents=True, exist_ok=True)
    cfg = load_config(config)
    return (next(b for b in cfg.backends if b.mode == "real"),
            next(b for b in cfg.backends if b.mode == "emulate"))


def probe_cli(doc: str, out_name: str, passes_help: str):
    """The decode-probe benchmarks' command line (``--config``, ``--passes``, ``--out``): parses it and
    returns (args, out folder, real backend, emulated backend) of the fidelity config
    (:func:`fidelity_pair`; ``out`` defaults to ``runs/OUT_NAME``)."""
    import argparse
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "profiles" / "fidelity-cpu.toml"))
    ap.add_argument("--passes", type=int, default=2, help=passes_help)
    ap.add_argument("--out", default=str(ROOT / "runs" / out_name))
    a = ap.parse_args()
    out = Path(a.out)
    return (a, out, *fidelity_pair(a.config, out))
