"""A fleet beyond one host, on one machine: network namespaces stand in for hosts (e2e, slow).

Hosts A and B (namespaces) each run one emulated H100 replica with ``emugate emulate``; host C runs
the gateway, fronting A and B by URL with their key; a Locust master and two workers (this
namespace) drive it over a bridge, and replica B is killed mid-run. Skipped, with the reason, where
network namespaces cannot be created (not root, no iproute2, or a sandbox that forbids them).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from conftest import LOG_DIR, ROOT
from gateway.launch import ServerProcess, free_port, wait_healthy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

NET = "10.77.{}.{}"
KEY = "replica-key-multihost"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def hosts():
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("network namespaces need root and iproute2 (ip); this host has "
                    f"{'no ip command' if not shutil.which('ip') else 'no root'}")
    tag = f"{os.getpid() % 250}"
    br, names = f"br-emu{tag}", {h: f"emu{tag}-{h}" for h in "abc"}
    addr = {"root": NET.format(tag, 1), "a": NET.format(tag, 2), "b": NET.format(tag, 3), "c": NET.format(tag, 4)}
    made: list[tuple[str, ...]] = []
    try:
        _ip("link", "add", br, "type", "bridge")
        made.append(("link", "del", br))
        _ip("addr", "add", f"{addr['root']}/24", "dev", br)
        _ip("link", "set", br, "up")
        for h, ns in names.items():
            _ip("netns", "add", ns)
            made.append(("netns", "del", ns))
            _ip("link", "add", f"v{tag}{h}", "type", "veth", "peer", "name", f"v{tag}{h}in")
            made.append(("link", "del", f"v{tag}{h}"))
            _ip("link", "set", f"v{tag}{h}in", "netns", ns)
            _ip("link", "set", f"v{tag}{h}", "master", br)
            _ip("link", "set", f"v{tag}{h}", "up")
            _ip("netns", "exec", ns, "ip", "addr", "add", f"{addr[h]}/24", "dev", f"v{tag}{h}in")
            _ip("netns", "exec", ns, "ip", "link", "set", f"v{tag}{h}in", "up")
            _ip("netns", "exec", ns, "ip", "link", "set", "lo", "up")
    except subprocess.CalledProcessError as e:
        for cmd in reversed(made):
            subprocess.run(["ip", *cmd], capture_output=True)
        pytest.skip(f"cannot create network namespaces here: {' '.join(e.cmd)}: {e.stderr.strip()}")
    try:
        yield names, addr
    finally:
        for cmd in reversed(made):
            subprocess.run(["ip", *cmd], capture_output=True)


def _in_ns(ns: str, name: str, argv: list[str], env: dict | None = None) -> ServerProcess:
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    p = ServerProcess(name, ["ip", "netns", "exec", ns, *argv],
                      {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, log=open(os.devnull, "w"),
                      log_file=LOG_DIR / f"{name}.log")
    p.start()
    return p


def test_gateway_fronts_replicas_on_other_hosts_and_survives_losing_one(hosts, tmp_path):
    names, addr = hosts
    emulate = [sys.executable, "-m", "emugate.cli", "emulate", "--port", "8000", "--max-model-len", "4096"]
    env = {"EMUGATE_PROFILE": "h100-sxm_llama-3.1-8b", "EMUGATE_MODEL": "llama-3.1-8b", "VLLM_API_KEY": KEY}
    a = _in_ns(names["a"], "host-a", [*emulate, "--host", addr["a"]], env)
    b = _in_ns(names["b"], "host-b", [*emulate, "--host", addr["b"]], env)
    cfg = tmp_path / "fleet.toml"
    cfg.write_text(f"""[gateway]
host = "{addr['c']}"
port = 8000
[[backends]]
name = "remote"
model = "llama-3.1-8b"
urls = ["http://{addr['a']}:8000", "http://{addr['b']}:8000"]
api_key_env = "REPLICA_KEY"
""")
    gw = _in_ns(names["c"], "host-c-gateway", [sys.executable, "-m", "gateway", "--config", str(cfg)],
                {"REPLICA_KEY": KEY})
    url = f"http://{addr['c']}:8000"
    procs = [a, b, gw]
    locusts: list[subprocess.Popen] = []
    try:
        wait_healthy(url, gw, timeout_s=120, path="/health")
        t0 = time.monotonic()
        while time.monotonic() - t0 < 600:
            r = httpx.get(url + "/ready", timeout=5).json()
            if r["models"]["llama-3.1-8b"]["ready"] == 2:
                break
            time.sleep(1)
        assert r["models"]["llama-3.1-8b"]["ready"] == 2, r
        assert httpx.get(f"http://{addr['a']}:8000/ready", timeout=5).status_code == 200  # emulate's readiness probe
        out = tmp_path / "merged.json"
        base = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "-H", url,
                "--model", "llama-3.1-8b", "--num-prompts", "120", "--request-rate", "4", "--ignore-eos",
                "--seed", "5", "--only-summary", "--plan-workers", "2"]
        mport = str(free_port())
        master = subprocess.Popen([*base, "--headless", "--master", "--expect-workers", "2", "--master-bind-port",
                                   mport, "--result-json", str(out)], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        workers = [subprocess.Popen([*base, "--worker", "--master-port", mport], cwd=tmp_path,
                                    stdout=open(LOG_DIR / f"multihost-worker{i}.log", "w"), stderr=subprocess.STDOUT)
                   for i in range(2)]
        locusts += [master, *workers]
        time.sleep(20)  # ~10 s into the load (the workers wait for the model first)
        b.kill()  # host B goes away mid-run
        t_kill = time.monotonic()
        _, err = master.communicate(timeout=300)
        for w in workers:
            try:
                w.wait(timeout=60)
            except subprocess.TimeoutExpired:
                w.kill()
        # Locust exits 1 when any request failed: the streams cut by the kill (checked below) do
        assert master.returncode in (0, 1) and out.exists(), err[-3000:]
        doc = json.loads(out.read_text())
        (LOG_DIR / "multihost-result.json").write_text(json.dumps(
            {k: doc[k] for k in ("completed", "failed", "workers", "errors", "mean_ttft_ms", "p99_ttft_ms",
                                 "mean_tpot_ms", "p99_tpot_ms", "output_throughput")}, indent=1))
        assert doc["workers"] == 2 and doc["completed"] + doc["failed"] == 120
        errors = [e for e in doc["errors"] if e]
        # only requests on B when it died fail, each with the gateway's stream error
        assert len(errors) <= 12, errors
        assert all("replica remote/1" in e or "BadGateway" in e or "incomplete" in e for e in errors), errors
        ready = httpx.get(url + "/ready", timeout=5).json()["models"]["llama-3.1-8b"]
        assert ready["ready"] == 1 and "remote/1" in ready.get("not_ready", {}), ready
        assert time.monotonic() - t_kill > 5  # the run went on after the kill
    finally:
        for lp in locusts:  # never leave a Locust master bound to its port for the next run
            if lp.poll() is None:
                lp.kill()
        for p in procs:
            p.stop(grace_s=15)
