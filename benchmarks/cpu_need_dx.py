"""The cpu backend's training step with and without dx, beside eager, interleaved in one process.

`cpu` times the step as a student trains (x is data: no dx since need_dx); `cpu+dx` gives x
requires_grad, so the fused op computes dx = dz U as every backend did before need_dx (the gradient
is still taken w.r.t. the weights only, as the harness does, so autograd discards it); `eager` is
plain PyTorch with x needing no grad. Ratios from the best rounds, medians beside.

    PYTHONPATH=. python benchmarks/cpu_need_dx.py --H 8000 32768 --threads 1 2 --rounds 15
"""
import argparse
import json
import os
import statistics

import torch

from mimic_fast._timing import interleave
from mimic_fast.bench.providers import Case, Runner, make_inputs
from mimic_fast.ops import flops


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--H", type=int, nargs="+", default=[8000])
    ap.add_argument("--threads", type=int, nargs="+", default=[1])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    records = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for H in args.H:
            case = Case("mimic_loss", 256, 183, 1845, 250, H, "float32", "cpu")
            inputs = make_inputs(case)
            with_x = dict(inputs, x=inputs["x"].detach().clone().requires_grad_())
            runners = {"eager": Runner("eager", case, inputs), "cpu": Runner("cpu", case, inputs),
                       "cpu+dx": Runner("cpu", case, with_x)}
            load = os.getloadavg()[0]
            times, errors = interleave({p: r.full for p, r in runners.items()}, warmup=2,
                                       rounds=args.rounds)
            assert not errors, errors
            best = {p: min(t) * 1e3 for p, t in times.items()}
            med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
            rec = {"H": H, "threads": threads, "rounds": args.rounds, "best_ms": best,
                   "median_ms": med, "load_avg": [load, os.getloadavg()[0]],
                   "dx_share_of_executed_flops": 2 * 256 * 1845 * 250 / flops.mlp_flops(
                       256, 1845, 250, H, 183, "full", input_grad=True, recompute=True)}
            records.append(rec)
            print(f"H={H} threads={threads} load {rec['load_avg'][0]:.2f}->{rec['load_avg'][1]:.2f}: "
                  + ", ".join(f"{p} {best[p]:.1f}/{med[p]:.1f} ms" for p in best)
                  + f"; cpu/eager {best['eager'] / best['cpu']:.3f}x "
                  f"({med['eager'] / med['cpu']:.3f}), cpu+dx/eager "
                  f"{best['eager'] / best['cpu+dx']:.3f}x ({med['eager'] / med['cpu+dx']:.3f}), "
                  f"dx saves {1 - best['cpu'] / best['cpu+dx']:.1%} "
                  f"({1 - med['cpu'] / med['cpu+dx']:.1%})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
