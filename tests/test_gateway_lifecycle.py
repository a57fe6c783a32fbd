"""Gateway process lifecycle with real vLLM processes: a backend that cannot start, and a gateway killed -9.

One gateway fronts a good emulated backend and a bad one (an unknown vLLM
flag: vLLM exits at argument parsing, every time). The gateway must listen
at once, keep serving the good model, mark the bad replica failed with its
last log lines, and leave no vLLM process behind when it is SIGKILLed.
"""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, start_gateway, status_of, wait_for
from gateway.launch import ServerProcess, free_port, group_members

pytestmark = pytest.mark.e2e  # starts real vLLM processes


def _gateway(cfg_text: str, name: str, tmp: Path) -> tuple[ServerProcess, Path]:
    cfg = tmp / f"{name}.toml"
    cfg.write_text(cfg_text)
    return start_gateway(name, cfg)


_BAD = '''
[[backends]]
name = "bad"
model = "mistral-h1024-l8"
served_model_name = "bad-model"
mode = "emulate"
profile = "cpu-epyc-2c_mistral-h1024-l8"
extra_args = ["--no-such-vllm-flag"]
'''


def test_bad_backend_fails_alone_and_a_sigkilled_gateway_leaves_no_vllm(tmp_path):
    port = free_port()
    proc, log = _gateway(f'''
[gateway]
port = {port}
max_start_failures = 2
[[backends]]
name = "good"
model = "mistral-h1024-l8"
served_model_name = "{MODEL}"
mode = "emulate"
profile = "cpu-epyc-2c_mistral-h1024-l8"
max_model_len = 2048
''' + _BAD, "gateway-lifecycle", tmp_path)
    url = f"http://127.0.0.1:{port}"
    try:
        # listening at once: liveness 200 and readiness 503 while the replicas boot
        wait_for(lambda: status_of(url + "/health") == 200, 30, what="the gateway to listen")
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})
        assert r.status_code in (200, 503)
        wait_for(lambda: status_of(url + "/ready?model=" + MODEL) == 200, 300, what="the good backend")
        wait_for(lambda: httpx.get(url + "/health").json()["models"]["bad-model"] == ["failed"], 180,
                 what="the bad replica to be marked failed")
        # the error record is written after the state flips; wait for the quoted complaint to reach the file
        wait_for(lambda: "no-such-vllm-flag" in (log.read_text().split("failed to start", 1) + [""])[1], 30,
                 what="vLLM's own complaint quoted in the gateway's error")
        text = log.read_text()
        assert re.search(r"bad/0 \(backend bad\) failed to start: vLLM exited with code \d+ 2 times", text)
        assert "no-such-vllm-flag" in text.split("failed to start", 1)[1]  # vLLM's own complaint, quoted
        assert status_of(url + "/ready") == 503 and status_of(url + "/health") == 200
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        r = httpx.post(url + "/v1/completions", json={"model": "bad-model", "prompt": "x"})
        assert r.status_code == 503 and "retry-after" in r.headers
        pgids = [int(p) for p in re.findall(r"started \S+ \(pid (\d+)", log.read_text())]
        assert group_members(pgids)  # the good replica's API server and engine core
        os.kill(proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        wait_for(lambda: not group_members(pgids), 5, interval_s=0.1,
                 what="every vLLM process to go with the SIGKILLed gateway")
        print(f"no vLLM process left {time.monotonic() - t_kill:.1f} s after SIGKILL")
    finally:
        proc.stop(grace_s=5)


def test_gateway_whose_every_replica_fails_exits_1_naming_the_backend(tmp_path):
    port = free_port()
    proc, log = _gateway(f"[gateway]\nport = {port}\nmax_start_failures = 2\n" + _BAD, "gateway-allbad", tmp_path)
    try:
        proc.proc.wait(240)
    finally:
        proc.stop(grace_s=5)
    assert proc.poll() == 1
    text = log.read_text()
    assert "error: every replica failed to start (last: bad/0" in text and "no-such-vllm-flag" in text

