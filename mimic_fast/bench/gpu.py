"""The GPU benchmark (benchmarks/gpu_bench.py, `mimic-fast bench gpu`): one process, a time budget.

--part ops: mimic_loss forward and full step at B=4096, D=1845, k=250, C=183, H in {8000, 400000}
(bf16) for triton, cuda, the chunked reference and eager, their rounds interleaved, then
torch.compile(mode="max-autotune") last (each shape is a long compile); per provider a profiled step
(per-kernel split, kernel count, GPU-busy share), peak memory, the Triton cost model's prediction
and the roofline floor beside each measurement, all at the bf16 matmul peak and copy bandwidth
measured in the same run, before and after (drift > 10% and fractions > 100% are flagged).
--part student: the student against its deep teacher (250L-8k vs DNN 2k-2k-2k, 250L-400k vs the
ensemble of CNNs): training and inference samples/s at batch 4096, batch-1 latency.
Every provider is checked before it is timed; the JSON is rewritten after every case, so a killed
run keeps what it measured; a short table is printed last. `--dry-run` runs it all on CPU, tiny.
"""
import argparse
import gc
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from .._timing import interleave
from ..ops import triton_cost
from . import results, timing
from .providers import LOSS_PROVIDERS, Case, Runner, make_inputs, oom_estimate_bytes, unavailable
from .suites import PAPER, _base_record, flag_noise, run_group, run_student

DEFAULT_BUDGET_S = 170  # scripts/gpu_check.sh gives this part ~190 s of its 8.5 minutes
PASSES = ("forward", "full")


def build_parser(prog="gpu_bench.py"):
    p = argparse.ArgumentParser(allow_abbrev=False, prog=prog, description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="raw JSON path (default benchmarks/results/gpu_<device>.json)")
    p.add_argument("--part", default="ops", choices=("ops", "student", "all"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--small", action="store_true",
                   help="tiny shapes and few rounds: checks the script's logic (use with --device cpu)")
    p.add_argument("--dry-run", action="store_true", help="= --device cpu --small --no-compile")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S, help="wall-clock budget")
    p.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--H", type=int, nargs="+", default=[8000, 400000])
    p.add_argument("--k", type=int, nargs="+", default=[250])
    p.add_argument("--providers", nargs="+", default=["triton", "cuda", "reference", "eager", "compile"])
    p.add_argument("--compile-mode", default="max-autotune")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--no-profile", action="store_true", help="skip the per-kernel split")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--loss-B", type=int, nargs="*", default=[1 << 20],
                   help="batch sizes of the logit-loss bandwidth runs (none: skip them)")
    p.add_argument("--student-batch", type=int, default=4096)
    p.add_argument("--pairs", type=int, nargs="*", default=[0, 2],
                   help="student pairs: 0 dnn-2k vs 250L-8k, 1 cnn vs equal-size student, "
                        "2 cnn ensemble vs 250L-400k")
    p.add_argument("--ensemble-members", type=int, default=9)
    p.add_argument("--summarize", nargs="+", metavar="JSON", default=None,
                   help="only print the short table of these result files (missing ones are skipped)")
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
        # torch.compile on CPU compiles C++ for minutes on a small machine: the dry run skips it.
        args.device, args.small, args.no_compile = "cpu", True, True
    if args.small:
        args.B, args.H, args.k = min(args.B, 64), [256, 1024], [args.k[0]]
        args.warmup, args.rounds = 1, 2
        args.loss_B, args.student_batch = [256] if args.loss_B else [], 8
        args.pairs = [0] if args.pairs else []
        args.ensemble_members = min(args.ensemble_members, 2)
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.no_compile:
        args.providers = [p for p in args.providers if p != "compile"]
    return args


# ---- what sits beside each measurement ------------------------------------------------------------
def _peak_rates(peaks):
    """(TFLOP/s, GB/s) of the best rounds of the measured matmul and copy (None where missing)."""
    mm, cp = peaks.get("matmul") or {}, peaks.get("copy") or {}
    return mm.get("best_tflops") or mm.get("tflops"), cp.get("best_gbps") or cp.get("gbps")


def floor_ms(case, pass_, peaks):
    """The roofline floor: max(model FLOPs / measured mm peak, minimal bytes / measured copy rate)."""
    tf, bw = _peak_rates(peaks)
    t = [case.flops(pass_) / (tf * 1e12)] if tf else []
    if bw:
        t.append(case.bytes(pass_) / (bw * 1e9))
    return max(t) * 1e3 if t else None


def cost_model(case, peaks):
    """mimic_fast.ops.triton_cost's prediction for the Triton kernels at the measured peaks, or
    {"error": why}."""
    tf, bw = _peak_rates(peaks)
    try:
        res = triton_cost.predict(case.B, case.D, case.k, case.H, case.C, dtype=case.dtype,
                                  op="mimic" if case.op == "mimic_loss" else "mlp",
                                  peak_tflops=tf, bandwidth_tbs=bw / 1e3 if bw else None)
    except Exception as e:  # noqa: BLE001 - recorded beside the figures, never fatal
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    res = dict(res)
    res["at"] = {"peak_tflops": tf, "bandwidth_tbs": bw / 1e3 if bw else None,
                 "source": "measured in this run" if tf and bw else "model defaults where missing"}
    return res


def annotate(records, case, peaks, model):
    """floor_ms on every record; for triton, the cost model's predicted_ms / flops / bytes too."""
    for r in records:
        if r["op"] == "mm":
            continue
        r["floor_ms"] = floor_ms(case, r["pass"], peaks)
        if r["provider"] == "triton" and "error" not in model and r["pass"] in model:
            m = model[r["pass"]]
            r["predicted_ms"] = m["time_s"] * 1e3
            r["predicted_flops"], r["predicted_bytes"] = m.get("flops"), m.get("bytes")
            if r.get("median_ms"):
                r["measured_over_predicted"] = r["median_ms"] / r["predicted_ms"]


def _device_time_us(e):
    for name in ("self_device_time_total", "self_cuda_time_total"):
        v = getattr(e, name, None)
        if v is not None:
            return float(v)
    return 0.0


def kernel_split(fn, device, top=8):
    """One profiled call of fn: the top kernels (CUDA) or ops (CPU) by self time, how many kernels
    one call launches, and how much of the call's wall time the device was busy (host-bound < 1)."""
    is_cuda = torch.device(device).type == "cuda"
    fn()
    if is_cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda else [])
    with profile(activities=acts) as prof:
        times, errors = interleave({"step": fn}, device=device, warmup=0, rounds=1)
        if errors:
            raise errors["step"]
        wall_us = times["step"][0] * 1e6
    events = prof.key_averages()
    if is_cuda:
        rows = [(e.key, e.count, _device_time_us(e)) for e in events if _device_time_us(e) > 0
                and getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA]
        launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC",
                                                              "cuLaunchKernel", "cuLaunchKernelEx",
                                                              "cudaGraphLaunch"))
    else:
        rows = [(e.key, e.count, float(e.self_cpu_time_total)) for e in events
                if e.self_cpu_time_total > 0]
        launches = None
    busy_us = sum(r[2] for r in rows)
    rows.sort(key=lambda r: -r[2])
    return {"kernels": [{"name": n[:90], "calls": c, "ms": t / 1e3, "share": t / busy_us if busy_us else None}
                        for n, c, t in rows[:top]],
            "kernel_calls": sum(r[1] for r in rows), "host_launches": launches,
            "busy_ms": busy_us / 1e3, "wall_ms": wall_us / 1e3,
            "busy_share": busy_us / wall_us if wall_us else None,
            "what": "device kernels" if is_cuda else "CPU ops (self time)"}


def _profile_group(case, providers, compile_mode, log):
    """{provider: kernel_split of one full step} for the providers that ran ok."""
    out = {}
    inputs = make_inputs(case)
    for p in providers:
        try:
            out[p] = kernel_split(Runner(p, case, inputs, compile_mode).full, case.device)
            k = out[p]
            log(f"  profile {p:<10} {case.label()}: {k['kernel_calls']} kernels/step, busy "
                f"{100 * (k['busy_share'] or 0):.0f}% of {k['wall_ms']:.2f} ms; top: "
                + ", ".join(f"{x['name'][:40]} {x['ms']:.2f} ms" for x in k["kernels"][:3]))
        except Exception as e:  # noqa: BLE001
            out[p] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return out


# ---- the parts ------------------------------------------------------------------------------------
def run_ops(args, argv=None, log=print):
    budget = Budget(args.budget_s)
    device, dtype = args.device, args.dtype
    doc = results.new_doc("gpu", "python benchmarks/gpu_bench.py " + " ".join(argv or []), device)
    doc["config"] = {k: v for k, v in vars(args).items()}
    doc["profiles"], doc["cost_model"] = {}, {}
    out = args.out
    try:
        doc["peaks"] = timing.measure_peaks(device, getattr(torch, dtype), small=args.small)
    except Exception as e:  # noqa: BLE001
        doc["peaks"] = {"error": f"{type(e).__name__}: {e}"}
    results.write(doc, out)
    log(f"peaks: {doc['peaks']}")

    cases = [Case("mimic_loss", args.B, PAPER["C"], PAPER["D"], k, H, dtype, device)
             for k in args.k for H in args.H]
    # the matmul in every rotation: each figure's fraction of peak from the same rounds
    mm = timing.matmul_fn(device, getattr(torch, dtype), 256 if args.small else None)

    def group(case, providers, need_s):
        runnable = []
        for p in providers:
            why = unavailable(p, case) or _fits(p, case)
            if why is None and budget.left() < need_s:
                why = f"time budget: {budget.left():.0f} s left of {args.budget_s:.0f} s"
            if why:
                log(f"  {p:<10} {case.label()}: skipped ({why})")
                doc["results"].extend(_skip(case, p, PASSES, why))
            else:
                runnable.append(p)
        if not runnable:
            return
        recs = run_group(case, runnable, PASSES, args.warmup, args.rounds, args.compile_mode,
                         max_seconds=15, log=log, matmul=mm)
        if case.label() not in doc["cost_model"]:
            doc["cost_model"][case.label()] = cost_model(case, doc["peaks"])
        model = doc["cost_model"][case.label()]
        annotate(recs, case, doc["peaks"], model)
        doc["results"].extend(recs)
        results.write(doc, out)
        ok = [p for p in runnable if all(r["status"] == "ok" for r in recs if r["provider"] == p)]
        if not args.no_profile and ok and budget.left() > 10:
            profiles = _profile_group(case, ok, args.compile_mode, log)
            doc["profiles"].setdefault(case.label(), {}).update(profiles)
            for r in recs:
                prof = profiles.get(r["provider"]) or {}
                if r["pass"] == "full" and "kernel_calls" in prof:
                    r["kernels_per_step"], r["busy_share"] = prof["kernel_calls"], prof["busy_share"]
            results.write(doc, out)

    log("mimic_loss, providers interleaved:")
    for case in cases:
        group(case, [p for p in args.providers if p != "compile"], 15)
    if args.loss_B:
        log("logit losses (bandwidth):")
        for op in ("logit_mse_loss", "kd_loss"):
            for B in args.loss_B:
                case = Case(op, B, PAPER["C"], dtype=dtype, device=device)
                provs = [p for p in LOSS_PROVIDERS if p != "compile"]
                if budget.left() < 10:
                    for p in provs:
                        doc["results"] += _skip(case, p, PASSES, "time budget")
                    continue
                doc["results"] += run_group(case, provs, PASSES, args.warmup, args.rounds, log=log)
        results.write(doc, out)
    # The second peak measurement comes before torch.compile: a compile that outruns the stage's
    # timeout must not cost the drift check of everything above.
    try:
        doc["peaks_after"] = timing.measure_peaks(device, getattr(torch, dtype), small=args.small)
    except Exception as e:  # noqa: BLE001
        doc["peaks_after"] = {"error": f"{type(e).__name__}: {e}"}
    for w in flag_noise(doc):
        log(f"WARNING: {w}")
    doc["elapsed_s"] = args.budget_s - budget.left()
    results.write(results.finish(doc), out)
    if "compile" in args.providers:
        log(f"torch.compile(mode={args.compile_mode!r}), last (each shape is a long compile):")
        for case in sorted(cases, key=lambda c: c.H):
            group(case, ["compile"], 60)
        flag_noise(doc)
        doc["elapsed_s"] = args.budget_s - budget.left()
        results.write(results.finish(doc), out)
    return doc


def run_students(args, argv=None, log=print):
    ns = argparse.Namespace(device=args.device, dtype=args.dtype, batch=args.student_batch,
                            warmup=args.warmup, rounds=args.rounds, pairs=args.pairs,
                            ensemble_members=args.ensemble_members, student_eager=False,
                            max_seconds=10, json=args.out)
    doc = run_student(ns, ["student"] + list(argv or []), log=log)
    doc["command"] = "python benchmarks/gpu_bench.py " + " ".join(argv or [])
    results.write(doc, args.out)
    gc.collect()
    return doc


def short_table(doc):
    """The few lines printed last: per case and provider, min/median ms, TFLOP/s, % of peak, the
    prediction, kernels per step, GPU-busy share, peak memory, status."""
    lines = []
    env = doc.get("env") or {}
    lines.append(f"device: {env.get('device')}  torch {env.get('torch')}  triton {env.get('triton')}  "
                 f"CUDA {env.get('torch_cuda')}")
    peaks, after = doc.get("peaks") or {}, doc.get("peaks_after") or {}
    peak, bw = _peak_rates(peaks)
    if peak:
        pa, ba = _peak_rates(after)
        lines.append(f"measured peaks (best rounds): mm {peak:.4g} TFLOP/s"
                     + (f" (after: {pa:.4g})" if pa else "") + (f", copy {bw:.0f} GB/s" if bw else "")
                     + (f" (after: {ba:.0f})" if ba else ""))
    rows = [r for r in doc.get("results", []) if r.get("op") == "mimic_loss"]
    if rows:
        lines.append(f"{'case':<18}{'provider':<10}{'fwd ms':>8}{'full ms':>9}{'min':>8}{'TFLOP/s':>8}"
                     f"{'%pk':>5}{'pred':>7}{'floor':>7}{'kern':>6}{'busy':>5}{'MiB':>7}  status")
    by = {}
    for r in rows:
        by.setdefault((f"k{r['shape']['k']} H{r['shape']['H']}", r["provider"]), {})[r["pass"]] = r
    for (label, prov), m in by.items():
        f, full = m.get("forward", {}), m.get("full", {})

        def num(v, w, fmt):
            return f"{v:{w}{fmt}}" if v is not None else f"{'-':>{w}}"

        tf = full.get("tflops")
        busy = full.get("busy_share")
        st = full.get("status", "?")
        err = "" if st == "ok" else f" {(full.get('error') or '')[:60]}"
        if full.get("graph_bytes"):
            err += f" (+{full['graph_bytes'] / 2**20:.0f} MiB held by its CUDA graphs)"
        mem = full.get("peak_mem_bytes")
        lines.append(f"{label:<18}{prov:<10}{num(f.get('median_ms'), 8, '.2f')}"
                     f"{num(full.get('median_ms'), 9, '.2f')}{num(full.get('min_ms'), 8, '.2f')}"
                     f"{num(tf, 8, '.1f')}{num(100 * tf / peak if tf and peak else None, 5, '.0f')}"
                     f"{num(full.get('predicted_ms'), 7, '.2f')}{num(full.get('floor_ms'), 7, '.2f')}"
                     f"{num(full.get('kernels_per_step'), 6, 'd')}"
                     f"{num(100 * busy if busy else None, 5, '.0f')}"
                     f"{num(mem / 2**20 if mem is not None else None, 7, '.0f')}  {st}{err}")
    for r in doc.get("results", []):
        if r.get("op") in ("logit_mse_loss", "kd_loss") and r.get("pass") == "forward":
            g = r.get("gbps")
            frac = f" = {100 * g / bw:.0f}% of copy" if g and bw else ""
            lines.append(f"{r['op']} B{r['shape']['B']} C{r['shape']['C']} {r['provider']:<8} "
                         + (f"{r['median_ms']:.3f} ms {g:.0f} GB/s{frac}" if g else r["status"]))
    for r in doc.get("results", []):
        if r.get("metric"):
            if r.get("samples_per_s"):
                lines.append(f"{r['model']:<28} {r['metric']:<11} b{r['batch']:<5} "
                             f"{r['samples_per_s']:12.0f} samples/s  {r['median_ms']:.3f} ms")
            else:
                lines.append(f"{r['model']:<28} {r['metric']:<11} {r['status']}: {r.get('error')}")
    for t in doc.get("targets") or []:
        if "measured" in t:
            lines.append(f"target: {t['target']}: {t['measured']:.3g} ({'met' if t['pass'] else 'MISSED'})")
    for w in doc.get("warnings") or []:
        lines.append(f"WARNING: {w}")
    return "\n".join(lines)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = configure(build_parser().parse_args(argv))
    if args.summarize:
        for path in args.summarize:
            if os.path.exists(path) and os.path.getsize(path):
                with open(path) as f:
                    print(short_table(json.load(f)))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_bench: error: no CUDA device: run with --dry-run to check the logic on a CPU",
              file=sys.stderr)
        return 2
    if args.out is None:
        name = "cpu_small" if args.device == "cpu" else \
            torch.cuda.get_device_name(0).lower().replace(" ", "_")
        args.out = f"benchmarks/results/gpu_{name}{'' if args.part == 'ops' else '_' + args.part}.json"
    docs = []
    if args.part in ("ops", "all"):
        docs.append(run_ops(args, argv))
    if args.part in ("student", "all"):
        if args.part == "all":
            args.out = args.out.replace(".json", "_student.json")
        docs.append(run_students(args, argv))
    print(f"\nraw JSON: {args.out}")
    for doc in docs:
        print(short_table(doc))
    return 0


__all__ = ["main", "short_table", "kernel_split", "cost_model"]
