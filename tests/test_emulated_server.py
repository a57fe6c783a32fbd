"""Emulate mode end to end: a real vLLM OpenAI server process with the EmulatedExecutor.

Each test runs against two servers in turn: the bundled CPU profile (sync
scheduling) and a GPU-like fingerprint (async scheduling, vLLM's batch
queue). Both have a deliberately small KV pool (64 blocks of 16 tokens = 1024
tokens) so that preemption can be forced.
"""
from __future__ import annotations

import concurrent.futures as cf
import json

import httpx
import numpy as np
import pytest

from conftest import BUNDLED_PROFILE, MODEL, post, sse_events, vllm_server
from profiles.format import Profile

KV_BLOCKS = 65  # one is vLLM's reserved null block: 64 x 16 = 1024 usable tokens

pytestmark = pytest.mark.e2e  # starts real vLLM processes


def gpu_like_profile(path) -> str:
    """The bundled steps under an H100-like fingerprint (async scheduling, block 16,
    8192/1024) and 5x faster: exercises vLLM's async batch-queue path, which the
    CPU profile (async scheduling off, as the CPU platform forces) does not."""
    prof = Profile.load(BUNDLED_PROFILE)
    steps = dict(prof.steps)
    steps["latency_us"] = np.maximum(steps["latency_us"] // 5, 1)
    fp = {**prof.fingerprint, "async_scheduling": True, "block_size": 16, "max_num_batched_tokens": 8192,
          "max_num_seqs": 1024, "num_kv_blocks": 65, "device_name": "NVIDIA H100 80GB HBM3 (synthetic)"}
    return str(Profile(fp, steps, prof.output_lengths, {"test": "gpu-like"}).save(path))


@pytest.fixture(scope="module", params=["cpu-profile", "gpu-like-profile"])
def server(request, tmp_path_factory):
    profile = BUNDLED_PROFILE if request.param == "cpu-profile" else \
        gpu_like_profile(tmp_path_factory.mktemp("prof") / "gpu-like.emuprof.zst")
    args = ["--max-model-len", "1024", "--num-gpu-blocks-override", str(KV_BLOCKS), "--dtype", "bfloat16"]
    if request.param == "cpu-profile":
        args += ["--block-size", "16"]  # small blocks so the 64-block pool is small (1024 tokens)
    with vllm_server(f"emulated-{request.param}", args, profile=profile) as (url, proc, log):
        yield url, log, Profile.load(profile).fingerprint


def test_models_lists_served_model(server):
    url, *_ = server
    data = httpx.get(url + "/v1/models").json()["data"]
    assert [m["id"] for m in data] == [MODEL]


def test_platform_applies_the_profiles_fingerprint(server):
    _, log, fp = server
    text = log.read_text()
    assert "emugate platform: scheduler configured as profiled" in text
    assert f"async_scheduling={fp['async_scheduling']}" in text
    if fp["async_scheduling"]:  # CPU platform alone would force it off and use 2048/128
        assert "max_num_batched_tokens=8192" in text and "max_num_seqs=1024" in text
    assert "emulated executor ready" in text
    assert "KV pool sized to" in text


@pytest.mark.parametrize("n", [1, 7, 40])
def test_completion_ignore_eos_exact_length(server, n):
    url, *_ = server
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "Once upon a time", "max_tokens": n,
                                      "ignore_eos": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["usage"]["completion_tokens"] == n
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["choices"][0]["text"].strip()


def test_chat_natural_end_is_stop_with_eos(server):
    url, *_ = server
    reasons, lengths = [], []
    for i in range(6):
        r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": f"q{i}"}],
                                               "max_tokens": 600, "seed": i})
        assert r.status_code == 200, r.text
        reasons.append(r.json()["choices"][0]["finish_reason"])
        lengths.append(r.json()["usage"]["completion_tokens"])
    # lengths are drawn from the profile's output-length distribution: they vary,
    # and a request that stops before max_tokens stops on EOS ("stop")
    assert len(set(lengths)) > 1
    assert all(reason == "stop" for reason, n in zip(reasons, lengths) if n < 600)


def test_min_tokens_and_max_tokens_bound_natural_length(server):
    url, *_ = server
    for seed in range(4):
        r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 30, "min_tokens": 12,
                                          "seed": seed})
        n = r.json()["usage"]["completion_tokens"]
        assert 12 <= n <= 30


def test_no_special_tokens_in_output(server):
    url, *_ = server
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hello", "max_tokens": 64, "ignore_eos": True,
                                      "return_token_ids": True, "skip_special_tokens": False})
    text = r.json()["choices"][0]["text"]
    assert "<s>" not in text and "</s>" not in text and "[INST]" not in text
    words = text.split()
    assert len(words) >= 20  # word-like pool tokens, not byte fragments


def test_stop_string_and_n(server):
    url, *_ = server
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 20, "n": 3,
                                      "ignore_eos": True})
    choices = r.json()["choices"]
    assert len(choices) == 3 and r.json()["usage"]["completion_tokens"] == 60
    first_word = choices[0]["text"].split()[1]
    seed_body = {"model": MODEL, "prompt": "hi", "max_tokens": 20, "ignore_eos": True, "seed": 5}
    base = post(url, "/v1/completions", seed_body).json()["choices"][0]["text"]
    again = post(url, "/v1/completions", seed_body).json()["choices"][0]["text"]
    assert base == again  # per-request seed -> same synthetic text
    stop_word = base.split()[3]
    stopped = post(url, "/v1/completions", {**seed_body, "stop": [stop_word]}).json()["choices"][0]
    assert stopped["finish_reason"] == "stop" and stop_word not in stopped["text"]
    assert first_word


def test_logprobs_and_top_logprobs(server):
    url, *_ = server
    r = post(url, "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                           "max_tokens": 5, "ignore_eos": True, "logprobs": True,
                                           "top_logprobs": 3})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == 5
    for tok in content:
        assert tok["logprob"] <= 0 and len(tok["top_logprobs"]) == 3
        assert tok["top_logprobs"][0]["logprob"] >= tok["top_logprobs"][-1]["logprob"]


def test_streaming_chat_streams_every_token_once(server):
    """Each token reaches the client in exactly one chunk. vLLM merges deltas when its
    API server lags the engine (``RequestOutputCollector.put`` in
    vllm/v1/engine/output_processor.py), as it can on a loaded host with GPU-speed
    steps, so a chunk may carry more than one token: tokens are counted by the
    per-token logprob rows each chunk carries, not by chunks."""
    url, *_ = server
    events = sse_events(url, "/v1/chat/completions", {
        "model": MODEL, "messages": [{"role": "user", "content": "stream"}], "max_tokens": 12,
        "ignore_eos": True, "stream": True, "logprobs": True, "stream_options": {"include_usage": True}})
    assert events[-1] == b"data: [DONE]"
    docs = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    content = [d for d in docs if d["choices"] and d["choices"][0]["delta"].get("content")]
    per_chunk = [len(d["choices"][0]["logprobs"]["content"]) for d in content]
    assert sum(per_chunk) == 12 and min(per_chunk) >= 1, per_chunk
    assert docs[-1]["usage"]["completion_tokens"] == 12
    assert [d for d in docs if d["choices"]][-1]["choices"][0]["finish_reason"] == "length"


def test_streaming_completions(server):
    """As the chat stream: every token once, counted by the logprob rows per chunk."""
    url, *_ = server
    events = sse_events(url, "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 6,
                                                 "ignore_eos": True, "stream": True, "logprobs": 1})
    choices = [json.loads(e[6:])["choices"][0] for e in events[:-1]]
    per_chunk = [len(c["logprobs"]["tokens"]) for c in choices if c["text"]]
    assert sum(per_chunk) == 6 and min(per_chunk) >= 1, per_chunk


def test_structured_output_json_schema(server):
    url, *_ = server
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"type": "string"}}},
              "required": ["name", "age", "tags"]}
    for seed in range(3):
        r = post(url, "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": "person"}], "max_tokens": 300, "seed": seed,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        doc = json.loads(choice["message"]["content"])
        assert isinstance(doc["name"], str) and isinstance(doc["age"], int) and isinstance(doc["tags"], list)


def test_bad_request_gets_openai_error_and_server_keeps_serving(server):
    url, *_ = server
    r = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3})
    assert r.status_code == 400
    assert "error" in r.json() and r.json()["error"]["message"]
    ok = post(url, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2, "ignore_eos": True})
    assert ok.json()["usage"]["completion_tokens"] == 2


def _preemptions(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("vllm:num_preemptions_total"))


def test_preemption_under_small_kv_pool(server):
    """6 x (300 prompt + 200 output) tokens exceed the 1024-token pool: vLLM must preempt,
    and every request still completes with exactly its tokens."""
    url, *_ = server
    before = _preemptions(url)
    prompt = " ".join(f"w{i}" for i in range(150))  # ~300 tokens

    def one(i):
        return post(url, "/v1/completions", {"model": MODEL, "prompt": f"{i} {prompt}", "max_tokens": 200,
                                             "ignore_eos": True}, timeout=300).json()

    with cf.ThreadPoolExecutor(6) as ex:
        results = list(ex.map(one, range(6)))
    assert all(r["usage"]["completion_tokens"] == 200 for r in results)
    assert _preemptions(url) > before
