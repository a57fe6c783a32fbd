"""Secrets stay where they belong, with real vLLM replicas started by the gateway.

The gateway holds its client keys in an environment variable (``api_keys_env``) beside an unrelated
secret; its emulated replica listens on a Unix socket in the gateway's private directory. Proven here
by reading what the processes really have: every replica process's ``/proc/PID/environ``, the gateway's
log, the socket directory's mode, and what the socket answers without the replica's own key.
"""
from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import httpx
import pytest

from conftest import BUNDLED_PROFILE, MODEL, start_gateway, wait_for
from gateway.launch import free_port, group_members, wait_healthy

pytestmark = pytest.mark.e2e  # starts a real vLLM process

CLIENT_KEY = "sk-e2e-client-key-5f2c"
DECOY = "decoy-cloud-secret-81ab"


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    port = free_port()
    cfg = tmp_path_factory.mktemp("secrets") / "gw.toml"
    cfg.write_text(f"""
[gateway]
port = {port}
api_keys_env = "E2E_GATEWAY_KEYS"
[[backends]]
name = "emu"
model = "{MODEL}"
mode = "emulate"
profile = "{BUNDLED_PROFILE}"
max_model_len = 2048
env = {{ EMUGATE_LATE_WARN_MS = "50" }}
""")
    proc, log = start_gateway("gateway-secrets", cfg, env={"E2E_GATEWAY_KEYS": CLIENT_KEY, "DECOY_SECRET": DECOY})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=300, path="/ready")
        yield url, proc, log
    finally:
        proc.stop(grace_s=30)


def _socket(log: Path) -> str:
    m = re.search(r"started emu/0 \(pid \d+, unix:(\S+), mode emulate\)", log.read_text())
    assert m, "the replica was not started on a Unix socket"
    return m.group(1)


def test_replica_processes_hold_neither_client_keys_nor_other_secrets(gw):
    url, proc, log = gw
    auth = {"authorization": f"Bearer {CLIENT_KEY}"}
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2},
                   headers=auth, timeout=60)
    assert r.status_code == 200
    assert httpx.post(url + "/v1/completions", json={"model": MODEL}, headers={
        "authorization": "Bearer sk-wrong-guess"}).status_code == 401
    pid = int(re.search(r"started emu/0 \(pid (\d+)", log.read_text()).group(1))
    members = group_members({pid})
    assert len(members) >= 2  # vLLM's API server and its engine core
    for p in members:
        env = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
        names = {e.split(b"=", 1)[0] for e in env if e}
        blob = b"\0".join(env)
        assert CLIENT_KEY.encode() not in blob and DECOY.encode() not in blob, p
        assert b"E2E_GATEWAY_KEYS" not in names and b"DECOY_SECRET" not in names
        if p == pid:  # vLLM's API server: its own key, and its backend's env from the config
            assert b"VLLM_API_KEY" in names and b"EMUGATE_LATE_WARN_MS" in names
    text = log.read_text()
    assert CLIENT_KEY not in text and "sk-wrong-guess" not in text


def test_replica_listens_on_a_private_unix_socket_and_still_wants_its_own_key(gw):
    url, _, log = gw
    sock = _socket(log)
    d = os.path.dirname(sock)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700 and stat.S_ISSOCK(os.stat(sock).st_mode)
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), base_url="http://replica") as c:
        assert c.get("/health").status_code == 200
        r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 401  # vLLM's own middleware: the per-start key is missing
    # the lateness file lives in the same private directory, readable by its owner only
    wait_for(lambda: any(f.startswith("lateness-") for f in os.listdir(d)), 30, what="the lateness file")
    f = next(os.path.join(d, f) for f in os.listdir(d) if f.startswith("lateness-"))
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert httpx.get(url + "/metrics", headers={"authorization": f"Bearer {CLIENT_KEY}"}).status_code == 200
