"""Model families in emulate mode: the KV-cache specs the emulated executor reports against the
ones vLLM's own layers report for the same config, the KV pool's size in blocks, and an MLA model
served end to end.

The configs are tiny (2-4 layers, hidden 256) versions of the real architectures' config.json, with
the bundled Llama-3 tokenizer; vLLM builds them on the meta device (no weights), so the comparison
is with vLLM's own code path for that architecture on this host.
"""
from __future__ import annotations

import json

import httpx
import numpy as np
import pytest

from conftest import start_gateway, status_of, vllm_server, wait_for
from gateway.launch import free_port
from emugate.tiny_models import CONFIGS, write_tiny_model

pytestmark = pytest.mark.e2e  # builds vLLM configs and models in-process, and starts a vLLM server

@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: write_tiny_model(name, root) for name in CONFIGS}


def _config(model_dir, max_model_len: int = 512, **kw):
    from vllm.engine.arg_utils import EngineArgs
    return EngineArgs(model=str(model_dir), load_format="dummy", max_model_len=max_model_len,
                      **kw).create_engine_config()


def _key(s) -> tuple:
    return (type(s).__name__, s.block_size, getattr(s, "num_kv_heads", None), getattr(s, "head_size", None),
            str(getattr(s, "dtype", None)), getattr(s, "sliding_window", None),
            getattr(s, "attention_chunk_size", None), s.page_size_bytes)


def _chat_and_stream(url: str, model: str, prompt: str) -> int:
    """An 8-token chat (asserted served in full), then a 5-token streamed completion of ``prompt``
    with logprobs and usage; returns the tokens streamed, counted by the per-token logprob rows of
    the chunks (vLLM merges deltas into one chunk when its API server lags the engine, so chunks are
    not tokens), after asserting the stream ended with ``[DONE]`` and its usage chunk agrees."""
    r = httpx.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 8, "ignore_eos": True,
                                                       "messages": [{"role": "user", "content": "hi"}]}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 8, r.text
    with httpx.stream("POST", url + "/v1/completions", json={
            "model": model, "prompt": prompt, "max_tokens": 5, "ignore_eos": True, "stream": True, "logprobs": 0,
            "stream_options": {"include_usage": True}}, timeout=60) as s:
        events = [ln.removeprefix("data: ") for ln in s.iter_lines() if ln.startswith("data: ")]
    assert events and events[-1] == "[DONE]", events
    docs = [json.loads(e) for e in events[:-1]]
    streamed = sum(len(d["choices"][0]["logprobs"]["tokens"]) for d in docs if d.get("choices"))
    usage = [d["usage"] for d in docs if d.get("usage") and not d.get("choices")]
    assert usage and usage[-1]["completion_tokens"] == streamed, (usage, streamed)
    return streamed


def _cache_config_info(url: str) -> str:
    """The server's ``vllm:cache_config_info`` line from ``/metrics``."""
    return next(ln for ln in httpx.get(url + "/metrics").text.splitlines() if ln.startswith("vllm:cache_config_info"))


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "gpt-oss", "llama4"])
def test_config_built_specs_equal_vllms_own_layers(model_dirs, family):
    """Plain-attention families (dense, MoE, sliding window with sinks, Llama 4's chunked local
    attention): the specs built from the config equal what vLLM's own layers report, layer by layer
    (kind, block, heads, dtype, window or chunk, page)."""
    from emu_executor.executor import build_kv_cache_spec, specs_from_vllm_layers
    cfg = _config(model_dirs[family])
    ours, vllms = build_kv_cache_spec(cfg), specs_from_vllm_layers(cfg)
    assert len(ours) == len(vllms) == CONFIGS[family]["num_hidden_layers"]
    assert [_key(s) for s in ours.values()] == [_key(s) for s in vllms.values()]
    if family == "gpt-oss":
        assert [type(s).__name__ for s in ours.values()] == ["SlidingWindowSpec", "FullAttentionSpec"] * 2
    if family == "llama4":
        assert [type(s).__name__ for s in ours.values()] == ["ChunkedLocalAttentionSpec"] * 3 + ["FullAttentionSpec"]


def test_mla_specs_are_vllms_latent_cache(model_dirs):
    """MLA (DeepSeek-V3): one latent 'head' of kv_lora_rank + qk_rope_head_dim per token, as vLLM's
    MLAAttention layer reports it; the same at TP2 (the latent is not sharded)."""
    from emu_executor.executor import build_kv_cache_spec
    c = CONFIGS["deepseek-v3"]
    cfg = _config(model_dirs["deepseek-v3"])
    specs = build_kv_cache_spec(cfg)
    assert len(specs) == c["num_hidden_layers"]
    head = c["kv_lora_rank"] + c["qk_rope_head_dim"]
    for s in specs.values():
        assert type(s).__name__ == "MLAAttentionSpec" and s.num_kv_heads == 1 and s.head_size == head
        assert s.page_size_bytes == cfg.cache_config.block_size * head * 2  # bf16, no separate V


def test_kv_pool_holds_exactly_the_profiles_blocks_for_uniform_and_hybrid_groups(model_dirs):
    """vLLM's own allocator (get_kv_cache_configs) turns the bytes the emulated executor reports into
    exactly the blocks asked for: for a uniform model and for gpt-oss, whose sliding and full layers
    are separate groups in the hybrid allocator (one block there costs the largest group's pages)."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout
    from vllm.v1.core.kv_cache_utils import get_kv_cache_configs

    from emu_executor.executor import EmulatedExecutor, build_kv_cache_spec, pool_bytes_per_block
    layouts = [EmulatedExecutor._rpc_get_supported_kv_cache_layouts(None)]  # one worker's list
    for family in ("llama", "gpt-oss", "deepseek-v3"):
        cfg = _config(model_dirs[family])
        specs = build_kv_cache_spec(cfg)
        resolve_kv_cache_layout(cfg, layouts, list(specs.values()))  # as EngineCore does before sizing
        per_block = pool_bytes_per_block(cfg, specs)
        total_page = sum(s.page_size_bytes for s in specs.values())
        if family == "gpt-oss":
            assert per_block == total_page // 2, (per_block, total_page)
        else:
            assert per_block == total_page
        kvc = get_kv_cache_configs(cfg, [specs], [777 * per_block])[0]
        assert kvc.num_blocks == 777, (family, kvc.num_blocks)


def test_hybrid_models_get_vllms_state_specs_with_the_gpus_block_alignment(model_dirs):
    """Qwen3-Next (gated delta net + attention): the specs are vLLM's own layers' (MambaSpec state beside
    FullAttentionSpec), after the attention block is aligned as vLLM does on a GPU: the smallest
    multiple of FlashAttention's 16 whose attention page holds the state page, the state page padded
    to it, so every layer's page is the same and vLLM's allocator takes them as one pool."""
    import torch  # here, not at module level: collecting the unit tier should not import torch (2 s)
    from vllm.utils.math_utils import cdiv

    from emu_executor.executor import build_kv_cache_spec
    cfg = _config(model_dirs["qwen3-next"], block_size=16)
    specs = build_kv_cache_spec(cfg)
    kinds = [type(s).__name__ for s in specs.values()]
    assert kinds.count("MambaSpec") == 3 and kinds.count("FullAttentionSpec") == 1, kinds
    attn = next(s for s in specs.values() if type(s).__name__ == "FullAttentionSpec")
    mamba = next(s for s in specs.values() if type(s).__name__ == "MambaSpec")
    per_token = attn.page_size_bytes // attn.block_size
    raw_state = sum(int(np.prod(sh)) * torch.tensor([], dtype=dt).element_size()
                    for sh, dt in zip(mamba.shapes, mamba.dtypes))
    assert attn.block_size == 16 * cdiv(raw_state, 16 * per_token)  # GPU alignment, not vLLM-CPU's
    assert len({s.page_size_bytes for s in specs.values()}) == 1
    assert cfg.cache_config.block_size == attn.block_size


def test_hybrid_models_above_tp1_are_refused_with_their_name_and_what_is_missing(model_dirs):
    from emu_executor.executor import build_kv_cache_spec
    cfg = _config(model_dirs["qwen3-next"])
    cfg.parallel_config.tensor_parallel_size = 2
    with pytest.raises(NotImplementedError, match=r"Qwen3NextForCausalLM.*tensor parallel 2.*MambaSpec.*TP1"):
        build_kv_cache_spec(cfg)


def test_a_hybrid_model_is_served_with_its_state_pool(model_dirs):
    """Qwen3-Next in emulate mode: chat and streaming, the 100 blocks asked for, the attention block
    size aligned as on a GPU, and the SSM state dtype the GPU would keep (vLLM-CPU would force float32)."""
    d = model_dirs["qwen3-next"]
    with vllm_server("emulated-hybrid", ["--max-model-len", "1024", "--num-gpu-blocks-override", "100"],
                     profile=None, step_ms=2.0, model=str(d)) as (url, _, log):
        assert _chat_and_stream(url, str(d), "x " * 100) == 5
        info = _cache_config_info(url)
        assert 'num_gpu_blocks="100"' in info and 'mamba_ssm_cache_dtype="auto"' in info, info
        text = log.read_text()
        assert "hybrid model: attention block size 16 ->" in text and "as vLLM aligns them on a GPU" in text


def test_an_mla_model_is_served_with_chunked_prefill_and_prefix_caching_as_on_a_gpu(model_dirs):
    """A DeepSeek-V3-shaped model in emulate mode: vLLM's CPU platform would switch chunked prefill
    and prefix caching off for MLA; the emulated engine keeps them (a GPU does), serves chat and
    streams, and its KV pool is the 65 blocks asked for."""
    d = model_dirs["deepseek-v3"]
    args = ["--max-model-len", "1024", "--num-gpu-blocks-override", "65", "--enable-prefix-caching"]
    with vllm_server("emulated-mla", args, profile=None, step_ms=2.0, model=str(d)) as (url, _, log):
        assert _chat_and_stream(url, str(d), "x " * 300) == 5
        info = _cache_config_info(url)
        assert 'num_gpu_blocks="65"' in info and 'enable_prefix_caching="True"' in info, info
        text = log.read_text()
        assert "enable_chunked_prefill=True, enable_prefix_caching=True (MLA, as on a GPU)" in text


def test_encoder_only_pooling_models_keep_no_kv_cache(model_dirs):
    """BERT-like embedding models: vLLM's encoder-only attention layers report no KV spec; nor do we."""
    from emu_executor.executor import build_kv_cache_spec
    assert build_kv_cache_spec(_config(model_dirs["bert"], runner="pooling")) == {}
    specs = build_kv_cache_spec(_config(model_dirs["qwen3-embedding"], runner="pooling"))
    assert len(specs) == 2 and all(type(s).__name__ == "FullAttentionSpec" for s in specs.values())


@pytest.mark.parametrize("family", ["qwen3-embedding", "bert"])
def test_embeddings_from_an_emulated_pooling_model(model_dirs, family):
    """/v1/embeddings from an emulated embedding model (a decoder converted with --runner pooling, and
    an encoder-only BERT): vectors of the model's hidden size, unit norm, the same for the same text
    and different for another, base64 the same floats, ``dimensions`` truncates, ``usage`` counts the
    prompt's tokens."""
    import base64

    import numpy as np
    d = model_dirs[family]
    args = ["--max-model-len", "512", "--runner", "pooling"]
    with vllm_server(f"emulated-embed-{family}", args, profile=None, step_ms=1.0, model=str(d)) as (url, _, _log):
        def embed(inp, **kw):
            r = httpx.post(url + "/v1/embeddings", json={"model": str(d), "input": inp, **kw}, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()
        a = embed(["the cat sat", "another text", "the cat sat"])
        vecs = [np.array(x["embedding"]) for x in a["data"]]
        assert [len(v) for v in vecs] == [CONFIGS[family]["hidden_size"]] * 3
        assert all(abs(np.linalg.norm(v) - 1) < 1e-5 for v in vecs)
        assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
        tok = httpx.post(url + "/tokenize", json={"model": str(d), "prompt": "the cat sat"}, timeout=30).json()
        single = embed("the cat sat")
        assert single["usage"]["prompt_tokens"] == tok["count"] and np.allclose(single["data"][0]["embedding"], vecs[0])
        b64 = embed("the cat sat", encoding_format="base64")["data"][0]["embedding"]
        assert np.allclose(np.frombuffer(base64.b64decode(b64), dtype=np.float32), vecs[0], atol=1e-6)


def _metric(text: str, name: str) -> dict[str, float]:
    """{label string: value} of one metric family in a /metrics exposition."""
    out = {}
    for ln in text.splitlines():
        if ln.startswith(name + "{") or ln.startswith(name + " "):
            key, _, val = ln.rpartition(" ")
            out[key[len(name):]] = float(val)
    return out


def test_speculative_decoding_emits_accepted_runs_and_vllms_spec_metrics_move(model_dirs):
    """n-gram speculation (k = 3) with acceptance 0.8/0.6/0.5 per position: vLLM's own scheduler
    counts drafts and accepted tokens from what the emulated runner returns; the measured rates match
    the configured ones within sampling error, and streamed chunks carry several tokens."""
    d = model_dirs["llama"]
    spec = json.dumps({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4,
                       "prompt_lookup_min": 2})
    args = ["--max-model-len", "1024", "--speculative-config", spec]
    with vllm_server("emulated-spec", args, profile=None, step_ms=2.0, model=str(d),
                     env={"EMUGATE_SPEC_ACCEPTANCE": "0.8,0.6,0.5"}) as (url, _, log):
        for i in range(6):
            r = httpx.post(url + "/v1/completions", json={"model": str(d), "prompt": f"request {i}", "max_tokens": 96,
                                                          "ignore_eos": True}, timeout=60)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 96, r.text
        with httpx.stream("POST", url + "/v1/completions", json={"model": str(d), "prompt": "stream", "max_tokens": 60,
                                                                 "ignore_eos": True, "stream": True}, timeout=60) as s:
            chunks = [json.loads(ln[6:]) for ln in s.iter_lines() if ln.startswith("data: ") and ln != "data: [DONE]"]
        text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["text"]]
        assert len(text_chunks) < 45, len(text_chunks)  # 60 tokens in fewer chunks: several tokens per chunk
        m = httpx.get(url + "/metrics").text
        drafts = sum(_metric(m, "vllm:spec_decode_num_drafts_total").values())
        draft_toks = sum(_metric(m, "vllm:spec_decode_num_draft_tokens_total").values())
        accepted = sum(_metric(m, "vllm:spec_decode_num_accepted_tokens_total").values())
        per_pos = _metric(m, "vllm:spec_decode_num_accepted_tokens_per_pos_total")
        assert drafts > 100 and draft_toks == 3 * drafts, (drafts, draft_toks)
        expected = 0.8 + 0.8 * 0.6 + 0.8 * 0.6 * 0.5  # mean accepted per draft: 1.52
        assert abs(accepted / drafts - expected) < 0.25, (accepted, drafts)
        pos = [v for _, v in sorted(per_pos.items(), key=lambda kv: kv[0])]
        assert len(pos) == 3 and abs(pos[0] / drafts - 0.8) < 0.1 and abs(pos[1] / pos[0] - 0.6) < 0.15, pos
        assert "speculative decoding emulated: method ngram, k=3" in log.read_text()


def test_lora_adapters_max_loras_batching_runtime_loading_and_unknown_names(model_dirs, tmp_path):
    """Four adapters (adapter_config.json only, no weights) with max_loras = 2: requests over all four
    are served, vLLM's scheduler never runs more than two adapters in a step (its
    vllm:lora_requests_info gauge), and swaps them over time; runtime loading validates the adapter
    with vLLM's own checks and answers as vLLM does; an unknown adapter gets vLLM's own 404 body."""
    import concurrent.futures as cf
    d = model_dirs["llama"]
    adapters = {}
    for name, rank in (("a0", 8), ("a1", 8), ("a2", 16), ("a3", 8), ("too-big", 64)):
        ad = tmp_path / name
        ad.mkdir()
        (ad / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
            "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": "llama"}))
        adapters[name] = ad
    mods = [f"{n}={adapters[n]}" for n in ("a0", "a1", "a2", "a3")]
    args = ["--max-model-len", "1024", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
            "--lora-modules", *mods]
    with vllm_server("emulated-lora", args, profile=None, step_ms=4.0, model=str(d),
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}) as (url, _, _log):
        ids = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
        assert {"a0", "a1", "a2", "a3"} <= ids
        running_seen: list[set[str]] = []
        stop = False

        def scrape():
            while not stop:
                for ln in httpx.get(url + "/metrics").text.splitlines():
                    if ln.startswith("vllm:lora_requests_info{"):
                        lab = ln.split('running_lora_adapters="', 1)[1].split('"', 1)[0]
                        running_seen.append({a for a in lab.split(",") if a})

        def one(i):
            return httpx.post(url + "/v1/completions", json={"model": f"a{i % 4}", "prompt": f"p{i}", "max_tokens": 48,
                                                             "ignore_eos": True}, timeout=120)
        with cf.ThreadPoolExecutor(17) as ex:
            watcher = ex.submit(scrape)
            rs = list(ex.map(one, range(16)))
            stop = True
            watcher.result()
        assert all(r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 48 for r in rs)
        assert running_seen and max(len(s) for s in running_seen) <= 2, running_seen
        assert len(set().union(*running_seen)) >= 3  # adapters swapped in and out over the run
        r = httpx.post(url + "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text
        assert "nope" in r.json()["error"]["message"]
        # vLLM 0.32's own answers when its worker refuses an adapter (serving_models.load_lora_adapter):
        # not found -> 404 NotFoundError; fails vLLM's checks -> 500 with the check's message
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "too-big",
                                                             "lora_path": str(adapters["too-big"])})
        assert r.status_code == 500 and "LoRA rank 64 is greater than max_lora_rank 16" in r.text, r.text
        r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "gone", "lora_path": str(tmp_path / "gone")})
        assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError", r.text
        assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "a3"}).status_code == 200
        r = httpx.post(url + "/v1/completions", json={"model": "a3", "prompt": "x", "max_tokens": 2})
        assert r.status_code == 404, r.text

        # through the gateway: adapters listed, routed by name (--lora-modules from the config, and one
        # loaded at runtime, learnt from the replica's /v1/models), an unknown name gets the gateway's 404
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late",
                                                               "lora_path": str(adapters["a0"])}).status_code == 200
        gport = free_port()
        cfg = tmp_path / "gw.toml"
        cfg.write_text(f"""
[gateway]
port = {gport}
[[backends]]
name = "lora"
model = "{d}"
mode = "real"
ports = [{url.rsplit(":", 1)[1]}]
extra_args = ["--enable-lora", "--lora-modules", "a0={adapters['a0']}", "a1={adapters['a1']}"]
""")
        gw, _glog = start_gateway("gateway-lora", cfg, "--no-launch")
        gurl = f"http://127.0.0.1:{gport}"
        try:
            wait_for(lambda: status_of(gurl + "/ready") == 200, 60, what="the gateway to see the LoRA server")
            for name in ("a1", "a2"):  # a2 is not in the gateway's config: unknown until /v1/models lists it
                r = httpx.post(gurl + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
                assert r.status_code == (200 if name == "a1" else 404), r.text
            listed = {m["id"]: m.get("parent") for m in httpx.get(gurl + "/v1/models").json()["data"]}
            assert listed.get("a2") == str(d) and listed.get("late") == str(d), listed
            for name in ("a2", "late"):
                r = httpx.post(gurl + "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2})
                assert r.status_code == 200 and r.json()["model"] == name, r.text
            r = httpx.post(gurl + "/v1/completions", json={"model": "nope", "prompt": "x", "max_tokens": 2})
            assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"
        finally:
            gw.stop(grace_s=10)


@pytest.mark.parametrize("family", ["llama", "qwen3-moe", "gpt-oss", "deepseek-v3", "llama4"])
def test_synth_kv_block_bytes_are_vllms_own_pool_divisor(model_dirs, family):
    """``profile synth`` sizes a GPU's KV pool in blocks of ``ModelDims.kv_block_bytes``: for dense,
    MoE, sliding+full (hybrid groups) and MLA configs that is the divisor vLLM's allocator uses for
    the same config on its own code path (``pool_bytes_per_block`` over the layers vLLM reports)."""
    from vllm.v1.attention.backends.utils import resolve_kv_cache_layout

    from emu_executor.executor import EmulatedExecutor, build_kv_cache_spec, pool_bytes_per_block
    from profiles.synth import ModelDims
    cfg = _config(model_dirs[family])
    specs = build_kv_cache_spec(cfg)
    resolve_kv_cache_layout(cfg, [EmulatedExecutor._rpc_get_supported_kv_cache_layouts(None)], list(specs.values()))
    dims = ModelDims.from_config(model_dirs[family])
    assert dims.kv_block_bytes(1, cfg.cache_config.block_size) == pool_bytes_per_block(cfg, specs)


@pytest.mark.parametrize("model,profile", [("qwen3-30b-a3b", "h100-sxm_qwen3-30b-a3b"),
                                           ("deepseek-r1", "h200_deepseek-r1_tp8")])
def test_bundled_moe_and_mla_models_serve_with_their_profiles_kv_pool(model, profile):
    """The bundled MoE (Qwen3-30B-A3B on an H100) and MLA + block-FP8 MoE (DeepSeek-R1 on 8 x H200)
    models start in emulate mode on this CPU host (DeepSeek's FP8 layers have no CPU kernel here: the
    KV specs come from the layers built unquantized), answer chat with their own tokenizer's chat
    template, and hold exactly the KV blocks their synthesized profile says the GPU pool has."""
    from profiles.assets import resolve_profile
    from profiles.format import Profile
    blocks = Profile.load(resolve_profile(profile)).fingerprint["num_kv_blocks"]
    with vllm_server(f"bundled-{model}", ["--max-model-len", "4096"], profile=profile, model=model) as (url, _, log):
        r = httpx.post(url + "/v1/chat/completions", json={"model": model, "max_tokens": 6, "ignore_eos": True,
                                                           "messages": [{"role": "user", "content": "hello"}]},
                       timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6, r.text
        # the chat template of the model's own tokenizer: Qwen's <|im_start|> turns or DeepSeek's <｜User｜>
        tok = httpx.post(url + "/tokenize", json={"model": model, "messages": [{"role": "user", "content": "hello"}],
                                                  "add_generation_prompt": True}, timeout=30).json()
        assert tok["count"] == r.json()["usage"]["prompt_tokens"] and tok["count"] >= 3
        info = _cache_config_info(url)
        assert f'num_gpu_blocks="{blocks}"' in info, info
        assert "ESTIMATE" in log.read_text()
