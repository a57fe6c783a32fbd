"""Emulating GPUs on this CPU host (e2e): the bundled synthesized H100 profiles served by
real vLLM processes in emulate mode. No GPU is used or needed: the profiles are
estimates made offline (aiconfigurator-core), and these tests check that vLLM's
engine takes the profile's KV capacity and scheduler settings, that prompts count the
real Llama-3 tokens, that a 70B TP4 deployment runs as one emulated engine, and that
step lateness is exported."""
from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from profiles.format import Profile
from tests.conftest import vllm_server

pytestmark = pytest.mark.e2e


def _metrics(url: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text)}


def _num_gpu_blocks(url: str) -> int:
    fam = _metrics(url)["vllm:cache_config_info"]
    return int(fam.samples[0].labels["num_gpu_blocks"])


@pytest.fixture(scope="module")
def h100():
    with vllm_server("gpu-h100-8b", ["--max-model-len", "32768"], profile="h100-sxm_llama-3.1-8b",
                     model="llama-3.1-8b") as (url, _, log):
        yield url, log


@pytest.fixture(scope="module")
def h100_tp4():
    with vllm_server("gpu-h100-70b-tp4", ["--max-model-len", "8192", "--tensor-parallel-size", "4"],
                     profile="h100-sxm_llama-3.1-70b_tp4", model="llama-3.1-70b") as (url, _, log):
        yield url, log


def test_h100_engine_takes_the_profiles_kv_pool_and_scheduler(h100):
    url, log = h100
    fp = Profile.load("h100-sxm_llama-3.1-8b").fingerprint
    assert _num_gpu_blocks(url) == fp["num_kv_blocks"]
    text = log.read_text()
    assert "max_num_batched_tokens=8192" in text and "max_num_seqs=1024" in text and "async_scheduling=True" in text
    assert "ESTIMATE" in text  # the start-up log says the latencies are synthesized


def test_h100_chat_counts_real_llama_tokens_and_streams(h100):
    url, _ = h100
    from transformers import AutoTokenizer

    from profiles.assets import resolve_model_dir
    tok = AutoTokenizer.from_pretrained(str(resolve_model_dir("llama-3.1-8b")))
    msgs = [{"role": "user", "content": "Explain KV-cache paging in two sentences, please."}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    expected = len(tok.encode(text, add_special_tokens=False))
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   json={"model": "llama-3.1-8b", "messages": msgs, "max_tokens": 64, "ignore_eos": True,
                         "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    import json
    usage = json.loads(events[-2])["usage"]
    assert usage["prompt_tokens"] == expected and usage["completion_tokens"] == 64
    fams = _metrics(url)
    late = fams["emugate:step_lateness_seconds"]
    count = next(s.value for s in late.samples if s.name.endswith("_count"))
    assert count >= 64  # one observation per step that produced a token


def test_70b_tp4_serves_streamed_chat_with_tp4_kv_pool(h100_tp4):
    url, log = h100_tp4
    fp = Profile.load("h100-sxm_llama-3.1-70b_tp4").fingerprint
    assert _num_gpu_blocks(url) == fp["num_kv_blocks"]
    assert "tensor_parallel_size: profile" not in log.read_text()  # fingerprint TP matches the engine's
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60,
                      json={"model": "llama-3.1-70b", "messages": [{"role": "user", "content": "Hi"}],
                            "max_tokens": 16, "ignore_eos": True, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200
        chunks = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
    # vLLM may merge deltas when its API server lags, so count tokens by usage, not chunks
    assert chunks[-1]["usage"]["completion_tokens"] == 16
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) >= 2
