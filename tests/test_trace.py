"""Request traces (loadtests/trace.py) and the gateway's own recording (gateway/recorder.py): formats,
bad input, windows, token-exact prompts with exactly the shared prefixes the trace describes, and a
recording that holds no text and no token id."""
from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

from gateway.recorder import TraceRecorder, tokenize_request, usage_from_response
from loadtests.trace import (PromptBuilder, Trace, TraceError, TraceRequest, fit_max_model_len, read_trace,
                             shared_prefix, to_mooncake, window)

POOL = np.arange(1000, 1000 + 8192)


def _write(tmp_path, name, lines):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


def test_mooncake_trace_reads_and_windows(tmp_path):
    p = _write(tmp_path, "t.jsonl", [json.dumps({"timestamp": t, "input_length": 600, "output_length": 10,
                                                 "hash_ids": ids}) for t, ids in
                                     ((0, [0, 1]), (1000, [0, 2]), (2500, [3, 4]), (4000, [0, 1]))])
    t = read_trace(p)
    assert len(t) == 4 and t.block_size == 512 and t.requests[1].timestamp_s == 1.0
    assert t.ideal_hit_rate() == pytest.approx(3 / 8)  # ids 0 (x2 again) and 1 seen before
    w = window(t, start_s=1.0, duration_s=2.0, time_scale=0.5)
    assert [r.timestamp_s for r in w.requests] == [0.0, 0.75]
    assert [json.loads(x)["timestamp"] for x in to_mooncake(w)] == [0, 750]
    with pytest.raises(TraceError, match="no request"):
        window(t, start_s=100)
    with pytest.raises(TraceError, match="time scale"):
        window(t, time_scale=0)


@pytest.mark.parametrize("lines, needle", [
    (['{"timestamp": 0, "input_length": 5, "output_length": 1}', "{not json"], ":2: not a JSON object"),
    (['{"timestamp": 5, "input_length": 5, "output_length": 1}',
      '{"timestamp": 1, "input_length": 5, "output_length": 1}'], ":2: timestamps go backwards"),
    (['{"timestamp": 0, "output_length": 1}'], ":1: missing input_length"),
    (['{"timestamp": 0, "input_length": 0, "output_length": 1}'], "input_length must be >= 1"),
    (['{"timestamp": 0, "input_length": "x", "output_length": 1}'], "must be numbers"),
    (["", "   "], "empty"),
])
def test_bad_traces_fail_before_any_load_with_the_line(tmp_path, lines, needle):
    with pytest.raises(TraceError, match=needle.replace("(", r"\(")):
        read_trace(_write(tmp_path, "bad.jsonl", lines))


def test_azure_csv_and_emugate_recordings_read(tmp_path):
    p = _write(tmp_path, "azure.csv", ["TIMESTAMP,ContextTokens,GeneratedTokens",
                                       "2023-11-16 18:15:46.6805900,374,44", "2023-11-16 18:15:50.9951690,396,109"])
    t = read_trace(p)
    assert [r.input_length for r in t.requests] == [374, 396] and t.requests[1].timestamp_s == pytest.approx(4.3146,
                                                                                                          abs=1e-3)
    with pytest.raises(TraceError, match="columns"):
        read_trace(_write(tmp_path, "x.csv", ["a,b", "1,2"]))
    p = _write(tmp_path, "rec.jsonl", [json.dumps({"format": "emugate-trace", "version": 1, "block_size": 64}),
                                       json.dumps({"timestamp": 3, "input_length": 70, "output_length": 5,
                                                   "hash_ids": [0, 1], "model": "m", "endpoint": "/v1/completions"})])
    t = read_trace(p)
    assert t.block_size == 64 and t.requests[0].model == "m" and t.requests[0].hash_ids == (0, 1)


def test_recorded_trace_in_completion_order_is_read_by_arrival(tmp_path):
    # the gateway writes a request when it ends: a long request that arrived first comes last
    lines = [{"timestamp": 900, "input_length": 10, "output_length": 2}, {"timestamp": 100, "input_length": 20,
             "output_length": 2}, {"timestamp": 500, "input_length": 30, "output_length": 2}]
    p = _write(tmp_path, "rec.jsonl", [json.dumps({"format": "emugate-trace", "version": 1, "block_size": 64})]
               + [json.dumps(d) for d in lines])
    assert [r.input_length for r in read_trace(p).requests] == [20, 30, 10]
    # a Mooncake file out of order is still an error
    with pytest.raises(TraceError, match=":2: timestamps go backwards"):
        read_trace(_write(tmp_path, "mc.jsonl", [json.dumps(d) for d in lines]))


def test_requests_sharing_k_hash_ids_share_exactly_k_blocks_of_tokens():
    b = PromptBuilder(POOL, block_size=512, seed=7)
    a = TraceRequest(0, 2000, 5, (10, 11, 12, 13))
    c = TraceRequest(0, 1800, 5, (10, 11, 20, 21))   # shares 2 blocks with a
    d = TraceRequest(0, 700, 5, (30, 31))            # shares none
    e = TraceRequest(0, 2000, 5, (10, 11, 12, 13))   # all of a
    pa, pc, pd, pe = (b.prompt(r, i) for i, r in enumerate((a, c, d, e)))
    assert [len(x) for x in (pa, pc, pd, pe)] == [2000, 1800, 700, 2000]  # exactly input_length tokens
    assert shared_prefix(pa, pc) == 2 * 512 and shared_prefix(pa, pd) == 0 and pa == pe
    # deterministic for the seed; another seed gives other tokens
    assert PromptBuilder(POOL, 512, seed=7).prompt(a) == pa and PromptBuilder(POOL, 512, seed=8).prompt(a) != pa
    # without hash ids each request gets its own tokens
    f, g = TraceRequest(0, 300, 1), TraceRequest(0, 300, 1)
    assert shared_prefix(b.prompt(f, 0), b.prompt(g, 1)) < 2


def test_fitting_to_max_model_len_counts_every_clipped_request():
    t = Trace([TraceRequest(0, 3000, 200, (1, 2, 3, 4, 5, 6)), TraceRequest(1, 500, 10, (1,))], block_size=512)
    got = fit_max_model_len(t, max_model_len=2048)
    assert got.over_max_model_len == 1 and got.requests[0].input_length + got.requests[0].output_length == 2048
    assert got.requests[0].hash_ids == (1, 2, 3, 4) and got.requests[1] == t.requests[1]
    half = fit_max_model_len(t, None, scale_inputs=0.5)
    assert [r.input_length for r in half.requests] == [1500, 250] and half.over_max_model_len == 0


def test_a_recording_holds_no_text_and_no_token_ids(tmp_path):
    rec = TraceRecorder(tmp_path / "rec.jsonl", block_size=16, max_bytes=1 << 20)
    secret = "the launch code is 0451"
    toks = list(range(5000, 5040))

    async def go():
        await rec.record(arrival_unix_s=rec._t0 + 1.5, model="m", endpoint="/v1/chat/completions",
                         body={"messages": [{"role": "user", "content": secret}], "max_tokens": 8, "stream": True},
                         status=200, usage={"prompt_tokens": 40, "completion_tokens": 8}, tokens=toks)
        await rec.record(arrival_unix_s=rec._t0 + 2.0, model="m", endpoint="/v1/completions",
                         body={"prompt": toks[:20] + [1, 2, 3], "max_tokens": 4}, status=200,
                         usage={"prompt_tokens": 23, "completion_tokens": 4}, tokens=toks[:20] + [1, 2, 3])
    asyncio.run(go())
    text = (tmp_path / "rec.jsonl").read_text()
    assert secret not in text and "5000" not in text and "5039" not in text
    t = read_trace(tmp_path / "rec.jsonl")
    r1, r2 = t.requests
    assert t.block_size == 16 and (r1.input_length, r1.output_length) == (40, 8) and r1.timestamp_s == 1.5
    assert len(r1.hash_ids) == 3 and r1.hash_ids[0] == r2.hash_ids[0] and r1.hash_ids[1] != r2.hash_ids[1]
    # another recorder (another key) gives unrelated digests but the same first-seen numbering
    other = TraceRecorder(tmp_path / "other.jsonl", block_size=16)
    assert other.hash_ids(toks) == [0, 1, 2] and other._key != rec._key


def test_recording_rotates_by_size(tmp_path):
    rec = TraceRecorder(tmp_path / "r.jsonl", block_size=16, max_bytes=4096, keep=2)

    async def go():
        for i in range(60):
            await rec.record(arrival_unix_s=rec._t0 + i, model="m", endpoint="/v1/completions",
                             body={"prompt": "x"}, status=200, usage={"prompt_tokens": 3, "completion_tokens": 1},
                             tokens=[1, 2, 3])
    asyncio.run(go())
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["r.jsonl", "r.jsonl.1", "r.jsonl.2"]
    assert all(p.stat().st_size <= 4096 for p in tmp_path.iterdir())
    assert all(json.loads(p.read_text().split("\n", 1)[0])["format"] == "emugate-trace" for p in tmp_path.iterdir())


def test_usage_and_tokenize_requests_are_read_from_what_the_gateway_saw():
    sse = [b'data: {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 3}}\n\n', b"data: [DONE]\n\n"]
    assert usage_from_response(None, sse) == {"prompt_tokens": 9, "completion_tokens": 3}
    assert usage_from_response(b'{"usage": {"prompt_tokens": 2}}', None) == {"prompt_tokens": 2}
    assert usage_from_response(b"not json", None) is None
    assert tokenize_request("/v1/chat/completions", "m", {"messages": [{"role": "user", "content": "hi"}]})[
        "add_generation_prompt"] is True
    assert tokenize_request("/v1/completions", "m", {"prompt": "hi"}) == {"model": "m", "prompt": "hi"}
    assert tokenize_request("/v1/completions", "m", {"prompt": [1, 2]}) is None
