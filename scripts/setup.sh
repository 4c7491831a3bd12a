#!/usr/bin/env bash
# Create .venv (once) and install the project with its dev, demo and eval extras into it.
# torch: an importable torch (a cluster's CUDA build, say) is kept; otherwise $TORCH_SPEC is
# installed, by default the CPU build 2.13.0 (elsewhere set, for example,
# TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cpu").
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    "${PYTHON:-python3}" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import torch" 2>/dev/null; then
    # shellcheck disable=SC2086  # TORCH_SPEC may hold several words (an index URL)
    python -m pip install -q ${TORCH_SPEC:-torch==2.13.0}
fi
python -m pip install -q -e ".[dev,demo,eval,ray,bench,trackers,diffusers]"
