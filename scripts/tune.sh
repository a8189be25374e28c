#!/usr/bin/env bash
# The main job: install, then tune the gather-load kernels for a model on this machine's GPU.
#   bash scripts/tune.sh --model hunyuan
# Without CUDA, fgattn-tune says so; add --interpret for a CPU run of the pipeline on a scaled-down shape
# (written to tuned-interpret/, not the shipped tuned/).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
fgattn-tune "$@"
