"""Profile fingerprints: what engine configuration a profile was recorded under.

``make_fingerprint`` is called by the ProfilingExecutor in real mode;
``compare_fingerprint`` by the EmulatedExecutor at start-up, which logs each
difference (emulate mode still runs: a user may deliberately emulate a
different max_model_len, say, but should know that latencies came from
another configuration).
"""
from __future__ import annotations

from typing import Any

#: Keys compared between a profile and the emulated engine.
COMPARED = ("model_dims", "dtype", "tensor_parallel_size", "block_size", "max_num_batched_tokens",
            "max_num_seqs", "enable_chunked_prefill", "async_scheduling")


def model_dims(model_config, parallel_config) -> dict[str, Any]:
    """The model dimensions that decide step latency and KV size."""
    hf = model_config.hf_text_config
    return {
        "architecture": (getattr(model_config.hf_config, "architectures", None) or ["?"])[0],
        "num_layers": model_config.get_num_layers(parallel_config),
        "hidden_size": getattr(hf, "hidden_size", None),
        "intermediate_size": getattr(hf, "intermediate_size", None),
        "num_attention_heads": getattr(hf, "num_attention_heads", None),
        "num_kv_heads": model_config.get_total_num_kv_heads(),
        "head_dim": model_config.get_head_size(),
        "vocab_size": model_config.get_vocab_size(),
    }


def engine_fingerprint(vllm_config) -> dict[str, Any]:
    """The configuration part of a fingerprint, read from a VllmConfig."""
    mc, pc, sc, cc = (vllm_config.model_config, vllm_config.parallel_config,
                      vllm_config.scheduler_config, vllm_config.cache_config)
    return {
        "model": str(mc.served_model_name if isinstance(mc.served_model_name, str) else mc.model),
        "model_dims": model_dims(mc, pc),
        "dtype": str(mc.dtype).removeprefix("torch."),
        "tensor_parallel_size": pc.tensor_parallel_size,
        "block_size": cc.block_size,
        "max_num_batched_tokens": sc.max_num_batched_tokens,
        "max_num_seqs": sc.max_num_seqs,
        "max_model_len": mc.max_model_len,
        "enable_chunked_prefill": bool(sc.enable_chunked_prefill),
        "enable_prefix_caching": bool(cc.enable_prefix_caching),
        "async_scheduling": bool(sc.async_scheduling),
    }


def compare_fingerprint(fp: dict[str, Any], vllm_config) -> list[str]:
    """Human-readable differences between a profile fingerprint and an engine config."""
    now = engine_fingerprint(vllm_config)
    out = []
    for k in COMPARED:
        if k in fp and fp[k] != now.get(k):
            out.append(f"{k}: profile {fp[k]!r}, engine {now.get(k)!r}")
    return out
