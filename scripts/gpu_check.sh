#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py, docs/gpu.md). Where forgetless' own needs are missing
# (a GPU machine with no network), the wheels fetched by scripts/gpu_wheels.sh into .whl/ are
# installed first, into a private folder.
#   bash scripts/gpu_check.sh --out gpu_results                      # full, on one GPU
#   bash scripts/gpu_check.sh --device cpu --quick --out /tmp/check  # CPU, for CI
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c "import pydantic, datasets" 2>/dev/null; then
    compgen -G ".whl/*.whl" >/dev/null || { echo "error: pydantic or datasets is missing and .whl/ holds no wheels; run scripts/gpu_wheels.sh where there is network" >&2; exit 2; }
    site="${TMPDIR:-/tmp}/forgetless-gpu-check-site"
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The working tree's forgetless, installed or not.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec python3 scripts/gpu_check.py "$@"
