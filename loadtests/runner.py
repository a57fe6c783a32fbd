"""Run the Locust ShareGPT workload headless from Python (validate, capture, benchmarks).

One call = one ``locust -f loadtests/sharegpt.py --headless ...`` subprocess
(a separate process, as users run it, so its CPU use and timing are those of
a real load test) that writes vLLM ``--save-result``-style JSON.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

LOCUSTFILE = Path(__file__).resolve().parent / "sharegpt.py"


def run_locust(url: str, model: str, out: str | Path, *, rate: float, num_prompts: int, seed: int,
               burstiness: float = 1.0, tokenizer: str | None = None, ignore_eos: bool = True,
               allow_failures: bool = False) -> dict:
    """Drive ``num_prompts`` ShareGPT requests at ``rate`` requests/s (gamma
    ``burstiness``; 1 = Poisson) against ``url``; return the result JSON.

    Args:
        url: base URL of an OpenAI-compatible server (no ``/v1``).
        model: the served model name; ``tokenizer``: its tokenizer directory
            (default: sharegpt.py's, i.e. the model name).
        out: result JSON path (a PNG is written beside it).
        allow_failures: accept Locust's exit code 1 (some requests failed, as a fault scenario
            expects) when the result was written; the failures are in its ``errors``.
    Raises:
        RuntimeError: Locust exited non-zero (1 allowed with ``allow_failures``) or wrote no result; the message
            holds the command and the end of its stderr.
    """
    out = Path(out).resolve()
    cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-H", url, "--model", model,
           "--num-prompts", str(num_prompts), "--request-rate", str(rate), "--burstiness", str(burstiness),
           "--seed", str(seed), "--result-json", str(out), "--only-summary", "--loglevel", "WARNING"]
    if tokenizer:
        cmd += ["--tokenizer", tokenizer]
    if ignore_eos:
        cmd.append("--ignore-eos")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if p.returncode not in ((0, 1) if allow_failures else (0,)) or not out.exists():
        raise RuntimeError(f"load run failed ({' '.join(cmd)}):\n{p.stderr[-2000:]}")
    return json.loads(out.read_text())
