#!/usr/bin/env bash
# Device check of the CUDA fp8 statistics kernel (templates/cuda/block_stat_fp8.cu) on a Hopper GPU: its GPU
# tests (and the predictor GPU tests that go through it), then the timings of bench/stats_cuda_check.py
# (Triton vs CUDA statistics pass, exact_mask refresh vs sdpa-cudnn, S = 32,760, H = 24, D = 128).
# Usage: bash bench/stats_cuda_check.sh [--no-tests]
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
status=0
if [[ "${1:-}" != "--no-tests" ]]; then
  # timeouts: a pipeline bug shows as a hang (mbarrier / named-barrier wait), not an error
  timeout 240 python3 -m pytest -q -x tests/test_block_stat_cuda.py || status=1
  timeout 240 python3 -m pytest -q tests/test_predictors.py -k "gpu_exact_mask or no_host_sync or block_stat" || status=1
fi
timeout 300 python3 bench/stats_cuda_check.py || status=1
exit $status
