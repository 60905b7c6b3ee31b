#!/usr/bin/env bash
# Run dicesim as P ranks on this machine:
#   launch/torchrun.sh P [hydra overrides...]
#   launch/torchrun.sh 4 nodes=16 steps=200
# Uses $PYTHON, else the repository's .venv/bin/python, else python3.
# It goes through dicesim's launcher (python -m dicesim.launch torchrun): the configuration
# is checked once before any rank starts (a bad setting: one line, exit 2), a failing rank
# ends the run with one line (exit 3 peer failure, 4 diverged, 130/143 interrupted), and
# no rank outlives it. See docs/failures.md.
set -euo pipefail

if [ $# -lt 1 ] || ! [[ $1 =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: launch/torchrun.sh PROCS [hydra overrides...]  (PROCS: a positive integer)" >&2
    exit 2
fi
procs=$1
shift

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

exec "$PYTHON" -m dicesim.launch torchrun --procs "$procs" --python "$PYTHON" -- "$@"
