"""Synthesized GPU profiles: step latencies from NVIDIA's AIConfigurator and a fitted step-time model.

A *synthesized* profile is an ordinary emugate profile (:mod:`profiles.format`)
whose step table was not recorded on the hardware but computed, step shape by
step shape, from ``aiconfigurator-core`` (PyPI, NVIDIA, Apache-2.0): its measured
kernel tables for vLLM on each GPU, split per step into GEMM, attention and
all-reduce sums (:class:`profiles.stepmodel.AicBreakdown`, ~5 us a call here),
then turned into a step time by the step-time model (:mod:`profiles.stepmodel`)
fitted on real vLLM measurements (``profiles/reference/``). The fingerprint says
so: ``source = "synthesized"``, the estimator and its data version, the AIC
system, model, dtype and TP; the metadata holds the model, its cross-validated
error band for configurations like this one and what of this configuration lies
outside the fit.

Everything a user sees of such a profile (``inspect``, the executor's start-up
log, ``synth``'s output) labels it an estimate with its error band.

``aiconfigurator_core`` is an optional dependency (``pip install -e ".[synth]"``):
it is imported only inside :class:`AicStepModel` and :mod:`profiles.stepmodel`,
so the rest of emugate never needs its ~600 MB of tables.

Step shapes covered (what vLLM 0.32 schedules on that GPU with chunked
prefill): decode-only batches up to ``max_num_seqs`` with mean contexts up to
``max_model_len`` (and never more KV than the pool holds); prefill chunks up to
``max_num_batched_tokens`` with and without a cached prefix; mixed steps of
decodes plus one prefill chunk filling the token budget. Batches are padded to
vLLM's CUDA-graph capture sizes where vLLM pads them (:func:`padded_tokens`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from profiles.format import Profile
from profiles.oracle import LINEAR_FEATURES, MOE_FEATURE, StepFeatures

GIB = 1 << 30


@dataclass(frozen=True)
class Hardware:
    """One GPU kind emugate can synthesize for.

    Attributes:
        name: emugate's name (profile file prefix), e.g. ``h100-sxm``.
        aic_system: AIConfigurator's system name (``aiconfigurator_core/systems/<name>.yaml``).
        aic_version: the vLLM version of AIC's kernel tables for it (only these are shipped).
        memory_gib: device memory as vLLM sees it (``total_gpu_memory`` in its start-up
            log, GiB); ``memory_source`` says where the figure comes from.
        max_graph_size: vLLM's default ``max_cudagraph_capture_size`` ceiling (512; 1024 on
            data-centre Blackwell), ``vllm/config/compilation.py``.
    """

    name: str
    aic_system: str
    aic_version: str
    memory_gib: float
    memory_source: str
    max_graph_size: int = 512

    @property
    def is_a100(self) -> bool:
        return "a100" in self.aic_system


_SMI = "nvidia-smi total as given in aiconfigurator_core/systems/{}.yaml"
_VLLM_LOG = ("total_gpu_memory in vLLM start-up logs on this GPU ({}); AIC's yaml carries the "
             "nominal {}")
#: The GPUs AIC 0.12.0 ships vLLM kernel tables for (0.24.0; a100_sxm at 0.14.0).
HARDWARE: dict[str, Hardware] = {h.name: h for h in (
    Hardware("h100-sxm", "h100_sxm", "0.24.0", 79.19, _VLLM_LOG.format("79.11-79.25 GiB", "80 GiB")),
    Hardware("h200", "h200_sxm", "0.24.0", 139.81, _VLLM_LOG.format("139.81 GiB", "141 GiB")),
    Hardware("a100-sxm", "a100_sxm", "0.14.0", 79.15, _VLLM_LOG.format("79.15 GiB", "80 GiB")),
    Hardware("l40s", "l40s", "0.24.0", 46068 / 1024, _SMI.format("l40s") + " (46,068 MiB)"),
    Hardware("rtx-pro-6000", "rtx_pro_6000_server", "0.24.0", 97887 / 1024,
             _SMI.format("rtx_pro_6000_server") + " (97,887 MiB)"),
    Hardware("b200", "b200_sxm", "0.24.0", 178.4, "nominal 180 GB HBM3e less ~1.6 GiB driver reserve (estimate)",
             max_graph_size=1024),
)}


def hardware(name: str) -> Hardware:
    """Look up a :class:`Hardware` by emugate name or AIC system name.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    for h in HARDWARE.values():
        if name in (h.name, h.aic_system):
            return h
    raise ValueError(f"unknown hardware {name!r}; choose one of {sorted(HARDWARE)}")


# ------------------------------------------------------------------ model
@dataclass(frozen=True)
class ModelDims:
    """The decoder dimensions that decide weights, KV size and step cost.

    Read from a Hugging Face ``config.json`` (:meth:`from_config`). Besides dense attention
    decoders it covers the families aiconfigurator-core models:

    * mixture of experts (``num_experts`` > 0): Qwen3-MoE / Mixtral (``num_experts`` or
      ``num_local_experts``, ``num_experts_per_tok``, ``moe_intermediate_size``), gpt-oss
      (``experts_per_token``), DeepSeek-V3/R1 (``n_routed_experts``, ``n_shared_experts``,
      ``first_k_dense_replace`` dense layers first);
    * MLA (``kv_lora_rank`` > 0, DeepSeek-V2/V3/R1): one compressed latent of
      ``kv_lora_rank + qk_rope_head_dim`` values per token and layer, not split by TP;
    * local-attention layers beside full attention: gpt-oss's sliding-window layers (``layer_types``,
      window ``sliding_window`` tokens) or Llama 4's chunked-local ones (its RoPE layers,
      ``attention_chunk_size``): ``num_sliding_layers`` of them, a group of their own in vLLM's pool.

    ``weight_format`` / ``expert_format`` are the checkpoint's storage of the linear layers and of
    the experts: ``bf16``, ``fp8`` (DeepSeek-R1's block-FP8 ``quantization_config``) or ``mxfp4``
    (gpt-oss: experts only, 4 bits + one 8-bit scale per 32 values).
    """

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied_embeddings: bool
    max_position_embeddings: int
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    num_dense_layers: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    q_lora_rank: int = 0
    num_sliding_layers: int = 0
    sliding_window: int = 0
    weight_format: str = "bf16"
    expert_format: str = "bf16"

    @classmethod
    def from_config(cls, path: str | Path) -> "ModelDims":
        """Parse ``config.json`` (a file or the directory holding it).

        Raises:
            ValueError: a hybrid Mamba / linear-attention or attention-free config (no AIC model;
                the message names the architecture), or a config without a decoder's keys.
        """
        p = Path(path)
        cfg = json.loads((p / "config.json" if p.is_dir() else p).read_text())
        cfg = cfg.get("text_config", cfg)
        arch = (cfg.get("architectures") or ["?"])[0]
        kinds = set(cfg.get("layer_types") or cfg.get("layers_block_type") or [])
        if kinds - {"full_attention", "sliding_attention", "attention"} or "mamba_d_state" in cfg \
                or "linear_num_value_heads" in cfg:
            raise ValueError(f"profile synth cannot model {arch}: its layers include {sorted(kinds) or 'Mamba/linear'}"
                             " state layers, which aiconfigurator-core does not cover; capture a profile on the GPU")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            layers = int(cfg["num_hidden_layers"])
        except KeyError as e:
            raise ValueError(f"{p}: config.json lacks {e.args[0]!r}; synth needs a decoder's config") from e
        experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
        quant = (cfg.get("quantization_config") or {}).get("quant_method", "")
        mla = int(cfg.get("kv_lora_rank") or 0)
        return cls(
            architecture=arch, num_layers=layers, hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]), num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(cfg["vocab_size"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 8192)),
            num_experts=experts,
            experts_per_token=int(cfg.get("num_experts_per_tok") or cfg.get("experts_per_token") or 0)
            if experts else 0,
            moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if experts else 0,
            shared_expert_intermediate_size=int(cfg.get("n_shared_experts") or 0) * int(
                cfg.get("moe_intermediate_size") or 0) or int(cfg.get("shared_expert_intermediate_size") or 0),
            num_dense_layers=int(cfg.get("first_k_dense_replace") or 0) if experts else 0,
            kv_lora_rank=mla, qk_rope_head_dim=int(cfg.get("qk_rope_head_dim") or 0) if mla else 0,
            qk_nope_head_dim=int(cfg.get("qk_nope_head_dim") or 0) if mla else 0,
            v_head_dim=int(cfg.get("v_head_dim") or 0) if mla else 0,
            q_lora_rank=int(cfg.get("q_lora_rank") or 0) if mla else 0,
            num_sliding_layers=_local_layers(cfg, layers),
            sliding_window=int(cfg.get("sliding_window") or 0) if "sliding_attention" in kinds else 0,
            weight_format="fp8" if quant == "fp8" else "bf16",
            expert_format={"fp8": "fp8", "mxfp4": "mxfp4"}.get(quant, "bf16"),
        )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def attention_params(self) -> int:
        """Parameters of one layer's attention projections.

        GQA/MHA: QKV + O. MLA (DeepSeek-V3, ``vllm/model_executor/models/deepseek_v2.py``): q_a
        (hidden x q_lora_rank) and q_b (q_lora_rank x heads x (nope + rope)), or one q projection
        without ``q_lora_rank``; kv_a (hidden x (kv_lora_rank + rope)); kv_b (kv_lora_rank x heads
        x (nope + v)); o (heads x v x hidden).
        """
        h = self.hidden_size
        if self.is_mla:
            qd = self.num_heads * (self.qk_nope_head_dim + self.qk_rope_head_dim)
            q = h * self.q_lora_rank + self.q_lora_rank * qd if self.q_lora_rank else h * qd
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) \
                + self.kv_lora_rank * self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv + self.num_heads * self.v_head_dim * h
        return h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h

    def expert_params(self) -> int:
        """Parameters of the routed experts over all MoE layers (gate, up, down each); 0 for dense."""
        if not self.is_moe:
            return 0
        return (self.num_layers - self.num_dense_layers) * self.num_experts * 3 * self.hidden_size \
            * self.moe_intermediate_size

    def linear_params(self) -> int:
        """Parameters of the transformer layers' linear projections: attention, dense MLPs
        (gate/up/down), and for MoE layers the router, shared experts and routed experts."""
        h = self.hidden_size
        mlp = self.num_dense_layers * 3 * h * self.intermediate_size if self.is_moe \
            else self.num_layers * 3 * h * self.intermediate_size
        moe_layers = self.num_layers - self.num_dense_layers if self.is_moe else 0
        moe = moe_layers * (h * self.num_experts + 3 * h * self.shared_expert_intermediate_size)
        return self.num_layers * self.attention_params() + mlp + moe + self.expert_params()

    def embedding_params(self) -> int:
        """Input embedding plus the LM head (once if tied)."""
        return self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)

    def weight_bytes(self, dtype: str, tp: int) -> int:
        """Weight bytes per GPU (experts sharded by TP, vLLM's default without expert parallel;
        with ``--enable-expert-parallel`` the experts split over the same ranks, the same bytes).

        Linear layers in ``dtype`` (bf16 2 B, fp8 1 B) unless the checkpoint itself is FP8
        (``weight_format``); experts stored as MXFP4 take 4.25 bits a value (4-bit values plus one
        8-bit scale per 32, the OCP MX format gpt-oss ships); embeddings, LM head and norms in bf16
        (vLLM's FP8 checkpoints keep those in 16 bit). Divided by TP (vLLM shards the embedding and
        LM head by vocabulary too; MLA's small down-projections, replicated in fact, are counted
        as sharded: under 1 % of DeepSeek-R1's bytes).
        """
        fp8 = dtype == "fp8" or self.weight_format == "fp8"
        per = 1 if fp8 else 2
        experts = self.expert_params()
        exp_bytes = experts * (4.25 / 8 if self.expert_format == "mxfp4" else
                               1 if (fp8 or self.expert_format == "fp8") else 2)
        lin = (self.linear_params() - experts) * per + exp_bytes
        rest = (self.embedding_params() + (2 * self.num_layers + 1) * self.hidden_size) * 2
        return int(lin + rest) // tp

    def kv_bytes_per_token(self, tp: int, kv_dtype_bytes: int = 2) -> int:
        """KV-cache bytes per token per GPU if every layer kept every token: 2 (K and V) x layers x
        KV heads/TP x head_dim x bytes; MLA: layers x (kv_lora_rank + qk_rope_head_dim) x bytes,
        whatever the TP (every rank keeps the whole latent). Sliding-window layers are counted as
        full here; :meth:`kv_block_bytes` is what vLLM's pool divides by."""
        if self.is_mla:
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim) * kv_dtype_bytes
        return 2 * self.num_layers * max(1, self.num_kv_heads // tp) * self.head_dim * kv_dtype_bytes

    def kv_block_bytes(self, tp: int, block_size: int = 16, kv_dtype_bytes: int = 2) -> int:
        """Bytes of one block of vLLM's shared KV pool per GPU: what the available memory is divided
        by to get ``num_gpu_blocks`` (``get_kv_cache_groups`` and ``_pool_bytes_per_block``,
        vllm/v1/core/kv_cache_utils.py).

        Every layer alike (dense, MoE, MLA): the sum of the layers' pages. Sliding-window beside
        full-attention layers (gpt-oss): vLLM's hybrid allocator puts each kind in its own groups
        of ``g`` layers (``g`` = the smaller count when the counts divide, as gpt-oss's 18 + 18),
        and one block holds ``g`` pages, so the pool has ``layers / g`` times the blocks a
        full-attention model would, shared by the groups.

        Raises:
            ValueError: sliding and full layer counts vLLM would group with padding (not modelled).
        """
        page = block_size * self.kv_bytes_per_token(tp, kv_dtype_bytes) // self.num_layers
        full = self.num_layers - self.num_sliding_layers
        if not self.num_sliding_layers or not full:
            return page * self.num_layers
        g = min(full, self.num_sliding_layers)
        if full % g or self.num_sliding_layers % g:
            raise ValueError(f"{self.architecture}: {full} full and {self.num_sliding_layers} sliding layers do "
                             "not group evenly; synth models only counts that divide (as gpt-oss's)")
        return page * g


def _local_layers(cfg: dict, layers: int) -> int:
    """Layers attending locally: gpt-oss's sliding-window ones (``layer_types``), else Llama 4's chunked
    ones (its RoPE layers, ``no_rope_layers[i]`` truthy, when ``attention_chunk_size`` is set)."""
    sliding = sum(t == "sliding_attention" for t in cfg.get("layer_types") or [])
    if sliding or not cfg.get("attention_chunk_size"):
        return sliding
    return sum(1 for x in (cfg.get("no_rope_layers") or [])[:layers] if x)


# ------------------------------------------------------ vLLM's scheduling
def vllm_scheduler_defaults(hw: Hardware) -> tuple[int, int]:
    """(max_num_batched_tokens, max_num_seqs) vLLM 0.32's OpenAI server picks on ``hw``.

    Source: ``vllm/engine/arg_utils.py`` ``_get_default_max_num_seqs_and_batched_tokens``:
    >= 160 GiB: 16384 / 1024; >= 70 GiB and not an A100: 8192 / 1024; else 2048 / 256.
    """
    mem = hw.memory_gib
    if mem >= 160:
        return 16384, 1024
    if mem >= 70 and not hw.is_a100:
        return 8192, 1024
    return 2048, 256


def cudagraph_sizes(max_num_seqs: int, max_graph_size: int = 512) -> list[int]:
    """vLLM's default CUDA-graph capture sizes (tokens).

    Source: ``vllm/config/vllm.py`` ``_set_cudagraph_sizes``: ``[1, 2, 4] + range(8, 256, 8)
    + range(256, max + 1, 16)`` with ``max = min(2 * max_num_seqs, 512)`` (1024 on
    data-centre Blackwell).
    """
    top = min(2 * max_num_seqs, max_graph_size)
    sizes = [1, 2, 4] + list(range(8, 256, 8)) + list(range(256, top + 1, 16))
    return [s for s in sizes if s <= top]


def padded_tokens(num_tokens: int, sizes: list[int]) -> int:
    """The token count vLLM runs a step at: the next capture size when the step fits a CUDA
    graph (full graphs for uniform decode, piecewise for mixed and prefill steps under vLLM
    0.32's default ``FULL_AND_PIECEWISE``), else unpadded (eager)."""
    if not sizes or num_tokens > sizes[-1]:
        return num_tokens
    lo, hi = 0, len(sizes) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if sizes[mid] >= num_tokens:
            hi = mid
        else:
            lo = mid + 1
    return sizes[lo]


# ------------------------------------------------------------ KV capacity
#: Memory outside torch's allocator that vLLM's profiler sees grow (CUDA context, cuBLAS
#: workspaces): start-up logs of 8B models on H100 report non_torch_memory 0.12-0.65 GiB.
NON_TORCH_GIB = 0.4
#: Extra per-GPU buffers with TP > 1 (NCCL, custom all-reduce); AIC's nccl_mem for TP4 is 0.38 GiB.
TP_COMM_GIB = 0.4


@dataclass(frozen=True)
class KVCapacity:
    """The KV-cache pool vLLM would allocate, with the arithmetic (all bytes per GPU).

    ``num_blocks = floor((memory x gpu_memory_utilization - weights - activation - non_torch)
    / block_bytes)``: vLLM's ``determine_available_memory`` then ``get_kv_cache_configs``
    (``vllm/v1/worker/gpu_worker.py``, ``vllm/v1/core/kv_cache_utils.py``), ``block_bytes`` from
    :meth:`ModelDims.kv_block_bytes`. Activation = the profile run's peak at
    ``max_num_batched_tokens``: per token (4 x hidden + 3 x intermediate/TP) x 2 B (residual,
    QKV/attention out, gate_up and the activated MLP input; for MoE the intermediate is the
    routed experts' ``experts_per_token x moe_intermediate``, the fused-MoE workspace), plus the
    sampler's fp32 logits for ``min(max_num_seqs, max_num_batched_tokens)`` rows (vocab/TP wide).
    """

    memory_bytes: int
    utilization: float
    weights_bytes: int
    activation_bytes: int
    non_torch_bytes: int
    kv_bytes_per_token: int
    block_size: int
    num_blocks: int
    block_bytes: int = 0

    @property
    def tokens(self) -> int:
        """Tokens the pool's blocks hold (for sliding-window + full models, blocks are shared by the
        layer groups: a request uses full-attention blocks for its whole context and sliding ones
        for the window only)."""
        return self.num_blocks * self.block_size

    @property
    def kv_bytes(self) -> int:
        return int(self.memory_bytes * self.utilization) - self.weights_bytes - self.activation_bytes \
            - self.non_torch_bytes

    def arithmetic(self) -> str:
        """One line a reader can redo by hand (GiB with two decimals)."""
        g = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
        per_block = self.block_bytes or self.kv_bytes_per_token * self.block_size
        return (f"{g(self.memory_bytes)} x {self.utilization} - weights {g(self.weights_bytes)} - activation "
                f"{g(self.activation_bytes)} - non-torch {g(self.non_torch_bytes)} = KV {g(self.kv_bytes)}; "
                f"/ {per_block:,} B per block of {self.block_size} tokens "
                f"-> {self.num_blocks:,} blocks x {self.block_size} = {self.tokens:,} tokens")


def kv_capacity(hw: Hardware, dims: ModelDims, dtype: str, tp: int, utilization: float,
                max_num_batched_tokens: int, max_num_seqs: int, block_size: int = 16) -> KVCapacity:
    """Estimate vLLM's KV pool for a deployment (see :class:`KVCapacity` for the formula).

    Checked against the one measured pool we have: Dynamo's H200 Llama-3.1-8B FP8 profile
    reports ``max_kv_tokens`` 945,029 (``profiles/reference/h200_llama-3.1-8b-fp8_dynamo-decode.csv``);
    ``emugate profile synth --hardware h200 --model llama-3.1-8b --dtype fp8`` prints this
    estimate next to it and next to ``aiconfigurator_core.sdk.memory.estimate_kv_cache``.

    Raises:
        ValueError: the weights and reserves do not fit the memory (no KV left).
    """
    mem = int(hw.memory_gib * GIB)
    weights = dims.weight_bytes(dtype, tp)
    inter = dims.experts_per_token * dims.moe_intermediate_size if dims.is_moe else dims.intermediate_size
    act_tok = (4 * dims.hidden_size + 3 * inter // tp) * 2
    logits = min(max_num_seqs, max_num_batched_tokens) * (dims.vocab_size // tp) * 4
    act = max_num_batched_tokens * act_tok + logits
    non_torch = int((NON_TORCH_GIB + (TP_COMM_GIB if tp > 1 else 0.0)) * GIB)
    per_tok = dims.kv_bytes_per_token(tp)
    per_block = dims.kv_block_bytes(tp, block_size)
    free = int(mem * utilization) - weights - act - non_torch
    if free <= per_block:
        raise ValueError(f"no KV-cache memory left on {hw.name} at TP{tp}: weights {weights / GIB:.1f} GiB, "
                         f"budget {mem * utilization / GIB:.1f} GiB; raise --tp or --gpu-memory-utilization")
    return KVCapacity(mem, utilization, weights, act, non_torch, per_tok, block_size, free // per_block, per_block)


# ------------------------------------------------------------ estimator
@dataclass(frozen=True)
class StepShape:
    """What a SchedulerOutput tells about one step (the FPM fields AIC takes), tokens/requests.

    ``prefill_kv`` is the tokens already cached for the prefilling requests (chunked prefill
    continuation or a prefix-cache hit); ``decode_kv`` the sum of the decoding requests'
    contexts.
    """

    prefill_reqs: int
    prefill_tokens: int
    prefill_kv: int
    decode_reqs: int
    decode_kv: int

    @property
    def num_tokens(self) -> int:
        return self.prefill_tokens + self.decode_reqs

    @property
    def phase(self) -> str:
        """``prefill`` (no decodes), ``decode`` (no prefill tokens) or ``mixed``."""
        if self.prefill_tokens and self.decode_reqs:
            return "mixed"
        return "prefill" if self.prefill_tokens else "decode"


class AicStepModel:
    """Raw (uncalibrated) AIConfigurator estimate of one vLLM forward pass, in ms.

    Args:
        hw: the GPU.
        model: an AIC model id (``meta-llama/Meta-Llama-3.1-8B``; AIC ships its config) or a
            local directory with ``config.json``.
        dtype: ``bf16`` or ``fp8`` (weights; the KV cache stays bf16).
        tp: tensor parallel size.
        max_num_seqs: sets the CUDA-graph capture sizes used for padding.

    Raises:
        ImportError: ``aiconfigurator-core`` is not installed (``pip install -e ".[synth]"``).
        RuntimeError: AIC refuses the combination (unsupported architecture or system).
    """

    def __init__(self, hw: Hardware, model: str, dtype: str, tp: int, max_num_seqs: int):
        self.hw, self.model, self.dtype, self.tp = hw, model, dtype, tp
        self._model = _native_model(hw.aic_system, hw.aic_version, model, dtype, tp)
        self.graph_sizes = cudagraph_sizes(max_num_seqs, hw.max_graph_size)

    @staticmethod
    def data_version() -> str:
        """The installed aiconfigurator-core version (its kernel tables come with it)."""
        from importlib.metadata import version
        return version("aiconfigurator-core")

    def raw_ms(self, s: StepShape) -> float:
        """AIC's kernel-sum estimate for ``s`` after CUDA-graph padding, ms (0 for an empty step)."""
        n = s.num_tokens
        if n == 0:
            return 0.0
        pad = padded_tokens(n, self.graph_sizes) - n
        dec_reqs, pre_tokens = s.decode_reqs, s.prefill_tokens
        if s.phase == "decode":
            dec_reqs += pad  # uniform decode batch padded with dummy requests (full graph)
        else:
            pre_tokens += pad  # piecewise graph: padded token rows go through the GEMMs
        fpm = {"version": 1, "scheduled_requests": {
            "num_prefill_requests": s.prefill_reqs, "sum_prefill_tokens": pre_tokens,
            "sum_prefill_kv_tokens": s.prefill_kv, "num_decode_requests": dec_reqs,
            "sum_decode_kv_tokens": s.decode_kv + (pad if s.phase == "decode" else 0)}}
        out = self._model.estimate_forward_pass_time_ms(fpm)
        if out is None:
            raise RuntimeError(f"aiconfigurator-core gave no estimate for {s}")
        return float(out)


@functools.lru_cache(maxsize=8)
def _native_model(system: str, version: str, model: str, dtype: str, tp: int):
    """AIC's compiled forward-pass model for one deployment (~1 s to build; cached, so
    ``synth``'s step table and its summary share one)."""
    try:
        from aiconfigurator_core.sdk import RustForwardPassPerfModel
        from aiconfigurator_core.sdk import engine as aic_engine
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError('emugate profile synth needs aiconfigurator-core: pip install -e ".[synth]"') from e
    logging.getLogger("aiconfigurator_core").setLevel(logging.ERROR)
    config = {
        "schema_version": aic_engine.ENGINE_CONFIG_SCHEMA_VERSION, "model_name": model,
        "system_name": system, "backend": "vllm", "backend_version": version,
        "tp_size": tp, "pp_size": 1, "weight_dtype": "fp8" if dtype == "fp8" else None, "kv_cache_dtype": None,
    }
    try:
        return RustForwardPassPerfModel.from_native(config)
    except Exception as e:
        raise RuntimeError(f"aiconfigurator-core cannot model {model} on {system} "
                           f"(vLLM {version}, TP{tp}, {dtype}): {e}") from e


# -------------------------------------------------------------- shapes
def step_shapes(max_num_batched_tokens: int, max_num_seqs: int, max_model_len: int, kv_tokens: int,
                n: int = 12000, seed: int = 0) -> list[StepShape]:
    """Step shapes vLLM's scheduler produces on such a deployment, for the profile's table.

    Thirds of ``n``: decode-only batches (size log-uniform 1..max_num_seqs, every
    capture size included; mean context log-uniform 16..max_model_len, capped so the batch's
    KV fits ``kv_tokens``), prefill-only steps (one chunk log-uniform 16..budget, half with a
    cached prefix; or several short prompts), and mixed steps (a decode batch plus one
    prefill chunk that fills, or partly fills, the token budget). Deterministic for ``seed``.
    """
    rng = np.random.default_rng(seed)
    budget, out = max_num_batched_tokens, []

    def log_int(lo: float, hi: float) -> int:
        return int(round(math.exp(rng.uniform(math.log(lo), math.log(max(hi, lo))))))

    def cached_prefix(p: int) -> int:
        """Half the chunks start at 0, half after a cached prefix (chunked prefill / prefix hit)."""
        return 0 if rng.random() < 0.5 else int(rng.integers(0, max(1, max_model_len - p)))

    def decode_batch(b_max: int) -> tuple[int, int]:
        b = log_int(1, b_max)
        ctx = log_int(16, min(max_model_len, max(16, kv_tokens // max(b, 1))))
        return b, b * ctx

    sizes = [s for s in cudagraph_sizes(max_num_seqs) if s <= max_num_seqs]
    for b in sizes:  # the capture sizes themselves, at short and long context
        for ctx in (128, 1024, 4096):
            if b * ctx <= kv_tokens and ctx <= max_model_len:
                out.append(StepShape(0, 0, 0, b, b * ctx))
    third = n // 3
    while len(out) < third:
        b, kv = decode_batch(max_num_seqs)
        out.append(StepShape(0, 0, 0, b, kv))
    for _ in range(third):
        if rng.random() < 0.2:
            k = int(rng.integers(2, 9))
            toks = [log_int(16, max(16, budget // k)) for _ in range(k)]
            out.append(StepShape(k, sum(toks), 0, 0, 0))
        else:
            p = log_int(16, budget)
            out.append(StepShape(1, p, cached_prefix(p), 0, 0))
    while len(out) < n:  # the prefilling request counts toward max_num_seqs too
        b, kv = decode_batch(min(max_num_seqs - 1, budget - 1))
        room = budget - b
        p = room if rng.random() < 0.5 else log_int(1, room)
        out.append(StepShape(1, p, cached_prefix(p), b, kv))
    return out


def shape_features(s: StepShape) -> StepFeatures:
    """The oracle's features of a shape (the profile step-table columns but latency).

    ``attn_work`` = sum over requests of scheduled x (computed + scheduled/2): a decode
    request adds its context + 0.5, the prefill chunk p after k cached tokens p x (k + p/2)
    (several prefill requests share the chunk tokens equally).
    """
    per = s.prefill_tokens / max(s.prefill_reqs, 1)
    pre_work = s.prefill_reqs * per * (s.prefill_kv / max(s.prefill_reqs, 1) + per / 2)
    return StepFeatures(num_tokens=s.num_tokens, num_reqs=s.prefill_reqs + s.decode_reqs,
                        prefill_tokens=s.prefill_tokens, decode_reqs=s.decode_reqs, prefill_reqs=s.prefill_reqs,
                        context_tokens=s.prefill_kv + s.decode_kv,
                        attn_work=int(round(pre_work + s.decode_kv + s.decode_reqs / 2)))


def shape_from_features(num_reqs: int, prefill_tokens: int, decode_reqs: int, prefill_reqs: int,
                        context_tokens: int, attn_work: int) -> StepShape:
    """The inverse of :func:`shape_features` for a recorded step (a trace or profile row).

    The cached prefix of the prefill chunk ``k`` and the decodes' summed context come apart through
    ``attn_work``: with one chunk of ``p`` tokens, ``attn_work = (context - k) + decode_reqs/2 + p*k + p^2/2``.
    Several prefill requests are treated as one chunk (their tokens summed); k is clamped to
    ``[0, context_tokens]``.
    """
    p = prefill_tokens
    k = 0
    if p > 1:
        k = int(round((attn_work - context_tokens - decode_reqs / 2 - p * p / 2) / (p - 1)))
        k = min(max(k, 0), context_tokens)
    return StepShape(prefill_reqs, p, k, decode_reqs, max(context_tokens - k, decode_reqs))


# ------------------------------------------------------------- building
@dataclass
class SynthSpec:
    """What to synthesize. ``model_dir`` holds the config.json the emulated server will load;
    ``aic_model`` is what AIC is told (its shipped id, or the directory). Unset scheduler
    values take vLLM 0.32's defaults for the hardware (:func:`vllm_scheduler_defaults`)."""

    hardware: str
    model_dir: str
    aic_model: str | None = None
    dtype: str = "bf16"
    tp: int = 1
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    block_size: int = 16
    num_steps: int = 12000
    seed: int = 0
    expert_parallel: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


def synthesize(spec: SynthSpec, model=None, output_lengths: np.ndarray | None = None,
               progress: Callable[[int, int], None] | None = None) -> tuple[Profile, KVCapacity]:
    """Build a synthesized profile (and its KV capacity) for ``spec``.

    ``model`` is a :class:`profiles.stepmodel.StepModel` (default: the shipped fit;
    ``StepModel.raw()`` gives AIC's kernel sums as they are). ``output_lengths`` (tokens) are stored
    for EOS draws. Latencies are stored in us; ``host_gap_us`` is 0 (GPU steps under async
    scheduling overlap the host's work). The profile's metadata carries the label ESTIMATE, the
    model, its expected error band for configurations like this one (``error_band``) and what about
    this configuration lies outside the fit (``coverage_warnings``).

    Raises:
        ValueError: unknown hardware, unsupported model config, no KV memory left.
        ImportError / RuntimeError: see :class:`profiles.stepmodel.AicBreakdown`.
    """
    from profiles.stepmodel import AicBreakdown, Deployment, band_for, coverage_warnings, error_band_text, shipped_model
    model = model if model is not None else shipped_model()
    hw = hardware(spec.hardware)
    dims = ModelDims.from_config(spec.model_dir)
    mnbt_d, mns_d = vllm_scheduler_defaults(hw)
    mnbt = spec.max_num_batched_tokens or mnbt_d
    mns = spec.max_num_seqs or mns_d
    mml = spec.max_model_len or dims.max_position_embeddings
    kv = kv_capacity(hw, dims, spec.dtype, spec.tp, spec.gpu_memory_utilization, mnbt, mns, spec.block_size)
    aic_model = spec.aic_model or spec.model_dir
    dep = Deployment(hw.name, aic_model, spec.dtype, spec.tp, mns, dims.num_layers, dims.hidden_size,
                     spec.expert_parallel and dims.is_moe)
    aic = AicBreakdown(dep)
    shapes = step_shapes(mnbt, mns, mml, kv.tokens, spec.num_steps, spec.seed)
    feature_names = [f.name for f in dataclasses.fields(StepFeatures)]
    cols: dict[str, list[int]] = {k: [] for k in [*feature_names, "latency_us"]}
    for i, s in enumerate(shapes):
        f = shape_features(s)
        for k in feature_names:
            cols[k].append(getattr(f, k))
        cols["latency_us"].append(max(1, int(round(model.step_ms(aic.parts(s), dep) * 1000))))
        if progress is not None and (i % 500 == 0 or i == len(shapes) - 1):
            progress(i + 1, len(shapes))
    steps = {k: np.asarray(v) for k, v in cols.items()}
    steps["host_gap_us"] = np.zeros(len(shapes), dtype=np.uint32)
    fp = {
        "source": "synthesized",
        "estimator": "aiconfigurator-core per-op kernel sums + emugate step-time model",
        "estimator_version": AicStepModel.data_version(),
        "aic_system": hw.aic_system, "aic_backend_version": hw.aic_version,
        "device_name": f"{hw.name} (synthesized)", "hardware": hw.name,
        "model": Path(spec.model_dir).name, "aic_model": aic_model,
        "model_dims": _fingerprint_dims(dims), "model_family_dims": _family_dims(dims),
        "dtype": "bfloat16",
        # the checkpoint's own format wins (DeepSeek-R1 ships FP8 weights whatever --dtype says)
        "weight_dtype": "fp8" if dims.weight_format == "fp8" else spec.dtype,
        "tensor_parallel_size": spec.tp, "block_size": spec.block_size, "num_kv_blocks": kv.num_blocks,
        "expert_parallel": bool(spec.expert_parallel and dims.is_moe),
        "max_num_batched_tokens": mnbt, "max_num_seqs": mns, "max_model_len": mml,
        "enable_chunked_prefill": True, "enable_prefix_caching": True, "async_scheduling": True,
        "gpu_memory_utilization": spec.gpu_memory_utilization,
        "cudagraph_capture_sizes_max": aic.graph_sizes[-1] if aic.graph_sizes else 0,
        "vllm_version": "0.32.0 (scheduler); AIC kernel tables from vLLM " + hw.aic_version,
    }
    warnings = coverage_warnings(model, dep, dims.linear_params() + dims.embedding_params(), moe=dims.is_moe,
                                 mla=dims.is_mla, sliding=dims.num_sliding_layers > 0)
    _, band = band_for(model, dep)
    meta = {
        "estimate": True,
        # decode context and a prefill's cached prefix cost differently per token on a GPU:
        # mixed steps get their own oracle class and context tokens a coefficient
        # (held-out error with and without: emugate profile inspect on the profile)
        # MoE: the expected distinct experts of a step as one more feature (profiles.oracle.MOE_FEATURE)
        "oracle": {"features": list(LINEAR_FEATURES) + ([MOE_FEATURE] if dims.is_moe else []), "split_mixed": True,
                   **({"moe": [dims.num_experts, dims.experts_per_token]} if dims.is_moe else {})},
        "label": (f"ESTIMATE: step latencies synthesized from aiconfigurator-core's kernel tables and a step-time "
                  f"model fitted on real vLLM measurements, not recorded on this GPU; {error_band_text(model, dep)}"),
        "error_band": band, "coverage_warnings": warnings,
        "kv_arithmetic": kv.arithmetic(), "kv_capacity": asdict(kv),
        "step_model": model.to_dict(), "spec": asdict(spec),
        "output_lengths_source": "ShareGPT completions as in the bundled CPU profile" if output_lengths is not None
        else "none",
    }
    ol = np.asarray(output_lengths if output_lengths is not None else [], dtype=np.uint32)
    return Profile(fp, steps, ol, meta), kv


def _fingerprint_dims(d: ModelDims) -> dict[str, Any]:
    """The same keys :func:`emu_executor.fingerprint.model_dims` records for a real capture (the
    executor compares them with the served model's)."""
    return {"architecture": d.architecture, "num_layers": d.num_layers, "hidden_size": d.hidden_size,
            "intermediate_size": d.intermediate_size, "num_attention_heads": d.num_heads,
            "num_kv_heads": d.num_kv_heads,
            # vLLM's get_head_size() for MLA is the cached latent's width
            "head_dim": d.kv_lora_rank + d.qk_rope_head_dim if d.is_mla else d.head_dim, "vocab_size": d.vocab_size}


def _family_dims(d: ModelDims) -> dict[str, Any]:
    """The MoE / MLA / sliding-window dimensions of the model, for the fingerprint (empty for dense)."""
    out: dict[str, Any] = {}
    if d.is_moe:
        out.update(num_experts=d.num_experts, experts_per_token=d.experts_per_token,
                   moe_intermediate_size=d.moe_intermediate_size, expert_format=d.expert_format)
    if d.is_mla:
        out.update(kv_lora_rank=d.kv_lora_rank, qk_rope_head_dim=d.qk_rope_head_dim)
    if d.num_sliding_layers:
        out.update(num_sliding_layers=d.num_sliding_layers, sliding_window=d.sliding_window)
    return out
