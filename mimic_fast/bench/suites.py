"""The benchmark suites behind `mimic-fast bench`: ops, memory, student (vs teacher), and their JSON.

Result file schema ("mimic_fast.bench/1"): {schema, suite, created, command, note, env, peaks,
results: [record], targets: [target]}; a record is one (op, pass, provider, case) with its status
("ok" | "incorrect" | "error" | "oom" | "skipped"), timing (median/q20/q80 ms), FLOPs, bytes,
TFLOP/s, GB/s and, where measured, peak_mem_bytes. Nothing is timed before it is checked.
"""
import datetime
import gc
import json
import os
import sys
import time

import torch

from ..ops import flops
from . import timing
from .providers import LOSS_PROVIDERS, MLP_PROVIDERS, Case, Runner, check_provider, make_inputs, \
    unavailable

SCHEMA = "mimic_fast.bench/1"
PAPER = {"D": 1845, "k": 250, "C": 183}
CPU_NOTE = ("CPU figures from a shared, noisy machine (few cores, other jobs running): compare "
            "providers within one file, not across machines or runs.")


def new_doc(suite, device, argv=None, note=None):
    return {"schema": SCHEMA, "suite": suite,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": "mimic-fast bench " + " ".join(argv or []), "note": note,
            "env": timing.environment(device), "peaks": {}, "results": [], "targets": []}


def write_doc(doc, path):
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def reset_compiler():
    # Each compiled case starts clean: dynamo's per-function recompile limit would otherwise make a
    # later shape silently fall back to eager and be timed as "compile".
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def _base_record(case, provider, pass_):
    return {"name": f"{case.op}/{pass_}/{provider}/{case.label()}/{case.dtype}/{case.device}",
            "op": case.op, "pass": pass_, "provider": provider, "shape": case.shape(),
            "dtype": case.dtype, "device": case.device, "activation": case.activation,
            "flops": case.flops(pass_), "bytes": case.bytes(pass_), "status": "ok", "error": None}


def _short(e):
    return f"{type(e).__name__}: {e}".splitlines()[0][:400]


def run_case(case, provider, passes, warmup=1, rounds=5, compile_mode=None, check=True,
             max_seconds=None, cuda_memory=True, log=print):
    """Records for `provider` on `case`, one per pass; a failing provider yields error records."""
    return run_group(case, [provider], passes, warmup, rounds, compile_mode, check, max_seconds,
                     cuda_memory, log)


def _status_of(e):
    if isinstance(e, AssertionError):
        return "incorrect"
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return "oom"
    return "error"


def run_group(case, providers, passes, warmup=1, rounds=5, compile_mode=None, check=True,
              max_seconds=None, cuda_memory=True, log=print):
    """Records for every provider on `case` (one per pass), timed with their rounds interleaved.

    Each provider is checked against the float64 reference first; one that is unavailable, wrong
    or failing gets "skipped" / "incorrect" / "error" / "oom" records and is never timed, and the
    others go on. Interleaving (a, b, c, a, b, c, ...) puts every provider under the same load
    drift, so the ratios between them hold on a noisy machine; min_ms is reported beside the median.
    """
    records = {p: [_base_record(case, p, ps) for ps in passes] for p in providers}
    is_cuda = torch.device(case.device).type == "cuda"

    def fail(p, status, msg):
        for r in records[p]:
            if r["status"] == "ok" and r.get("median_ms") is None:
                r["status"], r["error"] = status, msg
        log(f"  {p:<10} {case.op} {case.label()}: {status}: {msg}")

    runners = {}
    inputs = None
    for p in providers:
        why = unavailable(p, case)
        if why:
            fail(p, "skipped", why)
            continue
        if p == "compile":
            reset_compiler()
        try:
            if check:
                # compile is checked at the timed size: a small-size check would cost a second compile
                check_provider(p, case, compile_mode, small=p != "compile")
            if inputs is None:
                inputs = make_inputs(case)
            runners[p] = Runner(p, case, inputs, compile_mode)
        except Exception as e:  # noqa: BLE001 - one failing provider must not kill the run
            fail(p, _status_of(e), _short(e))
    try:
        for i, pass_ in enumerate(passes):
            live = {p: r for p, r in runners.items() if records[p][i]["status"] == "ok"}
            if not live:
                continue
            timed = {p: r.timed(pass_) for p, r in live.items()}
            times, errors = timing.time_interleaved(
                {p: t[0] for p, t in timed.items()}, case.device, warmup, rounds,
                {p: t[1] for p, t in timed.items() if t[1] is not None}, max_seconds)
            for p, e in errors.items():
                fail(p, _status_of(e), _short(e))
                runners.pop(p, None)
            for p in live:
                if p in errors or not times[p]:
                    continue
                r = records[p][i]
                r.update(timing.summarize(times[p]))
                r["interleaved_with"] = sorted(live)
                r["tflops"], r["gbps"] = timing.throughput(r["flops"], r["bytes"], r["median_ms"] / 1e3)
        for p, runner in runners.items():
            full = [r for r in records[p] if r["pass"] == "full" and r["status"] == "ok"]
            if full and is_cuda and cuda_memory:
                try:
                    full[0]["peak_mem_bytes"] = _cuda_peak(runner)
                    full[0]["grad_bytes"] = _grad_bytes(case)
                    if p == "cuda":  # resident between steps, so not in the peak over "before"
                        full[0]["graph_bytes"] = _cuda_graph_bytes()
                except Exception as e:  # noqa: BLE001
                    fail(p, _status_of(e), _short(e))
            ok = [r for r in records[p] if r.get("median_ms") is not None]
            if ok:
                log("  " + "  ".join(f"{p:<10} {r['pass']:<8} {case.label()} {r['median_ms']:9.3f} ms "
                                     f"(min {r['min_ms']:.3f})" for r in ok))
    finally:
        inputs = runners = None  # noqa: F841
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()
    return [r for p in providers for r in records[p]]


def _cuda_graph_bytes():
    from ..ops import cuda

    return cuda.graph_stats()["bytes"]


def _cuda_peak(runner):
    from .memory import cuda_peak_bytes

    return cuda_peak_bytes(runner.full)


def _grad_bytes(case):
    """Bytes of the parameter gradients a full step must return (part of every provider's peak)."""
    es = flops.element_size(case.dtype)
    if case.is_mlp:
        return flops.mlp_params(case.D, case.k, case.H, case.C) * es
    return case.B * case.C * es


def mlp_cases(Bs, Hs, ks, dtype, device, ops=("bottleneck_mlp", "mimic_loss")):
    return [Case(op, B, PAPER["C"], PAPER["D"], k, H, dtype, device)
            for op in ops for B in Bs for k in ks for H in Hs]


def add_cpu_memory(doc, cases, providers, compile_mode=None, log=print):
    """Peak RSS of a full step per (case, provider), measured in a subprocess, as `memory` records."""
    from .memory import cpu_peak_bytes

    jobs = [{"case": c.as_dict(), "provider": p, "compile_mode": compile_mode}
            for c in cases for p in providers if unavailable(p, c) is None]
    for res in cpu_peak_bytes(jobs):
        case = Case(**res["case"])
        r = _base_record(case, res["provider"], "full")
        r["name"] = "memory/" + r["name"]
        r.update(kind="memory", peak_mem_bytes=res["peak_mem_bytes"], grad_bytes=_grad_bytes(case),
                 method="peak RSS growth in a subprocess (VmHWM - VmRSS)")
        if res.get("error"):
            r["status"], r["error"] = "error", res["error"]
        doc["results"].append(r)
        mb = "-" if r["peak_mem_bytes"] is None else f"{r['peak_mem_bytes'] / 2**20:.1f} MiB"
        log(f"  memory {res['provider']:<10} {case.label()} {mb} {r['error'] or ''}")


def measure_peaks(device, dtype, small=False):
    """The ceilings every fraction is scored against, measured now: the dtype's matmul rate and, on
    a GPU, the device-copy bandwidth."""
    peaks = {"matmul": timing.measure_matmul_peak(device, dtype, n=1024 if small else None)}
    if torch.device(device).type == "cuda":
        peaks["copy"] = timing.measure_copy_bandwidth(device, nbytes=(1 << 24) if small else 1 << 30)
    return peaks


def flag_noise(doc):
    """Warnings a reader must see before trusting the figures: peaks measured before and after the
    run that differ by more than DRIFT_LIMIT, and any throughput above its measured peak."""
    warn = []
    before, after = doc["peaks"], doc.get("peaks_after") or {}
    for name, field in (("matmul", "tflops"), ("copy", "gbps")):
        d = timing.peak_drift((before.get(name) or {}).get(field), (after.get(name) or {}).get(field))
        if d is not None and d > timing.DRIFT_LIMIT:
            warn.append(f"{name} peak drifted {100 * d:.0f}% during the run "
                        f"({before[name][field]:.4g} before, {after[name][field]:.4g} after): "
                        f"the machine's load changed, fractions of peak are unreliable")
    peak = max([(p.get("matmul") or {}).get("tflops") or 0 for p in (before, after)])
    bw = max([(p.get("copy") or {}).get("gbps") or 0 for p in (before, after)])
    for r in doc["results"]:
        if r.get("op") in ("bottleneck_mlp", "mimic_loss", "mm") and r.get("tflops") and peak \
                and r.get("provider") != "torch.mm" and r["tflops"] > peak:
            warn.append(f"{r['name']}: {r['tflops']:.4g} TFLOP/s is {100 * r['tflops'] / peak:.0f}% "
                        f"of the measured matmul peak (>100%: the peak or the timing is wrong)")
        if r.get("op") in ("logit_mse_loss", "kd_loss") and r.get("gbps") and bw and r["gbps"] > bw:
            warn.append(f"{r['name']}: {r['gbps']:.4g} GB/s is {100 * r['gbps'] / bw:.0f}% of the "
                        f"measured copy bandwidth (>100%: cached, or the byte count is wrong)")
    doc["warnings"] = warn
    return warn


def run_ops(args, argv=None, log=print):
    """bottleneck_mlp (forward/backward/full), mimic_loss (forward/full) and the logit losses."""
    device = args.device
    doc = new_doc("ops", device, argv, CPU_NOTE if device == "cpu" else None)
    cd = "float32" if device == "cpu" else "bfloat16"
    pdtype = getattr(torch, args.dtype or cd)
    doc["peaks"] = measure_peaks(device, pdtype)
    log(f"matmul peak: {doc['peaks']['matmul']['tflops']:.3f} TFLOP/s ({doc['peaks']['matmul']['dtype']})")
    providers = args.providers or [p for p in MLP_PROVIDERS if p != "triton" or device != "cpu"]
    compile_mode = args.compile_mode
    for case in mlp_cases(args.B, args.H, args.k, args.dtype or cd, device):
        passes = ("forward", "backward", "full") if case.op == "bottleneck_mlp" else ("forward", "full")
        doc["results"] += run_group(case, providers, passes, args.warmup, args.rounds, compile_mode,
                                    max_seconds=args.max_seconds, log=log)
        write_doc(doc, args.json)
    if args.loss:
        for op in ("logit_mse_loss", "kd_loss"):
            for B in args.loss_B:
                case = Case(op, B, PAPER["C"], dtype=args.dtype or cd, device=device)
                doc["results"] += run_group(case, LOSS_PROVIDERS, ("forward", "full"), args.warmup,
                                            args.rounds, compile_mode, log=log)
        write_doc(doc, args.json)
    if device == "cpu" and args.memory:
        cases = mlp_cases(args.B, args.H, args.k, args.dtype or cd, device, ops=("mimic_loss",))
        add_cpu_memory(doc, cases, [p for p in providers if p != "triton"], compile_mode, log=log)
    if device == "cpu" and TARGET_H in args.H and TARGET_B in args.B and (args.dtype or cd) == "float32":
        doc["results"] += interleaved_target_runs(providers, args.warmup, max(args.rounds, 5), log)
    doc["peaks_after"] = measure_peaks(device, pdtype)
    for w in flag_noise(doc):
        log(f"WARNING: {w}")
    doc["targets"] = cpu_targets(doc) if device == "cpu" else []
    write_doc(doc, args.json)
    return doc


TARGET_B, TARGET_H = 256, 32768


def interleaved_target_runs(providers, warmup, rounds, log=print):
    """The target's three figures, timed round-robin: fused and eager mimic_loss full steps and a
    square fp32 matmul (the "plain matmul throughput measured in the same run")."""
    case = Case("mimic_loss", TARGET_B, PAPER["C"], PAPER["D"], PAPER["k"], TARGET_H)
    fused = "cpu" if unavailable("cpu", case) is None else "reference"
    fns, recs = {}, {}
    inputs = make_inputs(case)
    for p in ("eager", fused):
        if p in providers:
            fns[p] = Runner(p, case, inputs).full
            recs[p] = _base_record(case, p, "full")
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    fns["mm"] = lambda: torch.mm(a, b)
    recs["mm"] = {"name": f"mm/{n}x{n}x{n}/float32/cpu", "op": "mm", "pass": "forward",
                  "provider": "torch.mm", "shape": {"M": n, "N": n, "K": n}, "dtype": "float32",
                  "device": "cpu", "flops": flops.mm_flops(n, n, n), "bytes": None, "status": "ok",
                  "error": None}
    times, errors = timing.time_interleaved(fns, "cpu", warmup, rounds)
    out = []
    for p, r in recs.items():
        if p in errors:
            r["status"], r["error"] = _status_of(errors[p]), _short(errors[p])
            out.append(r)
            continue
        r["name"] = "interleaved/" + r["name"]
        r["kind"] = "interleaved"
        r.update(timing.summarize(times[p]))
        r["tflops"], r["gbps"] = timing.throughput(r["flops"], r["bytes"], r["median_ms"] / 1e3)
        log(f"  interleaved {p:<10} {r['median_ms']:9.2f} ms  {r['tflops'] * 1e3:7.1f} GFLOP/s")
        out.append(r)
    return out


def run_memory(args, argv=None, log=print):
    """Peak memory of a mimic_loss training step vs H for every provider."""
    device = args.device
    doc = new_doc("memory", device, argv, CPU_NOTE if device == "cpu" else None)
    cd = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    providers = args.providers or [p for p in MLP_PROVIDERS if p != "triton" or device != "cpu"]
    cases = mlp_cases(args.B, args.H, args.k, cd, device, ops=("mimic_loss",))
    if device == "cpu":
        add_cpu_memory(doc, cases, providers, args.compile_mode, log=log)
    else:
        for case in cases:
            for p in providers:
                for r in run_case(case, p, ("full",), 1, 1, args.compile_mode, log=log):
                    r["name"], r["kind"] = "memory/" + r["name"], "memory"
                    doc["results"].append(r)
                write_doc(doc, args.json)
    write_doc(doc, args.json)
    return doc


def _find(doc, **want):
    for r in doc["results"]:
        if all((r.get(k) if k != "H" else (r.get("shape") or {}).get("H")) == v for k, v in want.items()):
            return r
    return None


def cpu_targets(doc, H=32768, B=256):
    """The issue's CPU targets at B=256, D=1845, k=250, C=183, H=32768, fp32, each with its figures."""
    out = []
    fused = "cpu"
    key = dict(op="mimic_loss", H=H, dtype="float32")
    # Prefer the interleaved runs (same load for every figure); fall back to the suite's own.
    for kind in ("interleaved", None):
        tf = _find(doc, provider="cpu", kind=kind, **{"pass": "full"}, **key)
        if tf is None or tf["status"] != "ok":
            fused = "reference"
            tf = _find(doc, provider="reference", kind=kind, **{"pass": "full"}, **key)
        te = _find(doc, provider="eager", kind=kind, **{"pass": "full"}, **key)
        if tf and te:
            break
    if tf is None:
        return []  # this run timed no fused provider (e.g. --providers eager compile)
    if not (tf and te and tf["status"] == te["status"] == "ok" and tf["shape"]["B"] == B):
        return [{"target": "CPU targets", "status": "not measured",
                 "why": f"no ok mimic_loss/full records for {fused} and eager at B={B}, H={H}"}]
    ratio = tf["median_ms"] / te["median_ms"]
    out.append({"target": f"{fused} forward+backward time <= 1.10 x eager", "measured": ratio,
                "threshold": 1.10, "pass": ratio <= 1.10,
                "detail": f"{tf['median_ms']:.1f} ms vs {te['median_ms']:.1f} ms (mimic_loss full"
                          + (", interleaved rounds)" if tf.get("kind") == "interleaved" else ")")})
    mf_ = _find(doc, kind="memory", provider=fused, **key)
    me = _find(doc, kind="memory", provider="eager", **key)
    if mf_ and me and mf_.get("peak_mem_bytes") and me.get("peak_mem_bytes"):
        r = mf_["peak_mem_bytes"] / me["peak_mem_bytes"]
        out.append({"target": f"{fused} peak memory <= 0.25 x eager (step peak incl. gradients)",
                    "measured": r, "threshold": 0.25, "pass": r <= 0.25,
                    "detail": f"{mf_['peak_mem_bytes'] / 2**20:.1f} MiB vs "
                              f"{me['peak_mem_bytes'] / 2**20:.1f} MiB"})
        g = mf_["grad_bytes"]
        fa, ea = mf_["peak_mem_bytes"] - g, me["peak_mem_bytes"] - g
        if ea > 0:
            out.append({"target": f"{fused} peak memory <= 0.25 x eager (excluding the parameter "
                                  f"gradients both must return)", "measured": fa / ea,
                        "threshold": 0.25, "pass": fa / ea <= 0.25,
                        "detail": f"{fa / 2**20:.1f} MiB vs {ea / 2**20:.1f} MiB beyond {g / 2**20:.1f} "
                                  f"MiB of gradients"})
    mm = _find(doc, kind="interleaved", op="mm")
    peak = mm["tflops"] if mm and tf.get("kind") == "interleaved" else \
        doc["peaks"].get("matmul", {}).get("tflops")
    if peak and tf.get("tflops"):
        r = tf["tflops"] / peak
        out.append({"target": f"{fused} forward+backward >= 0.70 x plain matmul throughput (same run)",
                    "measured": r, "threshold": 0.70, "pass": r >= 0.70,
                    "detail": f"{tf['tflops'] * 1e3:.1f} GFLOP/s vs square fp32 mm "
                              f"{peak * 1e3:.1f} GFLOP/s"
                              + (" (interleaved rounds)" if tf.get("kind") == "interleaved" else "")})
    return out


# ---------------------------------------------------------------- student vs teacher

def _student_width_matching(params, D, C, k=250):
    """Hidden width H of a 250L student with about `params` parameters (U, V, b1, W, b2)."""
    return max(1, round((params - k * D - C) / (k + C + 1)))


def student_pairs(D=PAPER["D"], C=PAPER["C"], ensemble_members=9, device="cpu"):
    """[(pair name, teacher builder, student builder)] at the paper's pairings; builders are lazy."""
    from .. import models as M

    def b(name, **kw):
        return lambda: M.build_model(name, in_features=D, num_classes=C, device=device, **kw)

    cnn_params = M.count_parameters(M.build_model("cnn", in_features=D, num_classes=C, device="meta"))
    h_eq = _student_width_matching(cnn_params, D, C)

    def ensemble():
        return M.TeacherEnsemble([M.build_model("cnn", in_features=D, num_classes=C, device=device)
                                  for _ in range(ensemble_members)])

    return [("dnn-2k vs snn-mimic-8k", ("dnn-2k", b("dnn-2k")), ("snn-mimic-8k", b("snn-mimic-8k"))),
            (f"cnn vs 250L-{h_eq} (equal params)", ("cnn", b("cnn")),
             (f"snn-mimic-{h_eq}", b("snn-mimic-8k", hidden=h_eq))),
            (f"ensemble of {ensemble_members} cnn vs snn-mimic-400k",
             (f"ensemble-{ensemble_members}xcnn", ensemble), ("snn-mimic-400k", b("snn-mimic-400k")))]


class _EagerStudent(torch.nn.Module):
    """The student's own parameters run as an unfused chain (for context beside the fused run)."""

    def __init__(self, student):
        super().__init__()
        self.s = student

    def forward(self, x):
        from .providers import _eager_mlp

        s = self.s
        return _eager_mlp(x, s.U, s.V, s.b1, s.W, s.b2, s.activation)


def _model_flops(model, D):
    if hasattr(model, "U") and hasattr(model, "W"):
        return flops.mlp_flops(1, D, model.U.shape[0], model.V.shape[0], model.W.shape[0], "forward")
    try:
        return flops.model_flops_per_sample(model, (D,))
    except Exception:  # noqa: BLE001 - a count is context, never worth failing a run
        return None


def measure_model(name, role, model, device, dtype, batch, warmup, rounds, D, C, train_fused,
                  max_seconds=None, log=print):
    """Inference samples/s at `batch`, training-step samples/s at `batch`, batch-1 latency (ms)."""
    from ..models import count_parameters

    model = model.to(device=device, dtype=dtype)
    base = {"suite": "student", "model": name, "role": role, "device": device, "dtype": str(dtype)[6:],
            "params": count_parameters(model), "flops_per_sample": _model_flops(model, D)}
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(batch, D, generator=g).to(device, dtype)
    tb = torch.randn(batch, C, generator=g).to(device, dtype)
    x1 = xb[:1].clone()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    out = []

    def infer(x):
        with torch.no_grad():
            return model(x)

    def train_step():
        opt.zero_grad(set_to_none=True)
        loss = model.mimic_loss(xb, tb) if train_fused else torch.nn.functional.mse_loss(model(xb), tb)
        loss.backward()
        opt.step()

    for metric, fn, bsz, mode in (("inference", lambda: infer(xb), batch, "eval"),
                                  ("train_step", train_step, batch, "train"),
                                  ("latency_b1", lambda: infer(x1), 1, "eval")):
        rec = {**base, "metric": metric, "batch": bsz, "status": "ok", "error": None,
               "name": f"student/{metric}/{name}/b{bsz}/{str(dtype)[6:]}/{device}"}
        try:
            model.train(mode == "train")
            s = timing.summarize(timing.time_fn(fn, device, warmup, rounds if bsz > 1 else 3 * rounds,
                                                max_seconds=max_seconds))
            rec.update(s)
            rec["samples_per_s"] = bsz / (s["median_ms"] / 1e3)
            log(f"  {name:<22} {metric:<11} b={bsz:<4} {s['median_ms']:9.3f} ms  "
                f"{rec['samples_per_s']:10.0f} samples/s")
        except torch.cuda.OutOfMemoryError as e:
            rec.update(status="oom", error=_short(e))
        except Exception as e:  # noqa: BLE001
            rec.update(status="error", error=_short(e))
            log(f"  {name} {metric}: {rec['error']}")
        out.append(rec)
    model.train(False)
    return out


def run_student(args, argv=None, log=print):
    """Teacher vs student pairs: inference and training throughput, batch-1 latency."""
    device = args.device
    doc = new_doc("student", device, argv, CPU_NOTE if device == "cpu" else None)
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    D, C = PAPER["D"], PAPER["C"]
    pairs = student_pairs(D, C, args.ensemble_members, device)
    selected = pairs if args.pairs is None else [pairs[i] for i in args.pairs]
    for pair, (tname, tbuild), (sname, sbuild) in selected:
        log(f"{pair}:")
        for name, role, build in ((tname, "teacher", tbuild), (sname, "student", sbuild)):
            try:
                torch.manual_seed(0)
                model = build()
            except Exception as e:  # noqa: BLE001
                doc["results"].append({"suite": "student", "pair": pair, "model": name, "role": role,
                                       "name": f"student/build/{name}", "status": "error",
                                       "error": _short(e)})
                continue
            recs = measure_model(name, role, model, device, dtype, args.batch, args.warmup,
                                 args.rounds, D, C, train_fused=role == "student",
                                 max_seconds=args.max_seconds, log=log)
            if role == "student" and args.student_eager:
                recs += measure_model(name + " (eager)", "student-eager", _EagerStudent(model), device,
                                      dtype, args.batch, args.warmup, args.rounds, D, C, False,
                                      max_seconds=args.max_seconds, log=log)
            for r in recs:
                r["pair"] = pair
            doc["results"] += recs
            model = None
            gc.collect()
            if device != "cpu":
                torch.cuda.empty_cache()
            write_doc(doc, args.json)
    doc["targets"] = student_targets(doc)
    write_doc(doc, args.json)
    return doc


def student_targets(doc, batch=256):
    def get(model, metric):
        for r in doc["results"]:
            if r.get("model") == model and r.get("metric") == metric and r.get("status") == "ok":
                return r
        return None

    s, t = get("snn-mimic-8k", "inference"), get("dnn-2k", "inference")
    if not (s and t):
        return [{"target": "snn-mimic-8k inference >= 2.5 x dnn-2k", "status": "not measured"}]
    ratio = s["samples_per_s"] / t["samples_per_s"]
    fr = (t["flops_per_sample"] / s["flops_per_sample"]) if s.get("flops_per_sample") and \
        t.get("flops_per_sample") else None
    return [{"target": f"snn-mimic-8k inference throughput >= 2.5 x dnn-2k (batch {s['batch']}, "
                       f"{doc['env'].get('device')})", "measured": ratio, "threshold": 2.5,
             "pass": ratio >= 2.5,
             "detail": f"{s['samples_per_s']:.0f} vs {t['samples_per_s']:.0f} samples/s; FLOP ratio "
                       + (f"{fr:.2f}" if fr else "n/a")}]


def print_summary(doc, file=sys.stdout):
    from .report import markdown_for_doc

    print(markdown_for_doc(doc, brief=True), file=file)


def elapsed(t0):
    return time.perf_counter() - t0
