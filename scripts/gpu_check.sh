#!/usr/bin/env bash
# Everything only a GPU can show, in one command for the lent GPU machine (device tool):
#   build the CPU and CUDA extensions, run the whole test suite on the GPU (bf16 checks included),
#   run the GPU benchmarks, write raw JSON + logs under $OUT, print a short table last.
# Usage (from the repo root on the GPU machine):  OUT=/some/dir bash scripts/gpu_check.sh [--quick]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
QUICK=${1:-}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (CPU + CUDA extensions)"
start=$(date +%s)
MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
  $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
build_rc=$?
echo "build rc=$build_rc in $(( $(date +%s) - start )) s (log: build.log)"
[ $build_rc -eq 0 ] || tail -40 "$OUT/build.log"
$PY -c "import mimic_fast as mf; print(mf.dispatch.format_info())" | tee "$OUT/info.txt"

echo "== tests on the GPU"
start=$(date +%s)
timeout ${TEST_TIMEOUT:-240} $PY -m pytest tests -q -x -p no:cacheprovider --junitxml="$OUT/tests.xml" \
  > "$OUT/tests.log" 2>&1
test_rc=$?
echo "tests rc=$test_rc in $(( $(date +%s) - start )) s"
tail -25 "$OUT/tests.log"

echo "== benchmarks"
timeout ${BENCH_TIMEOUT:-300} $PY benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" $QUICK \
  > "$OUT/bench.log" 2>&1
bench_rc=$?
echo "bench rc=$bench_rc"
echo
echo "== summary: build rc=$build_rc, tests rc=$test_rc, bench rc=$bench_rc"
tail -40 "$OUT/bench.log"
