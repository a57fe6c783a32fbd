"""Model dimensions of the families ``profile synth`` covers (dense, MoE, MLA, sliding window):
parameter counts against the published ones, KV bytes per token and per pool block, and the MoE
feature of the latency oracle. Unit tier: config files and a bundled profile only, no vLLM, no AIC."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from profiles.assets import resolve_model_dir, resolve_profile
from profiles.format import Profile
from profiles.oracle import LINEAR_FEATURES, MOE_FEATURE, expected_experts, heldout_errors
from profiles.synth import ModelDims



@pytest.mark.parametrize("model,published", [
    ("qwen3-30b-a3b", 30.5e9),   # Qwen3 technical report / model card: 30.5B total, 3.3B activated
    ("gpt-oss-120b", 116.83e9),  # gpt-oss model card (arXiv 2508.10925): 116.83B total
    ("deepseek-r1", 671e9),      # DeepSeek-V3 technical report (arXiv 2412.19437): 671B total (no MTP layer)
    ("llama-3.1-8b", 8.03e9),
])
def test_parameter_counts_match_the_published_totals(model, published):
    d = ModelDims.from_config(resolve_model_dir(model))
    assert d.linear_params() + d.embedding_params() == pytest.approx(published, rel=0.01)


def test_moe_mla_and_sliding_dimensions_are_read_from_the_config():
    q = ModelDims.from_config(resolve_model_dir("qwen3-30b-a3b"))
    assert (q.num_experts, q.experts_per_token, q.moe_intermediate_size, q.is_mla) == (128, 8, 768, False)
    g = ModelDims.from_config(resolve_model_dir("gpt-oss-120b"))
    assert (g.num_experts, g.experts_per_token, g.expert_format) == (128, 4, "mxfp4")
    assert (g.num_sliding_layers, g.sliding_window, g.num_layers) == (18, 128, 36)
    r = ModelDims.from_config(resolve_model_dir("deepseek-r1"))
    assert (r.num_experts, r.num_dense_layers, r.weight_format, r.kv_lora_rank) == (256, 3, "fp8", 512)


def test_kv_bytes_follow_each_attention_kind():
    r = ModelDims.from_config(resolve_model_dir("deepseek-r1"))
    # MLA: one latent of kv_lora_rank + rope per token and layer, bf16, the same on every TP rank
    assert r.kv_bytes_per_token(1) == r.kv_bytes_per_token(8) == 61 * (512 + 64) * 2
    assert r.kv_block_bytes(8, 16) == 16 * 61 * 576 * 2
    g = ModelDims.from_config(resolve_model_dir("gpt-oss-120b"))
    page = 16 * 2 * 8 * 64 * 2  # one layer's block: K and V, 8 KV heads of 64, bf16
    # 18 sliding + 18 full layers: two groups in vLLM's hybrid allocator, a block holds 18 pages
    assert g.kv_block_bytes(1, 16) == 18 * page
    assert g.kv_block_bytes(2, 16) == 18 * page // 2
    q = ModelDims.from_config(resolve_model_dir("qwen3-30b-a3b"))
    assert q.kv_block_bytes(1, 16) == 16 * q.kv_bytes_per_token(1) == 16 * 2 * 48 * 4 * 128 * 2


def test_weight_bytes_follow_the_checkpoint_formats():
    r = ModelDims.from_config(resolve_model_dir("deepseek-r1"))
    # FP8 checkpoint: ~1 byte a parameter whatever --dtype says
    assert r.weight_bytes("bf16", 8) == r.weight_bytes("fp8", 8)
    assert r.weight_bytes("bf16", 1) == pytest.approx(r.linear_params() + 2 * r.embedding_params(), rel=0.01)
    g = ModelDims.from_config(resolve_model_dir("gpt-oss-120b"))
    # MXFP4 experts (4.25 bits a value): fits one 80 GB GPU with room for KV, as the gpt-oss model card
    # (arXiv 2508.10925) says; the same experts in bf16 would not fit at all
    assert g.weight_bytes("bf16", 1) < 0.9 * 80e9
    assert dataclasses.replace(g, expert_format="bf16").weight_bytes("bf16", 1) > 80e9


def test_hybrid_mamba_configs_are_refused_by_name(tmp_path):
    cfg = {"architectures": ["NemotronHForCausalLM"], "num_attention_heads": 8, "hidden_size": 256,
           "num_hidden_layers": 4, "intermediate_size": 512, "vocab_size": 1000, "mamba_d_state": 128,
           "layers_block_type": ["mamba", "attention", "mamba", "mlp"]}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="NemotronHForCausalLM.*Mamba|NemotronHForCausalLM.*mamba"):
        ModelDims.from_config(tmp_path)


def test_expected_experts_is_the_occupancy_of_uniform_top_k_routing():
    assert expected_experts(1, 128, 8) == pytest.approx(8)
    assert expected_experts(10_000, 128, 8) == pytest.approx(128)
    # Monte Carlo check of E x (1 - (1 - k/E)^n) at n = 16
    rng = np.random.default_rng(0)
    sims = [len({e for _ in range(16) for e in rng.choice(128, 8, replace=False)}) for _ in range(2000)]
    assert expected_experts(16, 128, 8) == pytest.approx(np.mean(sims), rel=0.01)


def test_the_moe_feature_fits_moe_decode_steps_the_linear_terms_cannot():
    """On the bundled Qwen3-30B-A3B profile, held-out decode steps: the expert-occupancy feature
    cuts the oracle's p90 error (the profile's own oracle uses it)."""
    p = Profile.load(resolve_profile("h100-sxm_qwen3-30b-a3b"))
    assert MOE_FEATURE in p.meta["oracle"]["features"] and p.meta["oracle"]["moe"] == [128, 8]
    without = heldout_errors(p, "feature", features=LINEAR_FEATURES)["decode-only"]["p90"]
    with_ = heldout_errors(p, "feature")["decode-only"]["p90"]
    assert with_ < 10.0 and with_ < without / 2, (with_, without)
