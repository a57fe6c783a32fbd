"""Platform plugin (entry point group ``vllm.platform_plugins``): emulate mode only.

On a CPU-only host vLLM picks its CPU platform, which forces async
scheduling off and sets CPU defaults (block_size 128, max_num_batched_tokens
2048, max_num_seqs 128 per TP rank; VLLM_NOTES.md). An emulated H100 must be
scheduled like an H100, so when emulate mode is on (``EMUGATE_PROFILE`` or
``EMUGATE_STEP_MS`` set, see :mod:`emu_executor.settings`) this plugin
returns :class:`EmulatedPlatform`: the CPU platform (host tensors still live
on the CPU) whose config hook then restores what the profile's fingerprint
recorded, unless the user set it on the command line:

* ``async_scheduling``    -> fingerprint (default True, vLLM's CUDA default), unless set
  on the command line or vLLM on a GPU would leave it off (pooling models,
  n-gram speculative decoding: :func:`_gpu_disables_async`)
* ``block_size``          -> fingerprint (default 16) unless ``--block-size``
* ``max_num_batched_tokens`` / ``max_num_seqs`` -> fingerprint when they are
  still the CPU defaults (default 8192 / 1024, vLLM's H100/H200 serve defaults)
* MLA models: chunked prefill and prefix caching stay as configured (the CPU
  platform turns them off for its CPU_MLA kernels; a GPU does not)

It logs every value it sets. Without the environment variables the plugin
returns None and vLLM behaves exactly as installed.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from emu_executor.settings import EmuSettings

logger = logging.getLogger("vllm.emugate.platform")

#: What the emulated scheduler uses when the profile's fingerprint lacks a
#: key: vLLM 0.32's CUDA defaults for an H100/H200 OpenAI server.
GPU_DEFAULTS = {"async_scheduling": True, "block_size": 16,
                "max_num_batched_tokens": 8192, "max_num_seqs": 1024}


def register() -> str | None:
    """Entry point: the platform qualname in emulate mode, else None.

    In emulate mode it also registers the step-lateness collector in this process's
    prometheus registry (the API server serves it on /metrics; see
    :mod:`emu_executor.lateness`).
    """
    if not EmuSettings.from_env().active:
        return None
    from emu_executor.lateness import register_collector
    register_collector()
    return "emu_executor.platform.EmulatedPlatform"


def _fingerprint() -> dict:
    st = EmuSettings.from_env()
    if not st.profile:
        return {}
    from profiles.assets import resolve_profile
    from profiles.format import read_header
    path = resolve_profile(st.profile)
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    return read_header(head, str(Path(path))).get("fingerprint", {})


def _cli_async_flag() -> bool | None:
    """``--async-scheduling`` / ``--no-async-scheduling`` as given on the server's command line, else None.

    vLLM has already resolved an unset flag when the platform hook runs (so the config cannot tell a
    user's choice from its default); the API server's argv can. The answer is kept in
    ``EMUGATE_ASYNC_FLAG`` so that the engine-core process vLLM spawns (other argv) sees the same.
    """
    v = os.environ.get("EMUGATE_ASYNC_FLAG")
    if v is None:
        argv = sys.argv[1:]
        v = "on" if "--async-scheduling" in argv else "off" if "--no-async-scheduling" in argv else ""
        os.environ["EMUGATE_ASYNC_FLAG"] = v
    return {"on": True, "off": False}.get(v)


def _gpu_disables_async(vllm_config) -> str | None:
    """Why vLLM 0.32 on a GPU would leave async scheduling off by default for this config, or None.

    Mirrors ``VllmConfig.__post_init__`` (vllm/config/vllm.py) for an unset ``async_scheduling``:
    pooling models, and speculative decoding other than EAGLE/MTP, draft-model, n-gram-GPU, DSpark
    and DFlash (the CPU n-gram proposer needs sync scheduling).
    """
    from typing import get_args
    mc, spec = vllm_config.model_config, vllm_config.speculative_config
    if mc is not None and mc.runner_type == "pooling":
        return "pooling model"
    if spec is not None:
        from vllm.config.speculative import EagleModelTypes, NgramGPUTypes
        ok = set(get_args(EagleModelTypes)) | set(get_args(NgramGPUTypes)) | {"draft_model", "dspark", "dflash"}
        if spec.method not in ok:
            return f"{spec.method} speculative decoding"
        if spec.disable_padded_drafter_batch:
            return "disable_padded_drafter_batch"
    return None


def _make_platform():
    from vllm.platforms.cpu import CpuPlatform

    class EmulatedPlatform(CpuPlatform):
        """CPU platform whose scheduler settings come from the profiled hardware."""

        @classmethod
        def check_and_update_config(cls, vllm_config) -> None:
            sc, cc, pc = vllm_config.scheduler_config, vllm_config.cache_config, vllm_config.parallel_config
            user_block = cc.user_specified_block_size
            user_block_size = cc.block_size
            # the CPU platform turns chunked prefill and prefix caching off for MLA models (CPU_MLA
            # lacks them, vllm/platforms/cpu.py); the GPU keeps them, so the emulated engine does
            chunked, caching, mnbt = sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens
            # vLLM-CPU forces float32 SSM state for its GDN kernel (vllm/platforms/cpu.py); a GPU keeps the
            # configured dtype ("auto": the model's), which sets the state page and so the KV pool
            ssm_dtype = getattr(cc, "mamba_ssm_cache_dtype", None)
            super().check_and_update_config(vllm_config)
            if ssm_dtype is not None and cc.mamba_ssm_cache_dtype != ssm_dtype:
                cc.mamba_ssm_cache_dtype = ssm_dtype
                logger.info("emugate platform: mamba_ssm_cache_dtype=%s kept (as on a GPU)", ssm_dtype)
            mc = vllm_config.model_config
            restored_mla = mc is not None and mc.use_mla and (
                sc.enable_chunked_prefill, cc.enable_prefix_caching) != (chunked, caching)
            if restored_mla:
                sc.enable_chunked_prefill, cc.enable_prefix_caching, sc.max_num_batched_tokens = chunked, caching, mnbt
            fp = {**GPU_DEFAULTS, **{k: v for k, v in _fingerprint().items() if k in GPU_DEFAULTS}}
            tp = pc.tensor_parallel_size * pc.pipeline_parallel_size
            set_ = [f"enable_chunked_prefill={chunked}, enable_prefix_caching={caching} (MLA, as on a GPU)"] \
                if restored_mla else []
            off = _gpu_disables_async(vllm_config)
            user_async = _cli_async_flag()
            if user_async is not None:
                sc.async_scheduling = user_async
                set_.append(f"async_scheduling={sc.async_scheduling} (command line)")
            elif off:
                sc.async_scheduling = False
                set_.append(f"async_scheduling=False ({off}, as vLLM decides on a GPU)")
            else:
                sc.async_scheduling = bool(fp["async_scheduling"])
                set_.append(f"async_scheduling={sc.async_scheduling}")
            if user_block:
                cc.block_size = user_block_size
            else:
                cc.block_size = int(fp["block_size"])
                set_.append(f"block_size={cc.block_size}")
            if sc.max_num_batched_tokens == 2048 * tp:
                sc.max_num_batched_tokens = int(fp["max_num_batched_tokens"])
                set_.append(f"max_num_batched_tokens={sc.max_num_batched_tokens}")
            if sc.max_num_seqs == 128 * tp:
                sc.max_num_seqs = int(fp["max_num_seqs"])
                set_.append(f"max_num_seqs={sc.max_num_seqs}")
            if os.environ.get("EMUGATE_FAULTS_FILE") and sc.scheduler_cls is None:
                # the KV-pressure fault lives in the scheduler (emu_executor/faults.py): vLLM's --scheduler-cls
                sc.scheduler_cls = ("emu_executor.faults.FaultAsyncScheduler" if sc.async_scheduling
                                    else "emu_executor.faults.FaultScheduler")
                set_.append(f"scheduler_cls={sc.scheduler_cls}")
            logger.info("emugate platform: scheduler configured as profiled: %s", ", ".join(set_))

    return EmulatedPlatform


def __getattr__(name: str):
    # vLLM resolves the qualname after its platform module is importable;
    # build the subclass lazily so importing this module never imports vLLM.
    if name == "EmulatedPlatform":
        cls = _make_platform()
        globals()[name] = cls
        return cls
    raise AttributeError(name)
