"""Every fault kind through a real gateway and two emulated H100 replicas (e2e tier).

Each test asserts what the client sees (status, headers, stream shape, timing bounds) and what the
engine shows (deltas of the replicas' own ``vllm:*`` metrics, read through the gateway's /metrics).
"""
from __future__ import annotations

import json
import re
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import start_gateway, wait_for
from gateway.launch import free_port, wait_healthy

pytestmark = pytest.mark.e2e

MODEL = "llama-3.1-8b"
ADMIN = {"Authorization": "Bearer admin-key"}
STARTUP_S = 6.0


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    port = free_port()
    cfg = tmp_path_factory.mktemp("faults") / "fleet.toml"
    cfg.write_text(f"""
[gateway]
port = {port}
admin_keys = ["admin-key"]
idle_timeout_s = 15
[[backends]]
name = "llama"
model = "{MODEL}"
profile = "h100-sxm_llama-3.1-8b"
replicas = 2
max_model_len = 8192
[backends.faults]
allow_header = true
[backends.faults.cold_start]
startup_s = {STARTUP_S}
""")
    proc, log = start_gateway("faults-gateway", cfg)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, timeout_s=600, path="/ready")
        wait_for(lambda: all(s == "ready" for s in httpx.get(url + "/health").json()["models"][MODEL]), 300,
                 what="both replicas ready")
        yield url, log
    finally:
        proc.stop(grace_s=40)


def metric(url: str, name: str, replica: str | None = None, **labels) -> float:
    """Sum of a vLLM metric's samples (optionally one replica's) in the gateway's merged /metrics."""
    total = 0.0
    for fam in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for s in fam.samples:
            if s.name == name and (replica is None or s.labels.get("replica") == replica) \
                    and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def chat(content="hi", max_tokens=32, stream=True, ignore_eos=True):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "stream": stream, "ignore_eos": ignore_eos}


def stream_times(url: str, body: dict, headers: dict | None = None, timeout: float = 120):
    """(status, [(arrival s, event bytes)]) of a streamed request."""
    out = []
    t0 = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers or {}, timeout=timeout) as r:
        status = r.status_code
        buf = b""
        for chunk in r.iter_raw():
            buf += chunk
            while b"\n\n" in buf:
                ev, buf = buf.split(b"\n\n", 1)
                out.append((time.monotonic() - t0, ev))
    return status, out


def admin(url: str, method: str, **kw) -> httpx.Response:
    return httpx.request(method, url + "/admin/faults", headers=ADMIN, timeout=30, **kw)


def test_cold_start_is_inside_vllms_engine_start(gw):
    url, log = gw
    text = log.read_text()
    assert text.count(f"cold start: loading weights takes {STARTUP_S:.1f} s") >= 2
    took = [float(x) for x in re.findall(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+)",
                                         text)]
    assert len(took) >= 2 and all(t >= STARTUP_S for t in took), took


@pytest.mark.parametrize("status", [429, 500, 503, 400])
def test_front_door_faults_answer_as_vllm_without_touching_the_engine(gw, status):
    url, _ = gw
    before = metric(url, "vllm:request_success_total")
    prompts = metric(url, "vllm:prompt_tokens_total")
    r = httpx.post(url + "/v1/chat/completions", json=chat(stream=False),
                   headers={"X-Emugate-Fault": f"http={status}" + (";retry_after=3" if status == 429 else "")},
                   timeout=30)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["code"] == status and err["type"] and err["message"]
    if status == 429:
        assert r.headers["retry-after"] == "3"
    if status == 400:
        assert err["param"] == "input_tokens" and "maximum context length is 8192" in err["message"]
    assert metric(url, "vllm:request_success_total") == before
    assert metric(url, "vllm:prompt_tokens_total") == prompts
    ok = httpx.post(url + "/v1/chat/completions", json=chat(stream=False), timeout=60)
    assert ok.status_code == 200  # the fleet keeps serving; the header was not forwarded to vLLM either


@pytest.mark.parametrize("action", ["cut", "cut_done", "reset"])
def test_stream_cut_and_reset_abort_the_request_in_the_engine(gw, action):
    url, _ = gw
    body = chat(max_tokens=3000)  # ~25 s of decoding on an H100 if it were not aborted
    aborted_before = metric(url, "vllm:request_success_total")
    hdr = {"X-Emugate-Fault": f"stream={action};after=3"}
    if action == "reset":
        with pytest.raises(httpx.HTTPError):
            stream_times(url, body, hdr)
    else:
        status, events = stream_times(url, body, hdr)
        assert status == 200 and len(events) == 3 + (action == "cut_done")
        assert (events[-1][1] == b"data: [DONE]") == (action == "cut_done")
    # the gateway closed its connection to the replica: vLLM aborts the request at once
    wait_for(lambda: metric(url, "vllm:num_requests_running") == 0, 10, what="request aborted in the engine")
    assert metric(url, "vllm:request_success_total") == aborted_before  # it never completed


def test_stall_holds_the_stream_then_resumes(gw):
    url, _ = gw
    status, events = stream_times(url, chat(max_tokens=20), {"X-Emugate-Fault": "stream=stall;after=2;s=1.5"})
    assert status == 200 and events[-1][1] == b"data: [DONE]"
    gaps = [b[0] - a[0] for a, b in zip(events, events[1:])]
    assert gaps[1] >= 1.4 and max(gaps[2:]) < 1.0  # one stall, after the second chunk
    toks = [json.loads(e[6:]) for _, e in events if e.startswith(b"data: {")]
    assert sum(1 for t in toks if t["choices"] and t["choices"][0]["delta"].get("content") is not None) >= 19


def _mean_itl(url: str) -> tuple[float, float]:
    return metric(url, "vllm:inter_token_latency_seconds_sum"), metric(url, "vllm:inter_token_latency_seconds_count")


def test_slow_and_spikes_change_step_times_as_vllm_measures_them(gw):
    url, _ = gw
    _, base = stream_times(url, chat(max_tokens=60))
    base_tpot = (base[-2][0] - base[1][0]) / 58
    s0, c0 = _mean_itl(url)
    r = admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "slow", "factor": 5}})
    assert r.status_code == 200
    time.sleep(0.5)  # the fault loop (0.2 s) writes the file; replicas poll it every 50 ms
    _, slow = stream_times(url, chat(max_tokens=60))
    slow_tpot = (slow[-2][0] - slow[1][0]) / 58
    s1, c1 = _mean_itl(url)
    assert 3.5 < slow_tpot / base_tpot < 7, (base_tpot, slow_tpot)
    assert (s1 - s0) / (c1 - c0) > 3.5 * base_tpot  # vLLM's own ITL histogram moved with it
    assert 'kind="slow"' in httpx.get(url + "/metrics").text
    assert admin(url, "DELETE", params={"backend": "llama"}).json()["removed"] == 1
    admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "spikes", "factor": 20, "probability": 0.1}})
    time.sleep(0.5)
    _, spiky = stream_times(url, chat(max_tokens=120))
    admin(url, "DELETE", params={"backend": "llama"})
    gaps = sorted(b[0] - a[0] for a, b in zip(spiky[1:-2], spiky[2:-2]))
    assert gaps[-1] > 8 * gaps[len(gaps) // 2]  # some steps took ~20x the median


def test_kv_pressure_makes_vllm_preempt(gw):
    url, _ = gw
    pre = metric(url, "vllm:num_preemptions_total")
    # 1 % of a replica's ~446k-token pool is ~4.5k tokens; 6 requests of ~1.3k tokens each per replica
    admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "kv_pressure", "fraction": 0.01}})
    time.sleep(0.5)
    import concurrent.futures as cf
    # distinct from the first token, so the prefix cache cannot share their blocks
    prompts = [f"request {i}: " + "word " * 900 for i in range(12)]
    with cf.ThreadPoolExecutor(12) as ex:
        futs = [ex.submit(stream_times, url, chat(p, 400), None, 300) for p in prompts]
        time.sleep(2)
        usage = max(metric(url, "vllm:kv_cache_usage_perc", replica=r) for r in ("0", "1"))
        results = [f.result() for f in futs]
    admin(url, "DELETE", params={"backend": "llama"})
    # every stream completes: vLLM preempts and resumes, nothing fails
    assert all(st == 200 and ev[-1][1] == b"data: [DONE]" for st, ev in results), \
        [(st, ev[-2:]) for st, ev in results]
    assert usage > 0.95  # the ballast counts as used, as a smaller pool would be full
    assert metric(url, "vllm:num_preemptions_total") > pre


def test_hang_stalls_steps_health_stays_up_and_idle_timeout_catches_it(gw):
    url, _ = gw
    admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "hang", "duration_s": 20}})
    time.sleep(0.5)
    t0 = time.monotonic()
    status, events = stream_times(url, chat(max_tokens=50), timeout=60)
    waited = time.monotonic() - t0
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/ready").status_code == 200
    # the gateway's idle_timeout_s (15 s) ends the silent request with an error instead of waiting forever
    body = b"".join(e for _, e in events)
    assert 14.5 < waited < 20 and (status == 504 or b"GatewayTimeoutError" in body or b"error" in body), (status, body)
    wait_for(lambda: metric(url, "vllm:num_requests_running") == 0, 20, what="engine resumed after the hang")
    r = httpx.post(url + "/v1/chat/completions", json=chat(stream=False), timeout=60)
    assert r.status_code == 200


def test_crash_restarts_the_replica_once_and_the_fleet_keeps_serving(gw):
    url, log = gw
    r = admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "crash", "replicas": [1]}})
    assert r.status_code == 200
    wait_for(lambda: httpx.get(url + "/health").json()["models"][MODEL][1] != "ready", 30, what="replica 1 down")
    ok = [httpx.post(url + "/v1/chat/completions", json=chat(stream=False), timeout=60).status_code
          for _ in range(6)]
    assert ok == [200] * 6  # replica 0 serves meanwhile
    wait_for(lambda: httpx.get(url + "/health").json()["models"][MODEL][1] == "ready", 300,
             what="replica 1 restarted")
    time.sleep(2)
    assert httpx.get(url + "/health").json()["models"][MODEL][1] == "ready"  # the crash fired once
    assert "crash fault: engine-core process exits" in log.read_text()
    assert "crash fired on llama/1" in log.read_text()
    admin(url, "DELETE", params={"backend": "llama"})


def test_least_outstanding_steers_away_from_a_slow_replica(gw):
    url, _ = gw
    served0 = {r: metric(url, "vllm:request_success_total", replica=r) for r in ("0", "1")}
    admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "slow", "factor": 8, "replicas": [1]}})
    time.sleep(0.5)
    import concurrent.futures as cf
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(lambda _: httpx.post(url + "/v1/chat/completions", json=chat(max_tokens=40, stream=False),
                                         timeout=120), range(40)))
    admin(url, "DELETE", params={"backend": "llama"})
    d = {r: metric(url, "vllm:request_success_total", replica=r) - served0[r] for r in ("0", "1")}
    assert d["0"] + d["1"] == 40 and d["0"] > 1.5 * d["1"], d


def test_bad_admin_calls_and_disabled_header_are_4xx_and_the_fleet_keeps_serving(gw):
    url, _ = gw
    assert httpx.put(url + "/admin/faults", json={"backend": "llama", "engine": {"kind": "hang"}}).status_code == 401
    assert admin(url, "PUT", content=b"{oops").status_code == 400
    assert admin(url, "PUT", json={"backend": "llama", "engine": {"kind": "slow", "factor": 0.5}}).status_code == 400
    assert admin(url, "PUT", json={"backend": "nope", "http": {"status": 503}}).status_code == 404
    r = httpx.post(url + "/v1/chat/completions", json=chat(stream=False), headers={"X-Emugate-Fault": "http=418"},
                   timeout=30)
    assert r.status_code == 400 and "X-Emugate-Fault" in r.json()["error"]["message"]
    assert httpx.post(url + "/v1/chat/completions", json=chat(stream=False), timeout=60).status_code == 200
    assert not any(admin(url, "GET").json()["backends"]["llama"]["engine_now"].values())
