#!/usr/bin/env bash
# The GPU check on a bare GPU machine, from the source tree (docs/gpu.md):
#   scripts/gpu_check.sh RESULTS_DIR [--tiny] [--budget-s S] [--phases ...]
# Installs the wheels of GPU_CHECK_WHEELS (default: .whl/, made by `make gpu-wheels`) into a scratch
# folder with --no-deps (the machine's torch, lightning, transformers stay as they are), puts it and the
# repository on PYTHONPATH, and runs benchmarks/gpu_check.py. Writes RESULTS_DIR/gpu_check.{json,md}.
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: scripts/gpu_check.sh RESULTS_DIR [--tiny] [--budget-s S] [--phases ...]" >&2
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-$ROOT/.whl}
SITE=${GPU_CHECK_SITE:-/tmp/layermoe-gpu-site}
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "${wheels[@]}"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
    echo "gpu_check: no wheels in $WHEELS (make gpu-wheels); bitsandbytes and jsonargparse as installed" >&2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$PYTHON" "$ROOT/benchmarks/gpu_check.py" "$@"
