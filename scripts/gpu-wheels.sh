#!/usr/bin/env bash
# The wheels bench/gpu.py needs on a GPU machine that has Python 3.12, torch, accelerate and the usual
# scientific packages but no internet (this project's lent GPU machines): this project itself, and the
# dependencies such an image lacks, in the versions CI tests, into .whl/ (ignored by git; about 3 MiB).
# Run here, with the README's set-up done; then, there, with .whl carried beside the checkout:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
#   python3 bench/gpu.py --section-out "$OUT/gpu.md"
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
rm -rf .whl
mkdir .whl
version() { python -c "from importlib.metadata import version; print(version('$1'))"; }
# pure Python: built here (DeepSpeed publishes only a source archive; its ops compile at run time)
DS_BUILD_OPS=0 pip wheel -q --no-deps --no-build-isolation -w .whl . "deepspeed==$(version deepspeed)"
packages=()
for package in webdataset braceexpand pydantic pydantic_core annotated-types typing-inspection hjson; do
    packages+=("$package==$(version "$package")")
done
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${packages[@]}"
ls .whl
