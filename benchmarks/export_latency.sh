#!/usr/bin/env bash
# README's export-latency table: untrained students (the demo's 64 -> 32L-2048 -> 10 and the paper's
# 1845 -> 250L-8k -> 183) saved as model files, exported to ONNX and torch.export, each timed beside
# the fused student by `mimic-fast export --latency --threads 1`, RUNS times (the table gives the range).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-2}
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
.venv/bin/python - "$work" <<'PY'
import sys

import torch

from mimic_fast import files
from mimic_fast.nn import WideShallowStudent

torch.manual_seed(0)
for name, (D, C, H, k) in {"demo": (64, 10, 2048, 32), "paper": (1845, 183, 8000, 250)}.items():
    kwargs = dict(in_features=D, num_classes=C, hidden=H, bottleneck=k)
    files.save_model(f"{sys.argv[1]}/{name}.pt", WideShallowStudent(**kwargs),
                     {"class": "WideShallowStudent", "kwargs": kwargs})
PY
for run in $(seq "$RUNS"); do
  for name in demo paper; do
    for fmt in onnx:onnx torch-export:pt2; do
      echo "== run $run: $name, ${fmt%%:*} (load $(cut -d' ' -f1-3 /proc/loadavg))"
      .venv/bin/mimic-fast export --model "$work/$name.pt" --format "${fmt%%:*}" \
        --out "$work/$name.${fmt##*:}" --overwrite --latency --threads 1 | grep "batch"
    done
  done
done
