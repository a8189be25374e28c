#!/usr/bin/env bash
# Install fgattn (editable) with the tuner, test and diffusers extras into the current Python, keeping what is
# already there: a torch or triton you have is never replaced (when missing: a CPU torch 2.13.0 and triton
# 3.6.0, so that pip does not pull a multi-GB CUDA build on a CPU machine), and pip runs only when this
# checkout is not installed yet or a dependency is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -c "import torch" 2>/dev/null || python3 -m pip install -q torch==2.13.0
python3 -c "import triton" 2>/dev/null || python3 -m pip install -q triton==3.6.0
missing=$(python3 scripts/missing_requirements.py tune test diffusers)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    python3 -m pip install -q $missing
fi
python3 -c "import fgattn_gen, pathlib, sys; sys.exit(pathlib.Path(fgattn_gen.__file__).resolve().parent != pathlib.Path('fgattn_gen').resolve())" \
    2>/dev/null || python3 -m pip install -q --no-deps --no-build-isolation -e .
