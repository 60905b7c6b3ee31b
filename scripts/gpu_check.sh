#!/usr/bin/env bash
# The CUDA/NCCL path in one go, one line per check (docs/running.md, "Checking a GPU machine"):
#   bash scripts/gpu_check.sh            # every check; those needing GPUs say "skipped" without
#   bash scripts/gpu_check.sh --only parity-1gpu
# Exit 0 when no check printed FAIL. PYTHON picks the interpreter (default: .venv/bin/python
# if present, else python).
set -u
cd "$(dirname "$0")/.."
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python; fi
fi
exec "$PYTHON" scripts/gpu_check.py "$@"
