"""loadtests: exactness against vLLM's own benchmark code, SSE timing, and a headless Locust run."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import MODEL, ROOT, vllm_server
from loadtests.arrivals import arrival_times
from loadtests.metrics import RequestResult, calculate_metrics
from loadtests.sse import ConnectionPool, build_payload, stream_request


# ------------------------------------------------------------- SSE timing
class _TickHandler(BaseHTTPRequestHandler):
    """A stream whose events carry the virtual time ("vt", s) at which a GPU server would send them."""

    protocol_version = "HTTP/1.1"
    ttft_s = 0.15
    gap_s = 0.020
    n_tokens = 25

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(b: bytes):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b))
            self.wfile.flush()

        for i in range(self.n_tokens):
            ev = {"vt": self.ttft_s + i * self.gap_s,
                  "choices": [{"index": 0, "delta": {"content": f" t{i}"}, "finish_reason": None}]}
            chunk(b"data: " + json.dumps(ev).encode() + b"\n\n")
        chunk(b"data: " + json.dumps({"choices": [], "usage": {"completion_tokens": self.n_tokens,
                                                                "prompt_tokens": 7}}).encode() + b"\n\n")
        chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")


def test_sse_measurement_times_each_event_as_it_is_parsed(monkeypatch):
    """TTFT, ITL and E2EL come from the clock read when each event is parsed. The clock here is the
    events' own virtual send time (set as the parser hands each one over), so the measurement is
    checked exactly, with no dependence on this host's timing."""
    from loadtests import sse

    clock = {"now": 0.0}

    class ClockedParser(sse.SSEParser):
        def add(self, data):
            for m in super().add(data):
                if m.startswith("data: {") and '"vt"' in m:
                    clock["now"] = json.loads(m[6:])["vt"]
                yield m

    monkeypatch.setattr(sse, "SSEParser", ClockedParser)
    monkeypatch.setattr(sse, "time", type("VirtualTime", (), {"perf_counter": staticmethod(lambda: clock["now"]),
                                                              "monotonic": staticmethod(lambda: clock["now"])}))
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _TickHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        pool = ConnectionPool(f"http://127.0.0.1:{srv.server_address[1]}")
        res = []
        for _ in range(3):
            clock["now"] = 0.0  # each request is sent at virtual time 0
            res.append(stream_request(pool, "/v1/chat/completions", build_payload("chat", "m", "p", 25, True), 3,
                                      True))
    finally:
        srv.shutdown()
    for r in res:
        assert r.success and r.output_tokens == 25 and r.prompt_len == 7
        assert r.ttft == pytest.approx(0.150, abs=1e-9)
        assert len(r.itl) == 24 and all(x == pytest.approx(0.020, abs=1e-9) for x in r.itl)
        assert r.latency == pytest.approx(0.150 + 24 * 0.020, abs=1e-9)
        assert r.generated_text == "".join(f" t{i}" for i in range(25))
    m = calculate_metrics(res, 1.0, [99])
    assert m["mean_itl_ms"] == pytest.approx(20, abs=1e-6) and m["mean_tpot_ms"] == pytest.approx(20, abs=1e-6)
    assert m["mean_ttft_ms"] == pytest.approx(150, abs=1e-6)


# ----------------------------------------------- exactness vs vLLM's code
@pytest.mark.e2e  # compares against vLLM's own functions, in-process (a ~5 s import)
def test_arrival_schedule_matches_vllm_get_request(monkeypatch):
    from vllm.benchmarks import serve as vserve
    slept: list[float] = []
    fake_now = [1000.0]

    async def fake_sleep(s):
        slept.append(s)
        fake_now[0] += s

    monkeypatch.setattr(vserve.asyncio, "sleep", fake_sleep)
    monkeypatch.setattr(vserve.time, "time", lambda: fake_now[0])
    for rate, burst, ramp in ((4.0, 1.0, None), (10.0, 0.25, None), (2.0, 1.0, "linear")):
        np.random.seed(7)
        slept.clear()
        fake_now[0] = 1000.0
        kw = dict(ramp_up_strategy=ramp, ramp_up_start_rps=1 if ramp else None, ramp_up_end_rps=5 if ramp else None)

        async def drain(rate=rate, burst=burst, kw=kw):
            return [x async for x in vserve.get_request(list(range(50)), rate, burst, **kw)]

        asyncio.run(drain())
        theirs = np.cumsum(slept)
        ours = arrival_times(50, rate, burst, seed=7, ramp_up=ramp, ramp_start_rps=kw["ramp_up_start_rps"],
                             ramp_end_rps=kw["ramp_up_end_rps"])
        # vLLM sleeps from the first request's time; request 0 may be at t>0 (no sleep if <= 0)
        ours_nz = np.array([t for t in ours if t > 0])
        assert np.allclose(ours_nz, theirs[-len(ours_nz):], rtol=1e-9, atol=1e-9)


@pytest.mark.e2e  # compares against vLLM's own functions, in-process (a ~5 s import)
def test_sharegpt_sampling_matches_vllm(tmp_path):
    from vllm.benchmarks.datasets.datasets import ShareGPTDataset
    from loadtests.dataset import get_tokenizer, repaired_sharegpt_path, sample_sharegpt
    from profiles.assets import resolve_model_dir
    tok = get_tokenizer(str(resolve_model_dir(MODEL)))
    path = repaired_sharegpt_path()
    ours = sample_sharegpt(tok, 40, seed=3, dataset_path=path)
    theirs = ShareGPTDataset(dataset_path=str(path), random_seed=3).sample(tok, 40)
    assert [(s.prompt, s.prompt_len, s.expected_output_len) for s in ours] == \
           [(s.prompt, s.prompt_len, s.expected_output_len) for s in theirs]


def test_repaired_dataset_reports_recovered_entries():
    from loadtests.dataset import load_sharegpt_entries, packaged_sharegpt_path
    entries, truncated = load_sharegpt_entries(packaged_sharegpt_path())
    assert truncated and 17000 < len(entries) < 18000


@pytest.mark.e2e  # compares against vLLM's own functions, in-process (a ~5 s import)
def test_metrics_match_vllm_calculate_metrics():
    from vllm.benchmarks.datasets.datasets import SampleRequest
    from vllm.benchmarks.lib.endpoint_request_func import RequestFuncOutput
    from vllm.benchmarks.serve import calculate_metrics as vllm_calc
    rng = np.random.default_rng(0)
    ours, theirs, reqs = [], [], []
    for i in range(60):
        ok = i % 13 != 5
        n = int(rng.integers(1, 80))
        itl = list(rng.gamma(2.0, 0.01, n - 1))
        ttft = float(rng.uniform(0.02, 0.9))
        st = float(i * 0.1)
        r = RequestResult(prompt_len=int(rng.integers(4, 900)), output_tokens=n, success=ok, ttft=ttft, itl=itl,
                          latency=ttft + sum(itl), start_time=st)
        ours.append(r)
        theirs.append(RequestFuncOutput(success=ok, latency=r.latency, output_tokens=n, ttft=ttft, itl=itl,
                                        prompt_len=r.prompt_len, start_time=st))
        reqs.append(SampleRequest(prompt="x", prompt_len=r.prompt_len, expected_output_len=n))
    goodput = {"ttft": 500.0, "tpot": 25.0}
    m = calculate_metrics(ours, 12.5, [50, 90, 99], goodput)
    vm, _ = vllm_calc(reqs, theirs, 12.5, None, [50, 90, 99], goodput)
    for key in ("completed", "total_input", "total_output", "request_throughput", "request_goodput",
                "output_throughput", "mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "mean_e2el_ms",
                "max_output_tokens_per_s", "max_concurrent_requests"):
        ours_key = {"total_input": "total_input_tokens", "total_output": "total_output_tokens"}.get(key, key)
        assert m[ours_key] == pytest.approx(getattr(vm, key), rel=1e-12), key
    for (p, v) in vm.percentiles_itl_ms:
        assert m[f"p{int(p)}_itl_ms"] == pytest.approx(v, rel=1e-12)


# --------------------------------------------------- headless Locust run
@pytest.fixture(scope="module")
def emu20():
    with vllm_server("emulated-20ms", ["--max-model-len", "4096"], step_ms=20.0, profile=None) as (url, _, _):
        yield url


@pytest.mark.e2e
def test_headless_locust_writes_vllm_format_json_and_png(emu20, tmp_path):
    out = tmp_path / "r.json"
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless",
           "-H", emu20, "--num-prompts", "24", "--request-rate", "6", "--ignore-eos", "--seed", "1",
           "--goodput", "ttft:1000", "tpot:30", "--result-json", str(out), "--only-summary"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(out.read_text())
    vllm_keys = {"date", "backend", "model_id", "tokenizer_id", "num_prompts", "request_rate", "burstiness",
                 "max_concurrency", "duration", "completed", "failed", "total_input_tokens", "total_output_tokens",
                 "request_throughput", "request_goodput", "output_throughput", "total_token_throughput",
                 "input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors",
                 "mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_itl_ms",
                 "mean_e2el_ms", "max_output_tokens_per_s", "max_concurrent_requests"}
    assert vllm_keys <= set(doc), vllm_keys - set(doc)
    assert doc["completed"] == 24 and doc["failed"] == 0
    assert doc["total_output_tokens"] == sum(doc["output_lens"]) > 0
    assert 19.0 < doc["median_itl_ms"] < 23.0  # a flat 20 ms emulated step
    assert doc["request_goodput"] is not None
    assert (tmp_path / "r.png").stat().st_size > 10_000
    assert "TTFT" in p.stdout + p.stderr and "E2EL" in p.stdout + p.stderr
    cmp_ = subprocess.run([sys.executable, "-m", "loadtests.compare", str(out), str(out)], cwd=ROOT,
                          capture_output=True, text=True)
    assert cmp_.returncode == 0 and "+0.00%" in cmp_.stdout and "Mean TTFT (ms)" in cmp_.stdout


@pytest.mark.e2e
def test_distributed_locust_writes_one_result_equal_per_request_to_a_single_run(emu20, tmp_path):
    """Master + 2 workers (Locust's own distributed mode) write ONE result: the union of the workers'
    raw records, equal request for request to a single driver running the same plan."""
    from gateway.launch import free_port
    base = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "-H", emu20,
            "--num-prompts", "30", "--request-rate", "8", "--ignore-eos", "--seed", "3", "--only-summary"]
    single = tmp_path / "single.json"
    p = subprocess.run([*base, "--headless", "--result-json", str(single)], cwd=tmp_path, capture_output=True,
                       text=True, timeout=400)
    assert p.returncode == 0, p.stderr[-3000:]
    merged = tmp_path / "merged.json"
    port = free_port()
    master = subprocess.Popen([*base, "--headless", "--master", "--expect-workers", "2", "--master-bind-port",
                               str(port), "--plan-workers", "2", "--result-json", str(merged)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = [subprocess.Popen([*base, "--worker", "--master-port", str(port), "--plan-workers", "2"],
                                cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        _, err = master.communicate(timeout=400)
    finally:
        if master.poll() is None:  # never leave a master bound to its port
            master.kill()
        for w in workers:
            w.wait(timeout=60) if w.poll() is None and master.returncode is not None else None
            if w.poll() is None:
                w.kill()
    assert master.returncode == 0, err[-3000:]
    assert not list(tmp_path.glob("merged.json.worker*"))  # one result, no per-worker files
    a, b = json.loads(single.read_text()), json.loads(merged.read_text())
    assert b["workers"] == 2 and b["completed"] == a["completed"] == 30 and b["failed"] == 0
    assert b["input_lens"] == a["input_lens"] and b["output_lens"] == a["output_lens"]
    assert [len(x) for x in b["itls"]] == [len(x) for x in a["itls"]]
    assert b["total_output_tokens"] == a["total_output_tokens"]
    from loadtests.metrics import RequestResult, calculate_metrics
    rs = [RequestResult(prompt_len=i, output_tokens=o, success=True, ttft=t, itl=itl, latency=lat, start_time=st)
          for i, o, t, itl, lat, st in zip(b["input_lens"], b["output_lens"], b["ttfts"], b["itls"], b["latencies"],
                                             b["start_times"])]
    again = calculate_metrics(rs, b["duration"], [50, 90, 99])
    for k in ("p50_ttft_ms", "p99_ttft_ms", "p90_itl_ms", "mean_tpot_ms", "p99_e2el_ms"):
        assert b[k] == pytest.approx(again[k], rel=1e-12), k  # the merge's percentiles are the union's own
        assert b[k] == pytest.approx(a[k], rel=0.25, abs=5.0), k  # and a single run's, up to timing noise


# ------------------------------------------- waiting for the endpoint's model
class _ModelsHandler(BaseHTTPRequestHandler):
    """``GET /v1/models``: 503, then an empty list, then the model (as the gateway while a backend loads)."""

    protocol_version = "HTTP/1.1"
    script: list[tuple[int, list]] = []
    calls = 0

    def log_message(self, *a):
        pass

    def do_GET(self):
        cls = type(self)
        status, data = cls.script[min(cls.calls, len(cls.script) - 1)]
        cls.calls += 1
        body = json.dumps({"object": "list", "data": data} if status == 200 else
                          {"error": {"message": "x", "type": "t", "code": status}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def models_server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _ModelsHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    _ModelsHandler.calls = 0
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_wait_for_model_polls_until_the_model_is_listed(models_server):
    from loadtests.endpoint import wait_for_model
    m = {"id": "llama", "object": "model", "root": "/m"}
    _ModelsHandler.script = [(503, []), (200, []), (200, [{"id": "other"}]), (200, [{"id": "other"}, m])]
    data = wait_for_model(models_server, "llama", {}, timeout_s=30, poll_s=0.05)
    assert _ModelsHandler.calls == 4 and m in data
    _ModelsHandler.calls = 0
    assert wait_for_model(models_server, None, {}, timeout_s=30, poll_s=0.05)[0]["id"] == "other"
    assert _ModelsHandler.calls == 3  # any model will do when none is named


def test_wait_for_model_gives_up_with_what_to_do(models_server):
    from loadtests.endpoint import EndpointNotReady, wait_for_model
    _ModelsHandler.script = [(200, [])]
    with pytest.raises(EndpointNotReady, match="ready-check-timeout-sec"):
        wait_for_model(models_server, None, {}, timeout_s=0.3, poll_s=0.05)
    assert _ModelsHandler.calls >= 2
    _ModelsHandler.script, _ModelsHandler.calls = [(401, [])], 0
    with pytest.raises(EndpointNotReady, match="--api-key"):  # a wrong key is not waited out
        wait_for_model(models_server, None, {}, timeout_s=30, poll_s=0.05)
    assert _ModelsHandler.calls == 1


def test_locust_run_against_a_dead_endpoint_exits_1_instead_of_hanging(tmp_path):
    import socket
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtests" / "sharegpt.py"), "--headless",
           "-H", f"http://127.0.0.1:{port}", "--num-prompts", "3", "--ready-check-timeout-sec", "1",
           "--only-summary"]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr[-2000:]
    assert "did not list a model within 1 s" in p.stderr and "Connection refused" in p.stderr
