#!/usr/bin/env bash
# Everything only a GPU can show, for the lent GPU machine (device tool), in stages that each fit
# one 10-minute command (the build stays on a warm machine between calls):
#   OUT=/dir bash scripts/gpu_check.sh build   # CPU + CUDA extensions (setup.py build_ext --inplace)
#   OUT=/dir bash scripts/gpu_check.sh test    # the whole test suite on the GPU (bf16 checks included)
#   OUT=/dir bash scripts/gpu_check.sh bench   # benchmarks/gpu_bench.py -> $OUT/gpu_bench.json
#   OUT=/dir bash scripts/gpu_check.sh all     # the three in a row (build is skipped when up to date)
# Logs and raw JSON go under $OUT; a short table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PYTHON:-python3}
STAGE=${1:-all}
shift || true
rc_build=- rc_test=- rc_bench=-

build() {
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/nvidia_smi.txt"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  local start=$(date +%s)
  MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
    $PY setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1
  rc_build=$?
  echo "build rc=$rc_build in $(( $(date +%s) - start )) s (log: build.log)"
  [ "$rc_build" -eq 0 ] || tail -40 "$OUT/build.log"
  $PY -c "import mimic_fast as mf; print(mf.dispatch.format_info())" | tee "$OUT/info.txt"
}

run_tests() {
  local start=$(date +%s)
  timeout "${TEST_TIMEOUT:-540}" $PY -m pytest tests -q -p no:cacheprovider --maxfail=30 \
    --junitxml="$OUT/tests.xml" "$@" > "$OUT/tests.log" 2>&1
  rc_test=$?
  echo "tests rc=$rc_test in $(( $(date +%s) - start )) s (log: tests.log)"
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -30
  tail -3 "$OUT/tests.log"
}

run_bench() {
  timeout "${BENCH_TIMEOUT:-540}" $PY benchmarks/gpu_bench.py --out "$OUT/gpu_bench.json" "$@" \
    > "$OUT/bench.log" 2>&1
  rc_bench=$?
  echo "bench rc=$rc_bench (log: bench.log)"
  tail -60 "$OUT/bench.log"
}

case "$STAGE" in
  build) build ;;
  test) run_tests "$@" ;;
  bench) run_bench "$@" ;;
  all) build; run_tests; run_bench ;;
  *) echo "usage: OUT=DIR bash scripts/gpu_check.sh build|test|bench|all [extra args]" >&2; exit 2 ;;
esac
echo "== summary: build rc=$rc_build, tests rc=$rc_test, bench rc=$rc_bench"
