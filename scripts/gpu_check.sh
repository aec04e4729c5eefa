#!/usr/bin/env bash
# Everything only a GPU can show, as ONE command of at most 6 minutes (the lent GPU machine takes
# commands of 10 minutes and is bare each time; 6 leave room for a rerun), most important facts first:
#
#   OUT=/dir bash scripts/gpu_check.sh            # on the GPU machine
#   bash scripts/gpu_check.sh --dry-run           # on any CPU (CI): the script cannot rot between runs
#
# stage (cap, s)          what                                                      writes under $OUT
#  1 probe      (20)      GPU name/SMs/L2/clocks, versions, the ATen calls csrc/cuda  env.json
#                         relies on (mm/addmm out_dtype, _addmm_activation, graphs)
#  2 headline   (150)     bf16 training step at B=4096 H=400000 and 8000, triton vs  headline.json, bench.log
#                         eager (and cuda if already built), bf16 matmul peak + copy
#                         bandwidth of the same run, triton's per-kernel split beside
#                         the cost model at those rates (measured / predicted), first
#                         call's compile + autotune time (scripts/triton_headline.py)
#  3 build      (bg, 240) setup.py build_ext --inplace, sm_90 only, started after the build.log
#                         headline and under `nice`, so it never competes with it
#  4 triton     (90)      Triton bf16 correctness, mimic_loss + bottleneck_mlp fwd/bwd tests.log
#                         at the mid and paper shapes (2x rule vs float64): -k gpu_check
#  5 bench      (what is  triton/cuda/reference/eager interleaved, then torch.compile bench.json, bench.log
#               left)     max-autotune; forward + full step at B=4096 H=8000/400000;
#                         profiler per-kernel split, peak memory, cost model and
#                         roofline beside each figure, mm peak + copy bandwidth before/after
#  6 student    (40)      250L-8k vs DNN 2k-2k-2k, 250L-400k vs the CNN ensemble     student.json, bench.log
#  7 cuda       (60)      tests/test_cuda_backend.py (once the build is done)       tests.log
#  8 rest       (left)    the remaining Triton GPU tests, then the rest of tests/,  tests.log
#                         60 s per test, until the deadline (GPU_CHECK_SECONDS, 360)
#  summary.txt: the stage table, the headline and the benchmark's short table, rewritten after every
#  stage and printed last. 8 files in all (the GPU machine returns at most 8, two folders deep).
# Each stage has its own timeout, so a hung stage costs only itself (a timed-out test stage says so
# and how far it got); the pytest stages run without -x so every failure shows. The dry run checks,
# on CPU: every test file / -k selector / pytest option named here selects at least one test
# (pytest --collect-only), the probe, the headline and the benchmark harness run end to end at tiny
# shapes, and $OUT holds at most 8 files, at most two folders deep.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-python3}
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
if [ $# -gt 0 ] && [ "$DRY" = 0 ]; then
  echo "usage: OUT=DIR bash scripts/gpu_check.sh [--dry-run]" >&2
  exit 2
fi
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp -d)}
else
  OUT=${OUT:-$ROOT/gpu_out}
fi
mkdir -p "$OUT"
WORK=$(mktemp -d)  # scratch (build status) kept out of $OUT: its file count is limited
export PYTHONUNBUFFERED=1 PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
[ "$DRY" = 1 ] || unset TRITON_INTERPRET

DEADLINE=${GPU_CHECK_SECONDS:-360}
PER_TEST_TIMEOUT=60
# ---- what the stages select (the dry run proves each one matches at least one test) -------------
TRITON_FILES=(tests/test_triton_gpu.py tests/test_triton_backend.py)
TRITON_K="gpu_check and bf16"
# the dry run also wants each of these word pairs together in one test id of stage 3, so that no op
# or shape silently drops out of it (ids as in test_gpu_check_mimic_loss[bf16-paper])
TRITON_EACH=("mimic_loss mid" "mimic_loss paper" "bottleneck_mlp mid" "bottleneck_mlp paper")
CUDA_FILES=(tests/test_cuda_backend.py)
REST_TRITON_K="not gpu_check"
# test_gpu_check.py is this script's own dry run: not worth GPU minutes
REST_ARGS=(tests --ignore=tests/test_triton_gpu.py --ignore=tests/test_triton_backend.py
           --ignore=tests/test_cuda_backend.py --ignore=tests/test_cuda_compile.py
           --ignore=tests/test_gpu_check.py)
PYTEST=($PY -m pytest -q -p no:cacheprovider -rfE --timeout=$PER_TEST_TIMEOUT)

STAGES=()   # "name|rc|seconds|result" rows of summary.txt
FAILED=0

left() { echo $((DEADLINE - SECONDS)); }
# cap for a stage: its own cap, but never eating the `reserve` seconds later stages need
cap() { local c=$1 r=$2 l; l=$(( $(left) - r )); [ "$l" -lt "$c" ] && c=$l; [ "$c" -lt 0 ] && c=0; echo $c; }

write_summary() {
  {
    printf '%-9s %5s %6s  %s\n' stage rc secs result
    local row
    for row in "${STAGES[@]}"; do
      IFS='|' read -r n rc s res <<<"$row"
      printf '%-9s %5s %6s  %s\n' "$n" "$rc" "$s" "$res"
    done
    echo "elapsed ${SECONDS} s of ${DEADLINE} s$([ "$DRY" = 1 ] && echo ' (dry run)')"
    if [ -s "$OUT/headline.json" ]; then
      $PY scripts/triton_headline.py --summarize "$OUT/headline.json" 2>&1 | tail -12
    fi
    if [ -s "$OUT/bench.json" ] || [ -s "$OUT/student.json" ]; then
      $PY benchmarks/gpu_bench.py --summarize "$OUT/bench.json" "$OUT/student.json" 2>&1 | tail -40
    fi
  } >"$OUT/summary.txt"
}

record() {  # name rc seconds result
  STAGES+=("$1|$2|$3|$4")
  # rc 124 in the last stages is the deadline doing its job ("as far as the time allows")
  case "$1:$2" in *:0 | *:skip | rest*:124 | rest*:137) ;; *) FAILED=1 ;; esac
  write_summary
  echo "== stage $1: rc=$2 in $3 s: $4"
}

pytest_result() { grep -E "^(=+ )?[0-9]+ (passed|failed|error|skipped|deselected)|no tests ran|^ERROR|error:" "$1" | tail -1 | sed 's/=//g; s/^ *//'; }

run_pytest() {  # stage cap reserve -- pytest args
  local name=$1 c; c=$(cap "$2" "$3"); shift 4
  if [ "$c" -lt 10 ]; then record "$name" skip 0 "no time left"; return; fi
  echo "=== stage $name: pytest $* (timeout ${c}s)" >>"$OUT/tests.log"
  local t0=$SECONDS
  if [ "$DRY" = 1 ]; then
    timeout -k 5 "$c" "${PYTEST[@]}" --collect-only "$@" >"$WORK/collect.log" 2>&1
    local rc=$?
    cat "$WORK/collect.log" >>"$OUT/tests.log"
    cp "$WORK/collect.log" "$WORK/${name}_collect.log"
    local n; n=$(grep -cE "::" "$WORK/collect.log")
    record "$name" "$rc" $((SECONDS - t0)) "$n tests selected (collect-only)"
  else
    local from; from=$(($(wc -l <"$OUT/tests.log") + 1))
    timeout -k 5 "$c" "${PYTEST[@]}" "$@" >>"$OUT/tests.log" 2>&1
    local rc=$? res
    res=$(tail -n +"$from" "$OUT/tests.log" | pytest_result /dev/stdin)
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
      res="timed out after ${c}s; $(tail -n +"$from" "$OUT/tests.log" | grep -cE '(PASSED|FAILED|ERROR)|^[.sFEx]+( |$)') progress lines${res:+; $res}"
      echo "stage $name: $res" >>"$OUT/tests.log"
    fi
    record "$name" "$rc" $((SECONDS - t0)) "$res"
  fi
}

check_selectors() {  # dry run only: stage 3 covers each op at each shape (from its collect-only list)
  local want missing=() w ok
  for want in "${TRITON_EACH[@]}"; do
    ok=$(grep "::" "$WORK/triton_collect.log" | while read -r id; do
      for w in $want; do case "$id" in *"$w"*) ;; *) continue 2 ;; esac; done; echo "$id"; done | head -1)
    [ -n "$ok" ] || missing+=("'$want'")
  done
  if [ ${#missing[@]} -eq 0 ]; then
    record selectors 0 0 "stage 3 covers each of: ${TRITON_EACH[*]}"
  else
    record selectors 1 0 "no test id of stage 3 (${TRITON_FILES[*]} -k '$TRITON_K') has: ${missing[*]}"
  fi
}

build_start() {
  if [ "$DRY" = 1 ]; then
    BUILD_T0=$SECONDS
    $PY setup.py --version >"$OUT/build.log" 2>&1
    echo $? >"$WORK/build.rc"
    return
  fi
  nvidia-smi >>"$OUT/build.log" 2>&1
  BUILD_T0=$SECONDS
  ( start=$SECONDS
    MAX_JOBS=${MAX_JOBS:-$(nproc)} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} \
      timeout -k 5 240 nice -n 19 $PY setup.py -q build_ext --inplace >>"$OUT/build.log" 2>&1
    rc=$?
    echo "build rc=$rc in $((SECONDS - start)) s" >>"$OUT/build.log"
    echo $rc >"$WORK/build.rc" ) &
  BUILD_PID=$!
}

build_wait() {  # at most $1 s
  local t0=$SECONDS
  while [ ! -f "$WORK/build.rc" ] && [ $((SECONDS - t0)) -lt "$1" ]; do sleep 2; done
  if [ -f "$WORK/build.rc" ]; then
    local rc; rc=$(cat "$WORK/build.rc")
    BUILD_RECORDED=1
    record build "$rc" $((SECONDS - BUILD_T0)) "$([ "$DRY" = 1 ] && echo 'setup.py loads (no build in a dry run)' ||
      (grep -E '^build rc' "$OUT/build.log" | tail -1; [ "$rc" = 0 ] || grep -m3 -E 'error' "$OUT/build.log"))"
  else
    record build running $((SECONDS - BUILD_T0)) "not finished yet; the cuda provider may be unavailable"
  fi
}

bench() {  # stage part cap reserve out
  local name=$1 part=$2 c; c=$(cap "$3" "$4")
  if [ "$c" -lt 20 ]; then record "$name" skip 0 "no time left"; return; fi
  local t0=$SECONDS args=(--part "$part" --out "$OUT/$5" --budget-s $((c - 15)))
  [ "$DRY" = 1 ] && args+=(--dry-run)
  echo "=== stage $name: gpu_bench.py ${args[*]}" >>"$OUT/bench.log"
  timeout -k 5 "$c" $PY benchmarks/gpu_bench.py "${args[@]}" >>"$OUT/bench.log" 2>&1
  local rc=$?
  local n; n=$(grep -c '"status": "ok"' "$OUT/$5" 2>/dev/null)
  record "$name" "$rc" $((SECONDS - t0)) "${n:-0} ok records in $5"
}

# ---- the stages -----------------------------------------------------------------------------------
t0=$SECONDS
timeout -k 5 20 $PY -m mimic_fast.bench.probe --out "$OUT/env.json" >"$WORK/probe.log" 2>&1
rc=$?
cat "$WORK/probe.log"
record probe "$rc" $((SECONDS - t0)) "$(head -1 "$WORK/probe.log" | cut -c1-90)"

t0=$SECONDS
c=$(cap 150 150)
args=(--out "$OUT/headline.json" --budget-s $((c - 20)))
[ "$DRY" = 1 ] && args+=(--dry-run)
echo "=== stage headline: triton_headline.py ${args[*]}" >>"$OUT/bench.log"
timeout -k 5 "$c" $PY scripts/triton_headline.py "${args[@]}" >>"$OUT/bench.log" 2>&1
rc=$?
res=$($PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(len(d['cases']), 'cases,',
sum('median_ms' in r for c in d['cases'] for r in c['providers'].values()), 'timings')" \
  "$OUT/headline.json" 2>/dev/null || echo "no headline.json")
[ "$rc" = 124 ] || [ "$rc" = 137 ] && res="timed out after ${c}s; $res"
record headline "$rc" $((SECONDS - t0)) "$res"

build_start  # after the headline's timings, niced
run_pytest triton 90 200 -- "${TRITON_FILES[@]}" -k "$TRITON_K"
if [ "$DRY" = 1 ]; then check_selectors; fi
build_wait "$(cap 30 160)"
bench bench ops 170 100 bench.json
bench student student 40 60 student.json
[ -z "${BUILD_RECORDED:-}" ] && build_wait 0  # a build still running at stage 5 has its row now
if [ -f "$WORK/build.rc" ] || [ "$DRY" = 1 ]; then
  run_pytest cuda 60 20 -- "${CUDA_FILES[@]}"
else
  record cuda skip 0 "the build did not finish in time"
fi
run_pytest rest-tri "$(cap 600 20)" 20 -- "${TRITON_FILES[@]}" -k "$REST_TRITON_K"
run_pytest rest 600 0 -- "${REST_ARGS[@]}"
[ -n "${BUILD_PID:-}" ] && kill "$BUILD_PID" 2>/dev/null

if [ "$DRY" = 1 ]; then  # the outputs must come back from the GPU machine as they are
  nfiles=$(find "$OUT" -type f | wc -l)
  deep=$(find "$OUT" -mindepth 4 | head -3)
  bad=$(find "$OUT" -mindepth 1 | sed "s|^$OUT/||" | grep -vE '^[A-Za-z0-9._/-]+$' | head -3)
  if [ "$nfiles" -le 8 ] && [ -z "$deep" ] && [ -z "$bad" ]; then
    record outputs 0 0 "$nfiles files under \$OUT (at most 8), none deeper than two folders"
  else
    record outputs 1 0 "$nfiles files (max 8); too deep: ${deep:-none}; odd names: ${bad:-none}"
  fi
fi
rm -rf "$WORK"
echo
echo "== results under $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
cat "$OUT/summary.txt"
exit $FAILED
