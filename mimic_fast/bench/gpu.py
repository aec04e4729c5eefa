"""The GPU benchmark (benchmarks/gpu_bench.py, `mimic-fast bench gpu`): one command, a time budget.

mimic_loss forward / backward / full step at the paper's sizes for triton, cuda, the chunked reference,
eager and torch.compile(max-autotune) in bf16; the CUDA loss kernels' bandwidth against a copy; the
student-vs-teacher pairs. Peaks (bf16 mm, copy) are measured in the same run. Cases run cheapest and
most important first; whatever the budget cannot reach is recorded as skipped, and the JSON is
rewritten after every case so a killed run still leaves its figures.
"""
import argparse
import gc
import sys
import time

import torch

from . import timing
from .providers import LOSS_PROVIDERS, Case, oom_estimate_bytes, unavailable
from .suites import PAPER, _base_record, new_doc, run_case, run_student, write_doc

DEFAULT_BUDGET_S = 450  # the device's command limit is 600 s; leave room for start-up and a slow compile


def build_parser(prog="gpu_bench.py"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="raw JSON path (default benchmarks/results/gpu_<device>.json)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and few rounds: checks the script's logic (use with --device cpu)")
    p.add_argument("--dry-run", action="store_true", help="= --device cpu --small --no-compile")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--H", type=int, nargs="+", default=[8000, 32768, 400000])
    p.add_argument("--k", type=int, nargs="+", default=[250, 256])
    p.add_argument("--providers", nargs="+", default=["triton", "cuda", "reference", "eager", "compile"])
    p.add_argument("--compile-k", type=int, nargs="*", default=[250],
                   help="bottleneck widths torch.compile is timed at (each shape costs a max-autotune)")
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--loss-B", type=int, nargs="+", default=[4096, 1 << 20])
    p.add_argument("--no-loss", action="store_true")
    p.add_argument("--no-student", action="store_true")
    p.add_argument("--student-batch", type=int, default=4096)
    p.add_argument("--pairs", type=int, nargs="*", default=None, help="student pairs (0, 1, 2)")
    p.add_argument("--ensemble-members", type=int, default=9)
    return p


class Budget:
    def __init__(self, seconds):
        self.t0, self.seconds = time.perf_counter(), seconds

    def left(self):
        return self.seconds - (time.perf_counter() - self.t0)


def _skip(case, provider, passes, why):
    recs = [_base_record(case, provider, p) for p in passes]
    for r in recs:
        r["status"], r["error"] = "skipped", why
    return recs


def _fits(provider, case):
    """None if a full step should fit in free device memory, else why not (recorded, not run)."""
    if torch.device(case.device).type != "cuda":
        return None
    need = oom_estimate_bytes(provider, case)
    free, _ = torch.cuda.mem_get_info()
    if need > 0.9 * free:
        return (f"would not fit: ~{need / 2**30:.1f} GiB estimated for a full step (four (B, H) "
                f"tensors) vs {free / 2**30:.1f} GiB free")
    return None


def configure(args):
    if args.dry_run:
        args.device, args.small, args.no_compile = "cpu", True, True
    if args.small:
        args.B, args.H, args.k = min(args.B, 64), [h for h in (256, 1024)], [args.k[0]]
        args.warmup, args.rounds = 1, 2
        args.loss_B, args.student_batch, args.pairs = [256], 8, args.pairs or [0]
        args.ensemble_members = min(args.ensemble_members, 2)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.no_compile:
        args.providers = [p for p in args.providers if p != "compile"]
    return args


def run(args, argv=None, log=print):
    budget = Budget(args.budget_s)
    device, dtype = args.device, args.dtype
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu --small (or --dry-run) to check the logic")
    doc = new_doc("gpu", device, argv)
    doc["command"] = "python benchmarks/gpu_bench.py " + " ".join(argv or [])
    doc["config"] = {k: v for k, v in vars(args).items()}
    out = args.out
    pdtype = getattr(torch, dtype)
    try:
        doc["peaks"]["matmul"] = timing.measure_matmul_peak(device, pdtype,
                                                            n=1024 if args.small else None)
        if device == "cuda":
            doc["peaks"]["copy"] = timing.measure_copy_bandwidth(device)
    except Exception as e:  # noqa: BLE001
        doc["peaks"]["error"] = f"{type(e).__name__}: {e}"
    write_doc(doc, out)
    log(f"peaks: {doc['peaks']}")

    passes = ("forward", "backward", "full")
    timed_now = [p for p in args.providers if p != "compile"]
    cases = [Case("mimic_loss", args.B, PAPER["C"], PAPER["D"], k, H, dtype, device)
             for k in args.k for H in args.H]

    def do(case, provider, need_s):
        why = unavailable(provider, case) or _fits(provider, case)
        if why is None and budget.left() < need_s:
            why = f"time budget: {budget.left():.0f} s left of {args.budget_s:.0f} s"
        if why:
            log(f"  {provider:<10} {case.label()}: skipped ({why})")
            recs = _skip(case, provider, passes, why)
        else:
            recs = run_case(case, provider, passes, args.warmup, args.rounds, args.compile_mode,
                            check=True, max_seconds=20, log=log)
        doc["results"].extend(recs)
        write_doc(doc, out)

    log("mimic_loss (fused and baselines):")
    for case in cases:
        for p in timed_now:
            do(case, p, 15)
    if not args.no_loss:
        log("logit losses (bandwidth):")
        for op in ("logit_mse_loss", "kd_loss"):
            for B in args.loss_B:
                case = Case(op, B, PAPER["C"], dtype=dtype, device=device)
                for p in LOSS_PROVIDERS:
                    if p == "compile" and args.no_compile:
                        continue
                    if budget.left() < 10:
                        doc["results"] += _skip(case, p, ("forward", "full"), "time budget")
                        continue
                    doc["results"] += run_case(case, p, ("forward", "full"), args.warmup, args.rounds,
                                               None, log=log)
                write_doc(doc, out)
    if not args.no_student:
        log("student vs teacher:")
        ns = argparse.Namespace(device=device, dtype=dtype, batch=args.student_batch,
                                warmup=args.warmup, rounds=args.rounds, pairs=args.pairs,
                                ensemble_members=args.ensemble_members, student_eager=True,
                                max_seconds=10, json=None)
        if budget.left() > 60:
            try:
                sdoc = run_student(ns, log=log)
                doc["results"] += sdoc["results"]
                doc["targets"] += sdoc["targets"]
            except Exception as e:  # noqa: BLE001
                doc["results"].append({"name": "student/error", "suite": "student", "status": "error",
                                       "error": f"{type(e).__name__}: {e}"[:400]})
        else:
            doc["results"].append({"name": "student/skipped", "suite": "student", "status": "skipped",
                                   "error": "time budget"})
        write_doc(doc, out)
        gc.collect()
    if "compile" in args.providers:
        log(f"torch.compile(mode={args.compile_mode!r}) (last: each shape is a long compile):")
        for case in cases:
            if case.k in args.compile_k:
                do(case, "compile", 120)
    doc["elapsed_s"] = args.budget_s - budget.left()
    write_doc(doc, out)
    return doc


def short_table(doc):
    """The few lines printed last: per case and provider, full-step ms, TFLOP/s, % of peak, memory."""
    peak = doc["peaks"].get("matmul", {}).get("tflops")
    bw = doc["peaks"].get("copy", {}).get("gbps")
    lines = [f"device: {doc['env'].get('device')}  torch {doc['env'].get('torch')}  triton "
             f"{doc['env'].get('triton')}  CUDA {doc['env'].get('torch_cuda')}",
             f"measured peaks: mm {peak or 0:.3g} TFLOP/s"
             + (f", copy {bw:.0f} GB/s" if bw else ""),
             f"{'case':<34}{'provider':<10}{'fwd ms':>9}{'bwd ms':>9}{'full ms':>9}{'TFLOP/s':>9}"
             f"{'%peak':>7}{'mem MiB':>9}  status"]
    by = {}
    for r in doc["results"]:
        if r.get("op") == "mimic_loss":
            key = (r["shape"]["B"], r["shape"]["k"], r["shape"]["H"], r["provider"])
            by.setdefault(key, {})[r["pass"]] = r
    for (B, k, H, prov), m in by.items():
        full = m.get("full", {})

        def ms(p):
            v = m.get(p, {}).get("median_ms")
            return f"{v:9.2f}" if v is not None else f"{'-':>9}"

        tf = full.get("tflops")
        st = full.get("status", "?")
        err = "" if st == "ok" else f" {(full.get('error') or '')[:50]}"
        mem = full.get("peak_mem_bytes")
        tf_s = f"{tf:9.1f}" if tf else f"{'-':>9}"
        pct = f"{100 * tf / peak:6.0f}%" if tf and peak else f"{'-':>7}"
        mem_s = f"{mem / 2**20:9.0f}" if mem is not None else f"{'-':>9}"
        lines.append(f"{f'B{B} k{k} H{H}':<34}{prov:<10}{ms('forward')}{ms('backward')}{ms('full')}"
                     f"{tf_s}{pct}{mem_s}  {st}{err}")
    for r in doc["results"]:
        if r.get("op") in ("logit_mse_loss", "kd_loss") and r.get("pass") == "forward":
            g = r.get("gbps")
            frac = f" = {100 * g / bw:.0f}% of copy" if g and bw else ""
            lines.append(f"{r['op']} B{r['shape']['B']} C{r['shape']['C']} {r['provider']:<8} "
                         + (f"{r['median_ms']:.3f} ms {g:.0f} GB/s{frac}" if g else r["status"]))
    for r in doc["results"]:
        if r.get("metric") and r.get("samples_per_s"):
            lines.append(f"{r['model']:<28} {r['metric']:<11} b{r['batch']:<5} "
                         f"{r['samples_per_s']:12.0f} samples/s  {r['median_ms']:.3f} ms")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = configure(build_parser().parse_args(argv))
    if args.out is None:
        name = "cpu_small" if args.device == "cpu" else \
            torch.cuda.get_device_name(0).lower().replace(" ", "_") if torch.cuda.is_available() else "gpu"
        args.out = f"benchmarks/results/gpu_{name}.json"
    doc = run(args, argv)
    print(f"\nraw JSON: {args.out}")
    print(short_table(doc))
    return 0
