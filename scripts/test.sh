#!/usr/bin/env bash
# The test command (CI runs this): install, then the whole suite. On a machine without CUDA the Triton
# kernels run in Triton's CPU interpreter and tests marked `gpu` are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m pytest -q tests "$@"
