"""`mimic-fast bench cpu`: the CPU side by side, and issue 17's targets met or missed.

For every H, dtype and thread count: the training step (mimic_loss forward + backward, what
`WideShallowStudent.mimic_loss(x, t).backward()` runs) and inference (the student's forward under
no_grad), for the fused `cpu` backend, eager PyTorch (F.linear chain + F.mse_loss + backward),
torch.compile of eager, and (inference, float32) the student exported by mimic_fast.export and run
in onnxruntime, with a square torch.mm of the same dtype in the same rotation: its best round is
the matmul rate of this run. Ratios come from each provider's best round (medians beside).
"""
import argparse
import re
import sys
import tempfile

import torch

from ..ops import cpu as cpu_ops
from . import results, timing
from .providers import Case
from .report import markdown_for_doc
from .suites import flag_noise, run_group

TRAIN = ("mimic_loss", "full")
INFER = ("bottleneck_mlp", "inference")
PASSES = {"train": TRAIN, "inference": INFER}
PROVIDERS = ("cpu", "eager", "compile", "onnx")
NEAR = 0.10  # a ratio within 10% of its threshold is rerun by --confirm

# (id, dtype, pass, compared with, threshold, what): issue 17's targets. "torch.mm" compares the
# fused step's rate (model FLOPs, dx included) with the matmul's rate in the same rounds.
TARGETS = (
    ("bf16-train-vs-eager", "bfloat16", "full", "eager", 1.2, "bf16 training step >= 1.2x eager bf16"),
    ("bf16-train-vs-compile", "bfloat16", "full", "compile", 1.0,
     "bf16 training step >= 1.0x torch.compile bf16"),
    ("bf16-train-vs-matmul", "bfloat16", "full", "torch.mm", 0.5,
     "stretch: bf16 training step >= 0.5 of the bf16 matmul rate (model FLOPs 2B(3Dk+3(kH+HC)))"),
    ("bf16-inference-vs-eager", "bfloat16", "inference", "eager", 1.0,
     "bf16 inference >= 1.0x eager bf16"),
    ("fp32-inference-vs-eager", "float32", "inference", "eager", 1.0,
     "fp32 inference >= 1.0x eager fp32"),
    ("fp32-train-vs-eager", "float32", "full", "eager", 1.0, "fp32 training step >= 1.0x eager fp32"),
)

HELP = """\
bf16 means what a user training in bf16 with plain PyTorch does: bf16 weights, inputs and teacher
logits (model.to(torch.bfloat16)), every provider alike; autocast is not timed here. The training
step is timed as forward + backward of the loss w.r.t. U, V, b1, W, b2 (x is data, it needs no
grad); FLOPs are issue 17's model count 2B(3Dk + 3(kH + HC)) for every provider (dx included, the
fused recompute not). Every provider is checked against the float64 reference first (the 2x rule
for bf16); torch.compile and the ONNX file are checked at the timed size, since those are what run.
onnxruntime gets as many intra-op threads as torch and no spinning (an idle spinning pool would
steal the core from the provider timed after it). torch.compile recompiles for every thread count
(inductor's CPU code fixes it): its compile time is most of a full run. The 1/5/15-minute load
average is recorded before and after every case and the whole run; a matmul rate that moves by more
than 10% across the run is flagged. A target is met only if every run of its case meets it.
"""


def build_parser(prog="mimic-fast bench cpu"):
    p = argparse.ArgumentParser(allow_abbrev=False, prog=prog, description=__doc__.split("\n\n")[0],
                                epilog=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=None,
                   help="write the results here (e.g. benchmarks/results/cpu_side_by_side.json)")
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=1845)
    p.add_argument("--k", type=int, default=250)
    p.add_argument("--C", type=int, default=183)
    p.add_argument("--H", type=int, nargs="+", default=[8000, 32768])
    p.add_argument("--dtypes", nargs="+", default=None, choices=("float32", "bfloat16", "float16"),
                   help="default: float32, and bfloat16 where this CPU computes it natively (AMX, "
                        "AVX512-BF16); elsewhere bf16 is emulated and its targets are not measured")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch.set_num_threads values")
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=list(PASSES))
    p.add_argument("--providers", nargs="+", default=None,
                   help=f"from {' '.join(PROVIDERS)} (default: all; --quick: all but compile)")
    p.add_argument("--variants", nargs="*", default=[], metavar="cpu:LOOP:CHUNK",
                   help="cpu backend variants timed beside it (the loop order and chunk width, "
                        "e.g. cpu:gemm:512 cpu:chunks:1024), the tuning sweep of the chunk loop")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor's)")
    p.add_argument("--mm-n", type=int, default=2048, help="the square matmul's size (default 2048)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop a rotation after this much timed work (at least 3 rounds)")
    p.add_argument("--confirm", action="store_true",
                   help=f"rerun every case with a ratio within {100 * NEAR:.0f}%% of its target; the "
                        "target holds only if both runs agree")
    p.add_argument("--quick", action="store_true",
                   help="tiny shapes (B=32 D=64 k=16 C=10 H=96 160, 128^3 matmul, 3 rounds, float32 "
                        "and bfloat16, no torch.compile) unless given: checks the command, not the "
                        "speed")
    return p


QUICK = {"B": 32, "D": 64, "k": 16, "C": 10, "H": [96, 160], "mm_n": 128, "rounds": 3,
         "dtypes": ["float32", "bfloat16"],  # every path of the command, emulated bf16 included
         "providers": [p for p in PROVIDERS if p != "compile"]}


def parse_args(argv):
    """The command's arguments; --quick changes the defaults, so options given beside it win."""
    p = build_parser()
    if "--quick" in argv:
        p.set_defaults(**QUICK)
    return configure(p.parse_args(argv))


def low_precision_paths(dtypes):
    """{dtype name: (compute path, why)} of the cpu backend for each low-precision dtype asked for."""
    return {dt: cpu_ops.compute_path(getattr(torch, dt)) for dt in dtypes if dt != "float32"}


def configure(args):
    if args.dtypes is None:  # bf16 only where the fused op has matrix units to run it on
        args.dtypes = ["float32"] + [dt for dt, (path, _) in low_precision_paths(["bfloat16"]).items()
                                     if path == "native"]
    args.providers = list(args.providers or PROVIDERS)
    unknown = [p for p in args.providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"--providers: unknown {unknown}; expected some of {', '.join(PROVIDERS)}")
    bad = [v for v in args.variants if not re.fullmatch(r"cpu:[a-z]+:[1-9][0-9]*", v)]
    if bad:
        raise ValueError(f"--variants: {bad} are not cpu:LOOP:CHUNK (e.g. cpu:gemm:512)")
    if any(t < 1 for t in args.threads):
        raise ValueError(f"--threads must be positive, got {args.threads}")
    return args


def _providers(args, pass_):
    provs = [p for p in args.providers if not (p == "onnx" and pass_ == "full")]
    # the variants next to the cpu backend they vary
    return provs[:1] + list(args.variants) + provs[1:] if "cpu" in provs else provs + args.variants


def run_case(args, H, dtype, threads, pass_name, run, mm, onnx_dir, log=print):
    """The records of one rotation: every provider of one pass at one H, dtype and thread count."""
    op, pass_ = PASSES[pass_name]
    case = Case(op, args.B, args.C, args.D, args.k, H, dtype, "cpu", input_grad=pass_ == "full")
    torch.set_num_threads(threads)
    load = results.load_average()
    log(f"{pass_name} H={H} {dtype} {threads} thread(s)" + (f" (run {run})" if run > 1 else ""))
    recs = run_group(case, _providers(args, pass_), (pass_,), args.warmup, args.rounds,
                     args.compile_mode, max_seconds=args.max_seconds, log=log, matmul=mm,
                     onnx_dir=onnx_dir)
    load_after = results.load_average()
    for r in recs:
        r["name"] += f"/t{threads}" + (f"/run{run}" if run > 1 else "")
        r.update(threads=threads, run=run, load_avg=[load, load_after])
    return recs


def run(args, argv=None, log=print):
    """Measure what `args` (parse_args) asks for; the result document (written to args.json)."""
    doc = results.new_doc("cpu", "mimic-fast bench cpu " + " ".join(argv or []), "cpu",
                          "CPU figures from a shared machine: ratios come from interleaved rounds of "
                          "one process; the load average is recorded beside every case.")
    doc["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    paths = low_precision_paths(sorted({*args.dtypes, "bfloat16"}))
    doc["config"]["compute_paths"] = {dt: list(pw) for dt, pw in paths.items()}
    untimed = untimed_targets(args, paths)
    for dt, (path, why) in paths.items():
        if path != "native":
            log(f"{dt}: {_emulated(dt, why)}" + ("" if dt in args.dtypes else " (not timed)"))
    threads_before = torch.get_num_threads()
    mms = {dt: timing.matmul_fn("cpu", getattr(torch, dt), args.mm_n) for dt in args.dtypes}
    groups = [(H, dt, th, ps) for H in args.H for dt in args.dtypes for th in args.threads
              for ps in args.passes]
    try:
        with tempfile.TemporaryDirectory(prefix="mimic_fast_bench_onnx_") as onnx_dir:
            for g in groups:
                doc["results"] += run_case(args, *g, 1, mms[g[1]], onnx_dir, log)
                results.write(doc, args.json)
            doc["targets"] = evaluate_targets(doc["results"], paths=paths) + untimed
            if args.confirm:
                again = near_groups(doc["targets"], args.passes)
                for g in groups:
                    if g in again:
                        doc["results"] += run_case(args, *g, 2, mms[g[1]], onnx_dir, log)
                        results.write(doc, args.json)
                doc["targets"] = evaluate_targets(doc["results"], paths=paths) + untimed
    finally:
        torch.set_num_threads(threads_before)
    for w in flag_noise(doc):
        log(f"WARNING: {w}")
    results.write(results.finish(doc), args.json)
    return doc


# ---- targets ------------------------------------------------------------------------------------
def evaluate_targets(records, near=None, paths=None):
    """Issue 17's targets for every (H, threads) measured: a ratio from the best rounds of each run
    (the median's beside), met only if every run meets it, "unsettled" where runs disagree, and
    `near` where a run lies within `near` of the threshold (a second run should confirm it).
    `paths` ({dtype: (compute path, why)}, low_precision_paths) marks a low-precision dtype the CPU
    emulates as not measured: the fused op then computes in float32 against emulated bf16 baselines,
    a ratio that says nothing about the matrix units the targets are for."""
    near = NEAR if near is None else near
    paths = paths or {}
    index = {}
    for r in records:
        if r.get("threads") is None or not r.get("shape"):
            continue
        key = (results.case_H(r), r["threads"], r["dtype"], r["pass"], r.get("run", 1))
        index.setdefault(key, {})[r["provider"]] = r
    out = []
    cases = sorted({(k[0], k[1]) for k in index})
    for H, threads in cases:
        for tid, dtype, pass_, other, threshold, what in TARGETS:
            runs = sorted(k[4] for k in index if k[:4] == (H, threads, dtype, pass_))
            if not runs:
                continue
            label = f"{what} (H={H}, {threads} thread{'s' if threads > 1 else ''})"
            measured, why = [], None
            path, path_why = paths.get(dtype, ("native", None))
            if path != "native":
                why = _emulated(dtype, path_why)
            for n in runs if why is None else ():
                group = index[(H, threads, dtype, pass_, n)]
                fused, base = group.get("cpu"), group.get(other)
                if not (results.timed_ok(fused) and results.timed_ok(base)):
                    why = "; ".join(_why_not_timed(p, r) for p, r in (("cpu", fused), (other, base))
                                    if not results.timed_ok(r))
                    break
                best, median = timing.rate_fraction(fused, base) if other == "torch.mm" else \
                    timing.speedup(fused, base)
                measured.append({"run": n, "best": best, "median": median,
                                 "cpu_ms": fused["min_ms"], "other_ms": base["min_ms"]})
            common = {"id": tid, "H": H, "threads": threads, "dtype": dtype,
                      "step": "train" if pass_ == "full" else "inference", "compared_with": other,
                      "threshold": threshold}
            if why:
                out.append({**common, "target": label, "status": "not measured", "why": why})
                continue
            met = [m["best"] >= threshold for m in measured]
            state = "met" if all(met) else "missed" if not any(met) else "unsettled"
            is_near = any(abs(m["best"] / threshold - 1) <= near for m in measured)
            first = measured[0]
            unit = "of the matmul rate" if other == "torch.mm" else f"x {other}"
            detail = "; ".join(f"run {m['run']}: {m['best']:.3f} {unit} (medians {m['median']:.3f}; "
                               f"best rounds: cpu {m['cpu_ms']:.4g} ms, {other} {m['other_ms']:.4g} ms)"
                               for m in measured)
            out.append({**common, "target": label, "measured": first["best"],
                        "measured_median": first["median"], "runs": measured, "pass": state == "met",
                        "state": state, "near": is_near, "confirmed": len(measured) > 1,
                        "detail": detail})
    return out


def untimed_targets(args, paths):
    """'not measured' rows for the targets of a low-precision dtype left out of --dtypes because this
    CPU emulates it, so the JSON lists every target of issue 17 with the reason it has no figure."""
    out = []
    for dtype, (path, why) in paths.items():
        if path == "native" or dtype in args.dtypes:
            continue
        for H in args.H:
            for threads in args.threads:
                for tid, dt, pass_, other, threshold, what in TARGETS:
                    step = "train" if pass_ == "full" else "inference"
                    if dt != dtype or step not in args.passes:
                        continue
                    out.append({"id": tid, "H": H, "threads": threads, "dtype": dtype, "step": step,
                                "compared_with": other, "threshold": threshold,
                                "target": f"{what} (H={H}, {threads} thread{'s' if threads > 1 else ''})",
                                "status": "not measured",
                                "why": f"not timed: {_emulated(dtype, why)} (--dtypes {dtype} times "
                                       f"it anyway)"})
    return out


def _emulated(dtype, why):
    """Why a low-precision target has no figure on a CPU without that dtype's matrix units."""
    return (f"the fused op's {dtype} is {why}; issue 17's {dtype} targets are for CPUs with {dtype} "
            f"matrix units")


def _why_not_timed(provider, r):
    if r is None:
        return f"{provider}: not run"
    return f"{provider}: {r.get('status')} {r.get('error') or ''}".strip()


def near_groups(targets, passes=tuple(PASSES)):
    """The (H, dtype, threads, pass name) rotations whose targets need a second run."""
    return {(t["H"], t["dtype"], t["threads"], t["step"]) for t in targets
            if t.get("near") and not t.get("confirmed") and t["step"] in passes}


def main(argv=None, log=print):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)  # a ValueError is `mimic-fast bench`'s one error line (cli._run)
    doc = run(args, argv, log)
    print()
    print(markdown_for_doc(doc, brief=True))
    if args.json:
        print(f"raw JSON: {args.json}")
    return 0

