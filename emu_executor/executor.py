"""EmulatedExecutor: vLLM's engine with the forward pass replaced by a profile.

Selected with ``--distributed-executor-backend emu_executor.EmulatedExecutor``
(vLLM resolves the qualname in ``Executor.get_class``). Everything above the
executor is vLLM's own: API server, V1 (async) scheduler, KV-cache manager,
prefix cache, chunked prefill, preemption, detokenizer, /metrics.

Per step (``execute_model`` then ``sample_tokens``, as EngineCore calls them):

1. read the step's requests from ``SchedulerOutput`` (:mod:`features`);
2. draw the step latency (and the recorded host gap between steps) from the
   oracle (:mod:`profiles.oracle`) and put the step on the
   :class:`~emu_executor.timing.VirtualDevice` timeline: it ends at
   ``max(now, previous end + host gap) + latency``;
3. ``execute_model`` returns ``None`` (as vLLM's GPU runner does; the output
   comes from ``sample_tokens``); ``sample_tokens`` picks one synthetic token
   for every request whose token is due (none for a partial chunked prefill),
   honouring the grammar bitmask, and returns a Future resolved at the
   step's end (blocking call: waits until then).

KV cache: ``get_kv_cache_spec`` is built from the model config (full
attention, or sliding window per layer where the config says so);
``determine_available_memory`` returns exactly the bytes that make vLLM's
allocator produce the profile's KV token capacity (blocks x block_size), so
admission and preemption happen where they did on the profiled hardware.
No worker, no weights, no device tensors.
"""
from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable

import numpy as np
import torch

from vllm.v1.executor.abstract import Executor
from vllm.v1.outputs import (EMPTY_MODEL_RUNNER_OUTPUT, DraftTokenIds, LogprobsLists, LogprobsTensors,
                              ModelRunnerOutput)
from vllm.v1.worker.worker_base import CompilationTimes

from emu_executor.features import RequestTable, ScheduledRequest, step_features
from emu_executor.lateness import LatenessStats, stats_path
from emu_executor.settings import EmuSettings
from emu_executor.specdecode import SpecEmulation
from emu_executor.timing import TimedFuture, VirtualDevice, wait_until
from emu_executor.tokens import SyntheticTokens, TokenState, bitmask_rows
from profiles.format import Profile
from profiles.oracle import ConstantOracle, LatencyOracle, build_oracle

#: GIL switch interval set in the emulated engine process (seconds).
GIL_SWITCH_INTERVAL_S = 0.00025

# vLLM shows plugin log lines only for loggers named "vllm.*" (VLLM_NOTES.md).
logger = logging.getLogger("vllm.emugate.executor")


def build_kv_cache_spec(vllm_config) -> dict[str, Any]:
    """Per-layer KV-cache spec for the model, as vLLM's GPU runner would report it.

    Returns {layer name: KVCacheSpec}. Two paths:

    * plain attention models (the common case; any TP): built from the config. Layer kinds come
      from ``hf_config.layer_types`` ("sliding_attention" / "full_attention") when present, else
      all layers are sliding when ``hf_config.sliding_window`` is set, else full attention
      (``FullAttentionSpec`` / ``SlidingWindowSpec`` with the per-rank KV heads); Llama 4's RoPE layers
      are ``ChunkedLocalAttentionSpec`` (``attention_chunk_size``), its NoPE layers full attention;
    * MLA models (DeepSeek-V2/V3/R1, Kimi-K2...): vLLM's own layers are asked, as
      ``GPUModelRunner.get_kv_cache_spec`` (vllm/v1/worker/gpu_model_runner.py) does, after
      building the model on the meta device (:func:`specs_from_vllm_layers`). MLA's latent cache
      is not sharded by TP (one KV head, ``max_tp_shards=1``), so the TP1 spec is every rank's.
      Pooling models at TP1 take this path too (encoder-only attention has no KV cache).

    * Mamba / linear-attention hybrids and attention-free models at TP1: vLLM's own layers too
      (``MambaSpec`` state beside the attention specs), after the attention block size is aligned
      to the state's page as vLLM does on a GPU (:func:`align_hybrid_block_size_as_on_gpu`).

    Raises:
        NotImplementedError: a hybrid or attention-free model at TP > 1 (its per-rank state shapes
            are not built); the message names the architecture and what is missing.
    """
    from vllm.utils.torch_utils import kv_cache_dtype_str_to_dtype
    from vllm.v1.kv_cache_interface import ChunkedLocalAttentionSpec, FullAttentionSpec, SlidingWindowSpec

    mc = vllm_config.model_config
    pc = vllm_config.parallel_config
    arch = ", ".join(getattr(mc.hf_config, "architectures", None) or [type(mc.hf_config).__name__])
    stateful = getattr(mc, "is_hybrid", False) or getattr(mc, "is_attention_free", False)
    if stateful and pc.tensor_parallel_size == 1:
        # Mamba / linear-attention state (MambaSpec) beside attention: only vLLM's layers know its shape;
        # the attention block size is first aligned to the state's page as on a GPU
        if getattr(mc, "is_hybrid", False):
            align_hybrid_block_size_as_on_gpu(vllm_config)
        return specs_from_vllm_layers(vllm_config)
    if stateful:
        kind = "an attention-free model" if getattr(mc, "is_attention_free", False) else \
            "a hybrid attention + Mamba/linear-attention model"
        raise NotImplementedError(
            f"emulate mode cannot serve {mc.model} ({arch}) at tensor parallel "
            f"{pc.tensor_parallel_size}: it is {kind}, and emulate mode builds its recurrent-state KV "
            "specs (MambaSpec) at TP1 only. Serve it at --tensor-parallel-size 1 with a profile of the "
            "TP you run, or with mode = \"real\".")
    if mc.use_mla or (mc.runner_type == "pooling" and pc.tensor_parallel_size == 1):
        # pooling models: encoder-only attention (BERT-like) keeps no KV cache, which only the layers know
        return specs_from_vllm_layers(vllm_config)
    hf = mc.hf_text_config
    n_layers = mc.get_num_layers(pc)
    kv_heads = mc.get_num_kv_heads(pc)
    head = mc.get_head_size()
    dtype = kv_cache_dtype_str_to_dtype(vllm_config.cache_config.cache_dtype, mc)
    block = vllm_config.cache_config.block_size
    window = getattr(hf, "sliding_window", None)
    layer_types = getattr(hf, "layer_types", None)
    # Llama 4: layers that use RoPE attend within chunks of attention_chunk_size tokens, the NoPE
    # layers (no_rope_layers[i] == 0) attend globally (vllm/model_executor/models/llama4.py)
    chunk = getattr(hf, "attention_chunk_size", None)
    no_rope = getattr(hf, "no_rope_layers", None) or []
    specs: dict[str, Any] = {}
    for i in range(n_layers):
        sliding = bool(window) and (
            layer_types is None or (i < len(layer_types) and layer_types[i] == "sliding_attention"))
        name = f"model.layers.{i}.self_attn.attn"
        if chunk and i < len(no_rope) and no_rope[i]:
            specs[name] = ChunkedLocalAttentionSpec(block_size=block, num_kv_heads=kv_heads, head_size=head,
                                                    dtype=dtype, attention_chunk_size=int(chunk))
        elif sliding:
            specs[name] = SlidingWindowSpec(block_size=block, num_kv_heads=kv_heads, head_size=head,
                                            dtype=dtype, sliding_window=int(window))
        else:
            specs[name] = FullAttentionSpec(block_size=block, num_kv_heads=kv_heads, head_size=head,
                                            dtype=dtype)
    return specs


def align_hybrid_block_size_as_on_gpu(vllm_config) -> None:
    """Set the attention block size of a hybrid (attention + Mamba/linear-attention) model as vLLM does
    on an NVIDIA GPU, and pad the state page to the attention page.

    vLLM's GPU worker calls ``Platform.update_block_size_for_backend`` once its layers exist, which for
    hybrids runs ``_align_hybrid_block_size`` (vllm/platforms/interface.py): the attention block grows
    to the smallest multiple of the attention kernel's block alignment whose page holds the largest
    Mamba state page, then the state page is padded to equal it. Emulate mode builds no layers in
    the engine and vLLM-CPU's attention backend aligns differently, so the same vLLM function is run
    here with the GPU backend's alignment: FlashAttention's kernel block sizes, ``MultipleOf(16)``
    (vllm/v1/attention/backends/flash_attn.py); MLA hybrids get vLLM's 128 floor inside it.
    """
    from vllm.platforms.interface import Platform
    from vllm.v1.attention.backend import AttentionBackend, MultipleOf

    class _GpuAttention(AttentionBackend):  # only the two class methods the alignment reads
        @staticmethod
        def get_supported_kernel_block_sizes(kv_cache_spec=None):
            return [MultipleOf(16)]

    class _GpuPlatform(Platform):
        @classmethod
        def _find_non_ssm_backends(cls, vllm_config):
            return [_GpuAttention]

    before = vllm_config.cache_config.block_size
    _GpuPlatform._align_hybrid_block_size(vllm_config, _GpuAttention)
    cc = vllm_config.cache_config
    logger.info("emugate: hybrid model: attention block size %d -> %d tokens, state page padded to %s bytes "
                "(as vLLM aligns them on a GPU)", before, cc.block_size, cc.mamba_page_size_padded)


def on_meta_model(vllm_config, fn: Callable[[Any, Any], Any]) -> Any:
    """Build the model vLLM would load on the meta device and return ``fn(model, config)``.

    The model class vLLM would load (``get_model_architecture``, pooling adapters included) is
    instantiated under ``torch.device("meta")`` (no weights, no memory) inside a one-rank gloo world
    at TP1 (set up here when this process has none, and torn down after), with a TP1 copy of the
    config when ``vllm_config`` has TP or PP > 1, and without weight quantization (it does not change
    the KV-cache specs, and vLLM-CPU lacks kernels for some of it). The static forward context (where the layers
    register) is restored afterwards, so nothing of the built model outlives the call. ~1 s.

    Raises:
        RuntimeError: vLLM cannot build the architecture on this host (the message says which).
    """
    import copy

    from vllm.config import set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.model_executor.model_loader.utils import get_model_architecture

    cfg = vllm_config
    if cfg.parallel_config.tensor_parallel_size != 1 or cfg.parallel_config.pipeline_parallel_size != 1:
        cfg = copy.deepcopy(vllm_config)
        cfg.parallel_config.tensor_parallel_size = cfg.parallel_config.pipeline_parallel_size = 1
        cfg.parallel_config.world_size = 1
    if cfg.quant_config is not None:
        # weight quantization (DeepSeek-R1's block FP8...) does not change the KV geometry, and vLLM-CPU
        # has no kernel for some of it (FP8 block GEMMs need AMX): the layers are built unquantized
        cfg = copy.deepcopy(cfg) if cfg is vllm_config else cfg
        cfg.quant_config = None
    ctx = cfg.compilation_config.static_forward_context
    before = dict(ctx)
    own_world = not torch.distributed.is_initialized()
    try:
        with set_current_vllm_config(cfg):
            if own_world:
                import socket
                with socket.socket() as sk:
                    sk.bind(("127.0.0.1", 0))
                    port = sk.getsockname()[1]
                ps.init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                                distributed_init_method=f"tcp://127.0.0.1:{port}")
                ps.initialize_model_parallel(1, 1)
            cls, _ = get_model_architecture(cfg.model_config)
            with torch.device("meta"):
                model = cls(vllm_config=cfg, prefix="")
            return fn(model, cfg)
    except Exception as e:
        raise RuntimeError(f"emulate mode could not build {cfg.model_config.model}'s layers on the meta device: "
                           f"{e.__class__.__name__}: {e}") from e
    finally:
        ctx.clear()
        ctx.update(before)
        if own_world:
            ps.destroy_model_parallel()
            ps.destroy_distributed_environment()


def specs_from_vllm_layers(vllm_config) -> dict[str, Any]:
    """The KV-cache specs vLLM's own layers report (model built by :func:`on_meta_model`).

    Every ``AttentionLayerBase`` the model registered is asked ``get_kv_cache_spec``, as
    ``GPUModelRunner.get_kv_cache_spec`` does (vllm/v1/worker/gpu_model_runner.py); layers that share
    another layer's KV are skipped.

    Returns:
        {layer name: KVCacheSpec}, TP1 shapes.

    Raises:
        RuntimeError: as :func:`on_meta_model`.
    """
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase

    def collect(_model, cfg) -> dict[str, Any]:
        specs: dict[str, Any] = {}
        for name, layer in get_layers_from_vllm_config(cfg, AttentionLayerBase).items():
            if getattr(layer, "kv_sharing_target_layer_name", None):
                continue
            if spec := layer.get_kv_cache_spec(cfg):
                specs[name] = spec
        return specs
    return on_meta_model(vllm_config, collect)


def pooling_tasks_from_vllm_model(vllm_config) -> tuple[str, ...]:
    """The pooling tasks (``embed``, ``classify``, ``score``...) vLLM's own pooler for this model
    supports (``model.pooler.get_supported_tasks()``, as ``GPUModelRunner.get_supported_pooling_tasks``)."""
    return tuple(on_meta_model(vllm_config, lambda model, _cfg: list(model.pooler.get_supported_tasks())))


def embedding(token_ids, dim: int, seed: int, dimensions: int | None = None, normalize: bool = True) -> torch.Tensor:
    """A synthetic embedding: deterministic in (token ids, seed), float32, shape (dimensions or dim,).

    Standard normal draws seeded by BLAKE2b(seed, token ids), truncated to ``dimensions`` (matryoshka)
    and L2-normalized unless ``normalize`` is False, as vLLM's embed pooler does with
    ``PoolingParams(dimensions, use_activation)``. The same text gives the same vector for the seed.
    """
    import hashlib
    h = hashlib.blake2b(np.asarray(token_ids, dtype=np.int64).tobytes(), digest_size=8,
                        key=int(seed).to_bytes(8, "little", signed=True))
    v = np.random.default_rng(int.from_bytes(h.digest(), "little")).standard_normal(dim).astype(np.float32)
    if dimensions:
        v = v[:dimensions]
    if normalize:
        v /= max(float(np.linalg.norm(v)), 1e-12)
    return torch.from_numpy(v)


def pool_bytes_per_block(vllm_config, specs: dict[str, Any]) -> int:
    """Bytes one block of vLLM's shared KV pool takes for these layer specs.

    The divisor vLLM itself uses to turn available memory into ``num_gpu_blocks``
    (``get_kv_cache_groups`` then ``_pool_bytes_per_block`` in vllm/v1/core/kv_cache_utils.py):
    the sum of page sizes for a uniform model, the largest group's for a hybrid-allocator model
    (e.g. sliding + full attention in separate groups), so that the emulated pool holds exactly
    the profile's blocks either way.
    """
    from vllm.v1.core import kv_cache_utils as u
    groups = u.get_kv_cache_groups(vllm_config, dict(specs))  # it may unify the dict in place: a copy
    return int(u._pool_bytes_per_block(vllm_config, groups))


class _Step:
    """An executed step waiting for ``sample_tokens``."""

    __slots__ = ("reqs", "end", "so")

    def __init__(self, reqs: list[ScheduledRequest], end: float, so) -> None:
        self.reqs = reqs
        self.end = end
        self.so = so


class EmulatedExecutor(Executor):
    """vLLM Executor that emulates the forward pass from a latency profile.

    Configured by environment variables (see :mod:`emu_executor.settings`).
    Raises at start-up (clear messages, surfaced by vLLM as engine start
    errors): no profile configured, profile unreadable, or unsupported model.
    """

    uses_ray = False
    supports_pp = False

    # ------------------------------------------------------------ set-up
    def _init_executor(self) -> None:
        st = EmuSettings.from_env()
        self.settings = st
        self.profile: Profile | None = None
        if st.step_ms is not None:
            self.oracle: LatencyOracle = ConstantOracle(st.step_ms * 1000.0)
            if st.profile:
                self.profile = Profile.load(st.profile)
        elif st.profile:
            self.profile = Profile.load(st.profile)
            self.oracle = build_oracle(self.profile, st.oracle, seed=st.seed)
        else:
            raise RuntimeError(
                "EmulatedExecutor needs a profile: set EMUGATE_PROFILE to a profile file or a "
                "bundled profile name (or EMUGATE_STEP_MS for a fixed step), or start vLLM with "
                "`python -m emu_executor.serve --profile NAME ...`"
            )
        self.world_size = self.parallel_config.world_size
        self._init_timing()
        from emu_executor.faults import fault_state
        self.faults = fault_state() if os.environ.get("EMUGATE_FAULTS_FILE") else None
        self.requests = RequestTable()
        self.token_state: dict[str, TokenState] = {}
        self.pending: deque[_Step] = deque()
        self.kv_specs = build_kv_cache_spec(self.vllm_config)
        #: step-time factor per adapter active in a step (EMUGATE_LORA_STEP_OVERHEAD; see docs/guides)
        self.lora_overhead = float(os.environ.get("EMUGATE_LORA_STEP_OVERHEAD", "0.05"))
        self.loras: dict[int, Any] = {}  # lora_int_id -> LoRARequest (registered, no weights)
        self.req_lora: dict[str, int] = {}  # request -> its adapter's lora_int_id
        self.spec: SpecEmulation | None = None
        self._drafts: DraftTokenIds | None = None
        if self.speculative_config is not None:
            self.spec = SpecEmulation.from_vllm(self.vllm_config, seed=st.seed)
            logger.info("emugate: %s", self.spec.describe())
        self.pooling_tasks: tuple[str, ...] = ()
        self.pool_inputs: dict[str, tuple[Any, Any]] = {}  # req id -> (prompt token ids, PoolingParams)
        if self.model_config.runner_type == "pooling":
            self.pooling_tasks = pooling_tasks_from_vllm_model(self.vllm_config)
            logger.info("emugate: pooling model: tasks %s, %d-dim synthetic embeddings",
                        ", ".join(self.pooling_tasks), self.model_config.get_hidden_size())
        self.tokens = self._make_tokens()
        self._vocab = self.model_config.get_vocab_size()
        self.num_steps = 0
        if self.profile is not None:
            from profiles.summary import profile_notes
            for line in profile_notes(self.profile):
                (logger.warning if self.profile.meta.get("estimate") else logger.info)("emugate: %s", line)
        if self.profile is not None:
            from emu_executor.fingerprint import compare_fingerprint
            for line in compare_fingerprint(self.profile.fingerprint, self.vllm_config):
                logger.warning("emugate: profile fingerprint differs: %s", line)
        logger.info("emugate: emulated executor ready (oracle=%s, profile=%s, %d KV layers)",
                    self.oracle.name, st.profile, len(self.kv_specs))

    def _init_timing(self) -> None:
        """The device timeline: wall-clock steps, punctual under load (:class:`VirtualDevice`), with
        their lateness exported (:mod:`emu_executor.lateness`). The virtual-time executor overrides it."""
        self._raise_priority(self.settings.boost)
        self.lateness = LatenessStats(stats_path(os.getppid()), warn_ms=self.settings.late_warn_ms)
        self.device = VirtualDevice(on_late=self.lateness.observe)

    @staticmethod
    def _raise_priority(boost: str) -> None:
        """Make the step thread punctual on a busy host (``EMUGATE_BOOST``).

        The emulated device must end steps on time even when the API server
        and load generator saturate every core (2 here). ``rr`` (default):
        SCHED_RR priority 1 for this thread, the step loop, only (it sleeps
        most of the time and spins at most ``timing.SPIN_S`` per step);
        falls back to ``nice`` (-10 for the process), then to nothing, when
        not permitted (both need CAP_SYS_NICE). ``off`` leaves scheduling
        alone. Measured in benchmarks/emulator_timing.py.

        Also shortens the GIL switch interval: vLLM's engine process runs I/O
        threads (ZMQ in, msgpack out) beside the step loop, and with CPython's
        default 5 ms a woken step thread can wait that long for the GIL.
        """
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if boost == "off":
            return
        if boost == "rr":
            try:
                os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(1))
                logger.info("emugate: step thread runs SCHED_RR (priority 1) for step timing")
                return
            except (OSError, AttributeError) as e:
                logger.info("emugate: SCHED_RR not permitted (%s); trying nice -10", e)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, -10)
            logger.info("emugate: engine process nice -10 for step timing")
        except OSError as e:
            logger.info("emugate: could not raise priority (%s); step timing may jitter under CPU load", e)

    def _make_tokens(self) -> SyntheticTokens:
        mc = self.model_config
        vocab = mc.get_vocab_size()
        eos = getattr(mc.hf_config, "eos_token_id", None)
        decode, encode, special = None, None, set()
        try:
            from vllm.tokenizers import cached_tokenizer_from_config
            tok = cached_tokenizer_from_config(mc)
            eos = tok.eos_token_id
            special = set(getattr(tok, "all_special_ids", []) or [])
            decode = lambda i: tok.decode([i])  # noqa: E731
            encode = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
        except Exception as e:  # skip_tokenizer_init or an unusual tokenizer
            logger.warning("emugate: tokenizer unavailable (%s); tokens drawn by id range", e)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        t0 = time.perf_counter()
        out_lens = self.profile.output_lengths if self.profile is not None else None
        tokens = SyntheticTokens(vocab, eos, decode, out_lens, seed=self.settings.seed, special_ids=special,
                                 encode=encode)
        logger.info("emugate: token pool of %d words built in %.2f s", len(tokens.pool), time.perf_counter() - t0)
        return tokens

    # ------------------------------------------------------- RPC surface
    def collective_rpc(self, method: str | Callable, timeout: float | None = None, args: tuple = (),
                       kwargs: dict | None = None, non_block: bool = False, single_value: bool = False):
        """Answer the worker RPCs EngineCore sends (VLLM_NOTES.md lists them) locally."""
        if callable(method):
            raise NotImplementedError("emulate mode has no workers to run callables on")
        fn = getattr(self, f"_rpc_{method}", None)
        if fn is None:
            raise NotImplementedError(f"emulate mode does not support the worker RPC {method!r}")
        result = fn(*args, **(kwargs or {}))
        results = result if single_value else [result] * self.world_size  # one answer per emulated worker
        if non_block:
            f: Future = Future()
            f.set_result(results)
            return f
        return results

    def _rpc_get_kv_cache_spec(self):
        return self.kv_specs

    def _rpc_get_supported_kv_cache_layouts(self):
        return ["LBNHC", "LBHNC"]

    def _rpc_set_kv_cache_layout(self, layout_name: str) -> None:
        return None

    def _rpc_determine_available_memory(self) -> int:
        """Bytes such that vLLM's allocator yields the profile's KV token capacity.

        A cold-start fault (``EMUGATE_STARTUP_S``, :mod:`emu_executor.faults`) sleeps here: on a GPU this is
        when the weights have just been loaded and memory is profiled, inside vLLM's timed engine start-up.
        """
        from emu_executor.faults import cold_start
        cold_start()
        fp = self.profile.fingerprint if self.profile is not None else {}
        blocks, bsize = fp.get("num_kv_blocks"), fp.get("block_size")
        if blocks and bsize:
            tokens = int(blocks) * int(bsize)
        else:
            tokens = int(os.environ.get("EMUGATE_KV_TOKENS", 1 << 20))
        if not self.kv_specs:  # nothing to cache (encoder-only pooling models)
            return 0
        block = self.cache_config.block_size
        n_blocks = max(1, tokens // block)
        logger.info("emugate: KV pool sized to %d blocks of %d tokens (profile: %s x %s)",
                    n_blocks, block, blocks, bsize)
        return n_blocks * pool_bytes_per_block(self.vllm_config, self.kv_specs)

    def _rpc_initialize_from_config(self, kv_cache_configs) -> None:
        return None

    def _rpc_compile_or_warm_up_model(self) -> CompilationTimes:
        return CompilationTimes(language_model=0.0, encoder=0.0)

    def _rpc_get_supported_tasks(self):
        return self.pooling_tasks if self.model_config.runner_type == "pooling" else ("generate",)

    def _rpc_update_max_model_len(self, max_model_len: int) -> None:
        return None

    def _rpc_reset_mm_cache(self) -> None:
        return None

    def _rpc_reset_encoder_cache(self) -> None:
        return None

    def _rpc_get_kv_connector_handshake_metadata(self):
        return {}

    # ------------------------------------------------------------------ LoRA adapters (no weights)
    def _rpc_add_lora(self, lora_request) -> bool:
        """Register an adapter as vLLM's worker would load it: its ``adapter_config.json`` is read and
        checked with vLLM's own ``PEFTHelper`` (rank <= ``max_lora_rank``, no bias...); no weights are
        read. A missing directory or config raises vLLM's ``LoRAAdapterNotFoundError``; an invalid one
        vLLM's ``ValueError``: the same errors, so the API server answers as on a GPU."""
        from vllm.lora.peft_helper import PEFTHelper
        from vllm.lora.utils import get_adapter_absolute_path
        from vllm.lora.worker_manager import LoRAAdapterNotFoundError
        if lora_request.lora_int_id in self.loras:
            return True
        try:
            helper = PEFTHelper.from_local_dir(get_adapter_absolute_path(lora_request.lora_path),
                                               self.model_config.max_model_len)
        except FileNotFoundError as e:
            raise LoRAAdapterNotFoundError(lora_request.lora_name, lora_request.lora_path) from e
        helper.validate_legal(self.lora_config)
        self.loras[lora_request.lora_int_id] = lora_request
        return True

    def _rpc_remove_lora(self, lora_id: int) -> bool:
        return self.loras.pop(lora_id, None) is not None

    def _rpc_pin_lora(self, lora_id: int) -> bool:
        return lora_id in self.loras

    def _rpc_list_loras(self) -> set[int]:
        return set(self.loras)

    def _rpc_take_draft_token_ids(self):
        return self.take_draft_token_ids()

    def _rpc_supports_draft_weight_updates(self) -> bool:
        return False

    def _rpc_shutdown(self) -> None:
        return None

    def _rpc_profile(self, *a, **k) -> None:
        return None

    def _rpc_sleep(self, level: int = 1) -> None:
        return None

    def _rpc_wake_up(self, tags=None) -> None:
        return None

    def check_health(self) -> None:
        return None

    @classmethod
    def supports_async_scheduling(cls) -> bool:
        return True

    def take_draft_token_ids(self) -> DraftTokenIds | None:
        """The drafts proposed in the last step (sync scheduling reads them; async scheduling uses
        placeholders and never asks): k ordinary-token ids per decoding request, as a drafter would
        propose. Their values do not matter to emulation (acceptance is drawn, :mod:`specdecode`)."""
        d, self._drafts = self._drafts, None
        return d

    def shutdown(self) -> None:
        self.lateness.close()
        if self.settings.timing_log:
            with open(self.settings.timing_log, "a") as f:
                f.write("".join(f"timer {x * 1e6:.1f}\n" for x in self.device.timer_late_s))
                f.write("".join(f"consumer {x * 1e6:.1f}\n" for x in self.device.consumer_late_s))

    # ------------------------------------------------------------ steps
    def execute_model(self, scheduler_output, non_block: bool = False):
        """Put the step on the virtual device; return None (output via sample_tokens), or for a
        pooling model the step's output itself (as vLLM's GPU runner: pooling does not sample).

        A step with no scheduled tokens returns vLLM's empty output at once.
        """
        so = scheduler_output
        for rid in so.finished_req_ids:
            self.token_state.pop(rid, None)
            self.pool_inputs.pop(rid, None)
            self.req_lora.pop(rid, None)
        reqs = self.requests.update(so)
        for nr in so.scheduled_new_reqs:
            if nr.req_id not in self.token_state and nr.sampling_params is not None:
                self.token_state[nr.req_id] = self.tokens.new_request(nr.sampling_params, nr.prompt_token_ids)
            elif getattr(nr, "pooling_params", None) is not None:
                self.pool_inputs[nr.req_id] = (nr.prompt_token_ids, nr.pooling_params)
            lr = getattr(nr, "lora_request", None)
            if lr is not None:
                self._rpc_add_lora(lr)  # the runner loads an adapter a request names on first use
                self.req_lora[nr.req_id] = lr.lora_int_id
        if so.total_num_scheduled_tokens == 0:
            out = EMPTY_MODEL_RUNNER_OUTPUT
        else:
            f = step_features(reqs)
            latency_us = self.oracle.sample_us(f)
            if self.req_lora and self.lora_overhead:
                active = len({self.req_lora[r.req_id] for r in reqs if r.req_id in self.req_lora})
                latency_us *= 1.0 + self.lora_overhead * active
            if self.spec is not None and self.spec.draft_cost:
                # drafting k tokens for the next step: k draft-model forwards (specdecode module docstring)
                latency_us *= 1.0 + self.spec.k * self.spec.draft_cost
            gap_us = self.oracle.sample_gap_us(f)
            if self.faults is not None:
                self.faults.admitted(len(so.scheduled_new_reqs))
                latency_us *= self.faults.latency_factor()
            self.pending.append(_Step(reqs, self.device.submit(latency_us * 1e-6, gap_us * 1e-6), so))
            self.num_steps += 1
            if self.pooling_tasks:  # pooling runners answer from execute_model (EngineCore never samples)
                return self.sample_tokens(None, non_block)
            out = None
        if non_block:
            f: Future = Future()
            f.set_result(out)
            return f
        return out

    def sample_tokens(self, grammar_output, non_block: bool = False):
        """Synthetic tokens for the oldest executed step, available at its end time."""
        step = self.pending.popleft()
        output = self._make_output(step, grammar_output)
        if self.faults is not None and self.faults.hung():
            from emu_executor.faults import wait_while_hung
            wait_while_hung(self.faults)  # the device is stuck: the engine loop waits here, as on a hung kernel
            step.end = max(step.end, time.perf_counter())
            self.device.last_end = max(self.device.last_end, step.end)
        if non_block:
            return TimedFuture(step.end, lambda: output, self.device)
        self.device.record(wait_until(step.end))
        return output

    def _make_output(self, step: _Step, grammar_output) -> ModelRunnerOutput:
        allowed_rows: dict[str, np.ndarray] = {}
        if grammar_output is not None and len(grammar_output.structured_output_request_ids):
            rows = bitmask_rows(grammar_output.grammar_bitmask, self._vocab)
            for i, rid in enumerate(grammar_output.structured_output_request_ids):
                allowed_rows[rid] = rows[i]
        req_ids: list[str] = []
        sampled: list[list[int]] = []
        prompt_logprobs: dict = {}
        pooled: list[torch.Tensor | None] | None = [] if self.pool_inputs else None
        width = 0
        for r in step.reqs:
            req_ids.append(r.req_id)
            if pooled is not None:
                pooled.append(self._pooled(r))
            st = self.token_state.get(r.req_id)
            if st is not None and st.prompt_ids is not None and r.num_computed + r.num_scheduled >= r.prompt_len:
                prompt_logprobs[r.req_id] = self._prompt_logprobs(st)
            if not r.due or st is None:
                sampled.append([])
                continue
            toks = [self.tokens.next_token(st, r.num_output_tokens, allowed_rows.get(r.req_id))]
            if r.num_spec and self.spec is not None:  # accepted drafts, then the bonus token
                for j in range(1, 1 + self.spec.accepted(r.num_spec)):
                    if toks[-1] == self.tokens.eos_id:
                        break
                    toks.append(self.tokens.next_token(st, r.num_output_tokens + j))
            sampled.append(toks)
            if st.num_logprobs is not None:
                width = max(width, st.num_logprobs + 1)
        logprobs = self._logprobs(req_ids, sampled, width) if width else None
        if self.spec is not None and not self.scheduler_config.async_scheduling:
            filler = int(self.tokens.pool[0])
            ids = [rid for rid, toks in zip(req_ids, sampled) if toks and toks[-1] != self.tokens.eos_id]
            self._drafts = DraftTokenIds(ids, [[filler] * self.spec.k for _ in ids])
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, logprobs=logprobs, prompt_logprobs_dict=prompt_logprobs,
                                 pooler_output=pooled)

    def _pooled(self, r: ScheduledRequest) -> torch.Tensor | None:
        """A pooling request's output in the step that completes its prompt (:func:`embedding`), else None."""
        inp = self.pool_inputs.get(r.req_id)
        if inp is None or not r.due:
            return None
        ids, pp = inp
        return embedding(ids, self.model_config.get_hidden_size(), self.settings.seed,
                         getattr(pp, "dimensions", None), getattr(pp, "use_activation", None) is not False)

    def _prompt_logprobs(self, st) -> LogprobsTensors:
        """The whole prompt's logprobs, once, in the step that completes its prefill (as vLLM's GPU runner)."""
        ids, lps, ranks = self.tokens.prompt_logprob_rows(st)
        st.prompt_ids = None  # sent: never again, even if the request is preempted and recomputed
        return LogprobsTensors(torch.from_numpy(ids), torch.from_numpy(lps), torch.from_numpy(ranks))

    def _logprobs(self, req_ids: list[str], sampled: list[list[int]], width: int) -> LogprobsLists:
        """Sampled-token logprob rows, ``width`` wide (the sampled token, then the top ones).

        One row per request when every request emits at most one token (vLLM's layout without
        speculative decoding); with speculative decoding one row per emitted token, requests one after
        the other, and ``cu_num_generated_tokens`` the row where each request starts, as vLLM's GPU
        runner lays them out (``LogprobsLists.slice_request``, vllm/v1/outputs.py).
        """
        if self.spec is None:
            ids = np.zeros((len(req_ids), width), dtype=np.int32)
            lps = np.zeros((len(req_ids), width), dtype=np.float32)
            for i, (rid, toks) in enumerate(zip(req_ids, sampled)):
                if toks:
                    row_ids, row_lps = self.tokens.logprob_row(self.token_state.get(rid), toks[0], width)
                    ids[i], lps[i] = row_ids, row_lps
            return LogprobsLists(ids, lps, np.ones(len(req_ids), dtype=np.int32), None)
        starts = [0]
        for toks in sampled:
            starts.append(starts[-1] + len(toks))
        ids = np.zeros((starts[-1], width), dtype=np.int32)
        lps = np.zeros((starts[-1], width), dtype=np.float32)
        for i, (rid, toks) in enumerate(zip(req_ids, sampled)):
            st = self.token_state.get(rid)
            for j, tok in enumerate(toks):
                ids[starts[i] + j], lps[starts[i] + j] = self.tokens.logprob_row(st, tok, width)
        return LogprobsLists(ids, lps, np.ones(starts[-1], dtype=np.int32), starts)
