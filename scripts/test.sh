#!/usr/bin/env bash
# The test suite: set up (if needed), then pytest (Triton kernels run under TRITON_INTERPRET=1 on CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
