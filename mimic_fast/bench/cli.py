"""`mimic-fast bench ...`: argument parsing for the suites, the report and the regression compare
(`cpu`, `gpu` and `model` parse their own arguments)."""
import argparse
import sys

import torch

from ..ops import triton_cost
from . import compare, cpu, gpu, report, suites


def _common(p, device_default="cpu"):
    p.add_argument("--device", default=device_default, choices=("cpu", "cuda"))
    p.add_argument("--dtype", default=None, help="default float32 on cpu, bfloat16 on cuda")
    p.add_argument("--json", default=None, help="write the raw results to this JSON file")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=10.0,
                   help="stop timing a case after this many seconds (at least 3 rounds)")


def _shapes(p, H):
    p.add_argument("--B", type=int, nargs="+", default=[256])
    p.add_argument("--H", type=int, nargs="+", default=H)
    p.add_argument("--k", type=int, nargs="+", default=[250])
    p.add_argument("--providers", nargs="+", default=None,
                   help="eager compile reference cpu triton cuda, and cpu:LOOP:CHUNK variants "
                        "(default: all that apply)")
    p.add_argument("--compile-mode", default=None,
                   help="torch.compile mode for the 'compile' provider (GPU script: max-autotune)")


def build_parser():
    p = argparse.ArgumentParser(allow_abbrev=False, prog="mimic-fast bench",
                                description="Benchmarks of mimic_fast's fused ops and models.")
    p.add_argument("--report", action="store_true",
                   help="render benchmarks/results/*.json into a markdown table and PNG plots")
    p.add_argument("--results", default="benchmarks/results", help="folder of result JSON (--report)")
    p.add_argument("--no-plots", action="store_true")
    sub = p.add_subparsers(dest="suite")

    ops = sub.add_parser("ops", allow_abbrev=False,
                         help="per-op timings: bottleneck_mlp, mimic_loss, logit losses")
    _common(ops)
    _shapes(ops, [4096, 8192, 16384, 32768])
    ops.add_argument("--loss-B", type=int, nargs="+", default=[4096, 65536])
    ops.add_argument("--no-loss", dest="loss", action="store_false")
    ops.add_argument("--no-memory", dest="memory", action="store_false",
                     help="skip the peak-memory subprocess (CPU)")
    ops.add_argument("--mm-n", type=int, default=None,
                     help="size of the square matmul in every rotation (default 2048 on CPU, 8192 on "
                          "a GPU): the peak each figure is scored against")

    mem = sub.add_parser("memory", allow_abbrev=False, help="peak memory of a mimic_loss training step vs H")
    _common(mem)
    _shapes(mem, [4096, 8192, 16384, 32768])

    st = sub.add_parser("student", allow_abbrev=False, help="student vs deep teacher: throughput and latency")
    _common(st)
    st.add_argument("--batch", type=int, default=256)
    st.add_argument("--pairs", type=int, nargs="*", default=None,
                    help="0: dnn-2k vs snn-mimic-8k, 1: cnn vs equal-size student, "
                         "2: cnn ensemble vs snn-mimic-400k (default: all)")
    st.add_argument("--ensemble-members", type=int, default=9)
    st.add_argument("--no-student-eager", dest="student_eager", action="store_false",
                    help="do not also time the student's parameters as an unfused chain")

    sub.add_parser("cpu", allow_abbrev=False,
                   help="the CPU side by side: fused cpu vs eager vs torch.compile vs ONNX, "
                   "fp32/bf16, training step and inference, 1 and 2 threads, issue 17's targets; "
                   "see `bench cpu --help`", add_help=False)
    sub.add_parser("gpu", allow_abbrev=False,
                   help="the GPU script (benchmarks/gpu_bench.py); see `bench gpu --help`",
                   add_help=False)
    sub.add_parser("model", allow_abbrev=False,
                   help="the triton backend's cost model (FLOPs, bytes, predicted time "
                   "per kernel); see `bench model --help`", add_help=False)
    check_help = ("exit 1 if a result file lacks a field of the current schema (written by an older "
                  "harness: rerun the command it names)")
    p.add_argument("--check", action="store_true", help="with --report: " + check_help)
    rep = sub.add_parser("report", allow_abbrev=False, help="same as --report")
    rep.add_argument("--out", default=None)
    # SUPPRESS: an option given before `report` is not reset by the subcommand's default
    rep.add_argument("--results", default=argparse.SUPPRESS, help="folder of result JSON")
    rep.add_argument("--no-plots", action="store_true", default=argparse.SUPPRESS)
    rep.add_argument("--check", action="store_true", default=argparse.SUPPRESS, help=check_help)

    cmp_ = sub.add_parser("compare", allow_abbrev=False,
                          help="flag slowdowns of a run against a saved baseline")
    cmp_.add_argument("baseline")
    cmp_.add_argument("current")
    cmp_.add_argument("--threshold", type=float, default=0.10,
                      help="allowed slowdown as a fraction (0.10: fail above 1.10x)")
    cmp_.add_argument("--strict", action="store_true", help="records missing from the run also fail")
    return p


def main(argv=None):
    """Entry point of `mimic-fast bench`; returns the process exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["cpu"]:
        return cpu.main(argv[1:])
    if argv[:1] == ["gpu"]:
        return gpu.main(argv[1:])
    if argv[:1] == ["model"]:
        return triton_cost.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.report or args.suite == "report":
        md, plots, stale = report.render(args.results, getattr(args, "out", None), plots=not args.no_plots)
        print(f"wrote {md}" + (f" and {', '.join(plots)}" if plots else ""))
        for line in stale:
            print(f"stale: {line}")
        return 1 if args.check and stale else 0
    if args.suite is None:
        parser.print_help()
        return 2
    if args.suite == "compare":
        return compare.compare_files(args.baseline, args.current, args.threshold, args.strict)
    if args.device == "cuda":
        if not torch.cuda.is_available():  # `mimic-fast bench` prints it as its one error line
            raise ValueError("--device cuda was given but no CUDA device is available here (torch "
                             f"{torch.__version__}); use --device cpu")
    run = {"ops": suites.run_ops, "memory": suites.run_memory, "student": suites.run_student}[args.suite]
    doc = run(args, argv)
    print()
    print(report.markdown_for_doc(doc, brief=True))
    if args.json:
        print(f"raw JSON: {args.json}")
    return 0
