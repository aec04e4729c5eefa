#!/usr/bin/env bash
# The main job: set up (if needed), then the mimic-learning demo on the bundled digits dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/mimic-fast demo "$@"
