"""The cpu backend of another git revision against this tree's, beside eager, in one process.

The other revision's csrc/cpu/mimic_cpu.cpp is compiled into a temporary folder under the op
namespace `mimic_fast_ab` (its TORCH_LIBRARY renamed, so both builds load side by side), with that
revision's own compiler flags unless --openmp says otherwise; its ops are then called through this
tree's Python layer by swapping `torch.ops.mimic_fast` for the duration of each call. Rounds are
interleaved (eager, other, this); ratios from the best rounds, medians beside; the load is recorded.
The other revision's op schemas must match this tree's (true since need_dx, 6c8525a).

    PYTHONPATH=. python benchmarks/cpu_ab.py --rev main --threads 2 1 --rounds 11 --json out.json
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import tempfile

import torch

from mimic_fast._timing import interleave
from mimic_fast.bench.providers import Case, Runner, make_inputs
import mimic_fast.ops.cpu  # noqa: F401  (loads this tree's extension: torch.ops.mimic_fast)

NAMESPACE = "mimic_fast_ab"


def build(rev, openmp):
    """Compile `rev`'s csrc/cpu/mimic_cpu.cpp as namespace NAMESPACE; returns the loaded library."""
    from torch.utils.cpp_extension import load

    src = subprocess.run(["git", "show", f"{rev}:csrc/cpu/mimic_cpu.cpp"], check=True,
                         capture_output=True, text=True).stdout
    src = re.sub(r"TORCH_LIBRARY(_IMPL)?\(mimic_fast,", rf"TORCH_LIBRARY\1({NAMESPACE},", src)
    src = src.replace("mimic_fast_cpu", "mimic_fast_cpu_ab")  # its C++ namespace: no ODR clash
    folder = tempfile.mkdtemp(prefix="mimic_fast_ab_")
    path = os.path.join(folder, "ab.cpp")
    with open(path, "w") as f:
        f.write(src)
    flags = ["-O3", "-std=c++17"] + (["-fopenmp"] if openmp else [])
    load(name="mimic_fast_ab", sources=[path], extra_cflags=flags,
         extra_ldflags=["-fopenmp"] if openmp else [], is_python_module=False,
         build_directory=folder, verbose=False)
    return getattr(torch.ops, NAMESPACE)


def main():
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--rev", default="main", help="the git revision to compare with (default main)")
    ap.add_argument("--openmp", choices=["auto", "yes", "no"], default="auto",
                    help="build it with -fopenmp (auto: when that revision's setup.py passes it)")
    ap.add_argument("--H", type=int, nargs="+", default=[8000])
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--passes", nargs="+", default=["full", "inference"],
                    choices=["full", "inference"])
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--json", help="write the records here")
    args = ap.parse_args()
    if args.openmp == "auto":
        setup = subprocess.run(["git", "show", f"{args.rev}:setup.py"], check=True,
                               capture_output=True, text=True).stdout
        openmp = "-fopenmp" in setup
    else:
        openmp = args.openmp == "yes"
    other, this = build(args.rev, openmp), torch.ops.mimic_fast

    def as_other(fn):
        def call():
            torch.ops.__dict__["mimic_fast"] = other  # what ops/cpu.py resolves at call time
            try:
                return fn()
            finally:
                torch.ops.__dict__["mimic_fast"] = this
        return call

    records = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for H in args.H:
            case = Case("mimic_loss", 256, 183, 1845, 250, H, "float32", "cpu")
            inputs = make_inputs(case)
            eager, cpu = Runner("eager", case, inputs), Runner("cpu", case, inputs)
            for pass_ in args.passes:
                fns = {"eager": getattr(eager, pass_), args.rev: as_other(getattr(cpu, pass_)),
                       "this": getattr(cpu, pass_)}
                load = [os.getloadavg()]
                times, errors = interleave(fns, warmup=2, rounds=args.rounds)
                assert not errors, errors
                load.append(os.getloadavg())
                best = {p: min(t) * 1e3 for p, t in times.items()}
                med = {p: statistics.median(t) * 1e3 for p, t in times.items()}
                records.append({"H": H, "threads": threads, "pass": pass_, "rounds": args.rounds,
                                "best_ms": best, "median_ms": med, "load_avg": load})
                print(f"{pass_} H={H} threads={threads} load {load[0][0]:.2f}->{load[1][0]:.2f}: "
                      + ", ".join(f"{p} {best[p]:.1f}/{med[p]:.1f} ms" for p in best) + "; vs eager "
                      + ", ".join(f"{p} {best['eager'] / best[p]:.3f}x "
                                  f"({med['eager'] / med[p]:.3f})" for p in (args.rev, "this")),
                      flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rev": args.rev, "rev_openmp": openmp,
                       "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
