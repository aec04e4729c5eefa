#!/usr/bin/env bash
# Every committed CPU figure from the command README cites for it, in one go (after set-up; run it
# on a quiet machine: ~20 minutes on 2 cores, 12 of them the demos and the sweep).
# The demo's and the sweep's accuracies reproduce exactly on the machine record their JSON holds
# (CPU model and instruction set, torch/triton versions, threads: README, "Reproducing the figures").
#   bash scripts/regenerate_figures.sh            # all
#   bash scripts/regenerate_figures.sh demo sweep # some of: demo demo-bf16 sweep cpu ops memory student
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
R=benchmarks/results
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(demo demo-bf16 sweep cpu ops memory student)

run() {  # run STEP COMMAND...: times each step and says which command wrote what
  local t0=$SECONDS
  echo "== $*  (load $(cut -d' ' -f1-3 /proc/loadavg))"
  "${@:2}"
  echo "== $1: $((SECONDS - t0)) s"
}

for s in "${steps[@]}"; do
  case "$s" in
    demo) rm -rf "$R/demo"; run demo mimic-fast demo --no-progress --out "$R/demo" ;;
    demo-bf16)  # slow where PyTorch emulates bf16 (no AMX / AVX512-BF16): ~9 min on this AVX2 CPU
      rm -rf "$R/demo_bf16"
      run demo-bf16 mimic-fast demo --precision bf16 --no-progress --out "$R/demo_bf16" ;;
    sweep)
      # the sweep's folder holds its runs, store and transfer set: only its report is committed
      work=runs/sweep-figures; rm -rf "$work"
      run sweep mimic-fast sweep --no-progress --out "$work"
      mkdir -p "$R/sweep"; cp "$work"/sweep.json "$work"/sweep.md "$work"/sweep.png "$R/sweep/" ;;
    cpu) run cpu mimic-fast bench cpu --confirm --json "$R/cpu_side_by_side.json" ;;
    ops) run ops mimic-fast bench ops --loss-B 4096 --json "$R/cpu_ops.json" ;;
    memory) run memory mimic-fast bench memory --json "$R/cpu_memory.json" ;;
    student) run student mimic-fast bench student --json "$R/cpu_student.json" ;;
    *) echo "regenerate_figures.sh: error: unknown step '$s' (demo demo-bf16 sweep cpu ops memory student)" >&2
       exit 2 ;;
  esac
done
run report mimic-fast bench report --check
