#!/usr/bin/env bash
# Idempotent set-up: a .venv with the CPU build of torch 2.13.0 (from the local wheel; an unpinned
# torch would download gigabytes of CUDA), triton 3.6 (the interpreter runs the kernels' tests on
# CPU), and this package built in place with its C++ CPU extension, test and export extras.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
pip install --upgrade pip "setuptools>=70" wheel
pip install torch==2.13.0 triton==3.6.0 ninja
# --no-build-isolation: build against the torch installed above, never a freshly downloaded one.
MAX_JOBS=${MAX_JOBS:-2} pip install --no-build-isolation -e ".[test,export]"
