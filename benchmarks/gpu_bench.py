#!/usr/bin/env python
"""GPU benchmark of mimic_fast in one command (about 8 minutes on an H100 by default):

    pip install --no-build-isolation -e .      # builds the CUDA extension when torch has CUDA
    python benchmarks/gpu_bench.py --out benchmarks/results/gpu_h100.json

mimic_loss forward/backward/full step (B=4096, D=1845, k=250/256, C=183, H=8000/32768/400000, bf16)
for triton, cuda, the chunked reference, eager and torch.compile(max-autotune); the CUDA loss kernels'
bandwidth against a device copy; student vs teacher. Each provider is checked before it is timed,
a failing one is recorded with its error, the JSON is rewritten after every case, and a short table
is printed last. `--dry-run` checks the logic on a CPU; `--help` lists sizes, budget and providers.
"""
import os
import sys

# The Triton interpreter is for CPU tests; timing it would be meaningless.
if os.environ.pop("TRITON_INTERPRET", None) is not None:
    print("gpu_bench: ignoring TRITON_INTERPRET (kernels run compiled)", file=sys.stderr)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mimic_fast.bench.gpu import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
