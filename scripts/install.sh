#!/usr/bin/env bash
# Install fgattn and its test dependencies into the current Python. torch and triton are pinned first
# when missing, so that pip does not pull a multi-GB CUDA build of torch on a CPU machine and the CPU
# interpreter runs the Triton it was tested with (a CUDA torch/triton you already have is kept).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import triton" 2>/dev/null || python3 -m pip install -q triton==3.6.0
python3 -m pip install -q -e ".[test,diffusers]"
