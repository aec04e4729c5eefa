"""The benchmark suites behind `mimic-fast bench`: ops, memory, student (vs teacher).

Each writes one result document (schema in results.py). Nothing is timed before it is checked; the
providers of a case, and the matmul the figures are scored against, are timed with their rounds
interleaved by the one timer (mimic_fast._timing).
"""
import gc

import torch

from .. import dispatch
from .. import models as M
from .._timing import interleave
from ..ops import flops
from ..testing import eager_mlp
from . import results, timing
from .memory import cpu_peak_bytes, cuda_peak_bytes
from .providers import LOSS_PROVIDERS, MLP_PROVIDERS, Case, Runner, check_provider, make_inputs, \
    onnx_file, unavailable

PAPER = {"D": 1845, "k": 250, "C": 183}
CPU_NOTE = ("CPU figures from a shared, noisy machine (few cores, other jobs running): compare "
            "providers within one file, not across machines or runs.")


def command_line(argv):
    return "mimic-fast bench " + " ".join(argv or [])


def reset_compiler():
    # Each compiled case starts clean: dynamo's per-function recompile limit would otherwise make a
    # later shape silently fall back to eager and be timed as "compile", and inductor's CPU code
    # bakes in the thread count it was compiled for.
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


def _base_record(case, provider, pass_):
    return {"name": f"{case.op}/{pass_}/{provider}/{case.label()}/{case.dtype}/{case.device}",
            "op": case.op, "pass": pass_, "provider": provider, "shape": case.shape(),
            "dtype": case.dtype, "device": case.device, "activation": case.activation,
            "flops": case.flops(pass_), "bytes": case.bytes(pass_), "status": "ok", "error": None}


def _mm_record(case, pass_, n, fl):
    return {"name": f"mm/{pass_}/torch.mm/{case.label()}/{case.dtype}/{case.device}", "op": "mm",
            "pass": pass_, "provider": "torch.mm", "shape": {"M": n, "N": n, "K": n},
            "dtype": case.dtype, "device": case.device, "flops": fl, "bytes": None, "status": "ok",
            "error": None, "beside": case.shape()}


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
              max_seconds=None, cuda_memory=True, log=print, matmul=None, onnx_dir=None):
    """Records for every provider on `case` (one per pass), timed with their rounds interleaved.

    Each provider is checked against the float64 reference first; one that is unavailable, wrong
    or failing gets "skipped" / "incorrect" / "error" / "oom" records and is never timed, and the
    others go on. Interleaving (a, b, c, a, b, c, ...) puts every provider under the same load
    drift, so the ratios between them hold on a noisy machine; min_ms is reported beside the median.
    matmul=(fn, flops, n) (timing.matmul_fn) joins every pass's rotation as provider "torch.mm",
    so each figure has the matmul rate of the same rounds beside it (op "mm" records).
    """
    records = {p: [_base_record(case, p, ps) for ps in passes] for p in providers}
    is_cuda = torch.device(case.device).type == "cuda"
    grads = any(ps in ("backward", "full") for ps in passes)

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
            # compile and onnx are checked at the timed size: a small-size check would cost a second
            # compile / export, and the checked file is the one timed
            full_size = p in ("compile", "onnx")
            if check or p == "onnx":
                check_provider(p, case, compile_mode, small=not full_size, grads=grads,
                               onnx_dir=onnx_dir)
            if inputs is None:
                inputs = make_inputs(case)
            path = onnx_file(onnx_dir, case) if p == "onnx" else None
            runners[p] = Runner(p, case, inputs, compile_mode, path)
        except Exception as e:  # noqa: BLE001 - one failing provider must not kill the run
            fail(p, _status_of(e), _short(e))
    mm_records = []
    try:
        for i, pass_ in enumerate(passes):
            live = {p: r for p, r in runners.items() if records[p][i]["status"] == "ok"}
            if not live:
                continue
            timed = {p: r.timed(pass_) for p, r in live.items()}
            fns = {p: t[0] for p, t in timed.items()}
            if matmul is not None:
                fns["torch.mm"] = matmul[0]
            times, errors = interleave(fns, device=case.device, warmup=warmup, rounds=rounds,
                                       setups={p: t[1] for p, t in timed.items() if t[1] is not None},
                                       max_seconds=max_seconds)
            together = sorted(p for p in fns if p not in errors)
            if matmul is not None:
                mm = _mm_record(case, pass_, matmul[2], matmul[1])
                if "torch.mm" in errors:
                    mm["status"], mm["error"] = _status_of(errors["torch.mm"]), _short(errors["torch.mm"])
                else:
                    mm.update(timing.rate_record(times["torch.mm"], matmul[1]), interleaved_with=together)
                mm_records.append(mm)
            for p in live:
                if p in errors:
                    fail(p, _status_of(errors[p]), _short(errors[p]))
                    runners.pop(p, None)
                    continue
                r = records[p][i]
                r.update(timing.rate_record(times[p], r["flops"], r["bytes"]), interleaved_with=together)
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
                log("  " + "  ".join(f"{p:<10} {r['pass']:<9} {case.label()} {r['median_ms']:9.3f} ms "
                                     f"(min {r['min_ms']:.3f})" for r in ok))
    finally:
        inputs = runners = None  # noqa: F841
        gc.collect()
        if is_cuda:
            torch.cuda.empty_cache()
    return [r for p in providers for r in records[p]] + mm_records


def _cuda_graph_bytes():
    return dispatch.get("cuda").graph_stats()["bytes"]


def _cuda_peak(runner):
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


def flag_noise(doc):
    """Warnings a reader must see before trusting the figures (stored in doc["warnings"]): a peak
    that drifted by more than DRIFT_LIMIT during the run (before vs after, and across the matmul
    rounds interleaved with the cases of one dtype and thread count), and any figure above the best
    same-run peak of its dtype, the matmul's own rows included."""
    warn = []
    before, after = doc.get("peaks") or {}, doc.get("peaks_after") or {}
    for key in sorted(set(before) & set(after)):
        b, a = before[key], after[key]
        if not (isinstance(b, dict) and isinstance(a, dict)):
            continue  # a peak that could not be measured ({"error": ...})
        field = "best_gbps" if b.get("op") == "copy" else "best_tflops"
        vb, va = b.get(field) or b.get(field[5:]), a.get(field) or a.get(field[5:])
        d = timing.peak_drift(vb, va)
        if d is not None and d > timing.DRIFT_LIMIT:
            warn.append(f"{key} peak drifted {100 * d:.0f}% during the run ({vb:.4g} before, {va:.4g} "
                        f"after): the machine's load changed, fractions of peak are unreliable")
    groups = {}
    for r in doc["results"]:
        if r.get("op") == "mm" and r.get("best_tflops"):
            groups.setdefault((r.get("dtype"), r.get("threads")), []).append(r["best_tflops"])
    for (dtype, threads), rates in sorted(groups.items(), key=str):
        d = timing.peak_drift(min(rates), max(rates))
        if d is not None and d > timing.DRIFT_LIMIT:
            warn.append(f"the {dtype} matmul rate{f' at {threads} threads' if threads else ''} varied "
                        f"{100 * d:.0f}% across the run ({min(rates):.4g}-{max(rates):.4g} TFLOP/s, "
                        f"best rounds): the machine's load changed between cases")
    for r in doc["results"]:
        peak = timing.best_peak(doc, "mm", r.get("dtype"))
        if r.get("tflops") and peak and r["tflops"] > peak:
            warn.append(f"{r['name']}: {r['tflops']:.4g} TFLOP/s is {100 * r['tflops'] / peak:.0f}% "
                        f"of the best {r.get('dtype')} matmul round of this run (>100%: the peak, the "
                        f"count or the timing is wrong)")
        bw = timing.best_peak(doc, "copy")
        if r.get("op") in ("logit_mse_loss", "kd_loss") and r.get("gbps") and bw and r["gbps"] > bw:
            warn.append(f"{r['name']}: {r['gbps']:.4g} GB/s is {100 * r['gbps'] / bw:.0f}% of the "
                        f"measured copy bandwidth (>100%: cached, or the byte count is wrong)")
    doc["warnings"] = warn
    return warn


def run_ops(args, argv=None, log=print):
    """bottleneck_mlp (forward/backward/full), mimic_loss (forward/full) and the logit losses."""
    device = args.device
    doc = results.new_doc("ops", command_line(argv), device, CPU_NOTE if device == "cpu" else None)
    dtype = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    tdtype = getattr(torch, dtype)
    doc["peaks"] = timing.measure_peaks(device, tdtype, n=args.mm_n)
    log(f"matmul peak: {doc['peaks']['matmul']['best_tflops']:.3f} TFLOP/s ({dtype}, best round)")
    providers = args.providers or [p for p in MLP_PROVIDERS if p not in ("triton", "onnx")
                                   or (p == "triton" and device != "cpu")]
    mm = timing.matmul_fn(device, tdtype, args.mm_n)
    for case in mlp_cases(args.B, args.H, args.k, dtype, device):
        passes = ("forward", "backward", "full") if case.op == "bottleneck_mlp" else ("forward", "full")
        doc["results"] += run_group(case, providers, passes, args.warmup, args.rounds, args.compile_mode,
                                    max_seconds=args.max_seconds, log=log, matmul=mm)
        results.write(doc, args.json)
    if args.loss:
        # --providers leaves eager/compile out of the loss cases too (mf and cuda always run)
        loss_providers = [p for p in LOSS_PROVIDERS if p in ("mf", "cuda") or p in providers]
        for op in ("logit_mse_loss", "kd_loss"):
            for B in args.loss_B:
                case = Case(op, B, PAPER["C"], dtype=dtype, device=device)
                doc["results"] += run_group(case, loss_providers, ("forward", "full"), args.warmup,
                                            args.rounds, args.compile_mode, log=log)
        results.write(doc, args.json)
    if device == "cpu" and args.memory:
        cases = mlp_cases(args.B, args.H, args.k, dtype, device, ops=("mimic_loss",))
        add_cpu_memory(doc, cases, [p for p in providers if p != "triton"], args.compile_mode, log=log)
        doc["targets"] = memory_targets(doc)
    doc["peaks_after"] = timing.measure_peaks(device, tdtype, n=args.mm_n)
    for w in flag_noise(doc):
        log(f"WARNING: {w}")
    results.write(results.finish(doc), args.json)
    return doc


def run_memory(args, argv=None, log=print):
    """Peak memory of a mimic_loss training step vs H for every provider."""
    device = args.device
    doc = results.new_doc("memory", command_line(argv), device, CPU_NOTE if device == "cpu" else None)
    cd = args.dtype or ("float32" if device == "cpu" else "bfloat16")
    providers = args.providers or [p for p in MLP_PROVIDERS if p not in ("triton", "onnx")
                                   or (p == "triton" and device != "cpu")]
    cases = mlp_cases(args.B, args.H, args.k, cd, device, ops=("mimic_loss",))
    if device == "cpu":
        add_cpu_memory(doc, cases, providers, args.compile_mode, log=log)
    else:
        for case in cases:
            for p in providers:
                for r in run_case(case, p, ("full",), 1, 1, args.compile_mode, log=log):
                    r["name"], r["kind"] = "memory/" + r["name"], "memory"
                    doc["results"].append(r)
                results.write(doc, args.json)
    doc["targets"] = memory_targets(doc)
    flag_noise(doc)
    results.write(results.finish(doc), args.json)
    return doc


def memory_targets(doc, B=256, H=32768):
    """The fused step's peak memory against eager's at B=256, H=32768 (with and without the
    parameter gradients both must return); [] where this run did not measure that shape."""
    def find(provider):
        for r in doc["results"]:
            if r.get("kind") == "memory" and r.get("provider") == provider and \
                    r.get("op") == "mimic_loss" and (r.get("shape") or {}).get("H") == H and \
                    r["shape"].get("B") == B and r.get("peak_mem_bytes"):
                return r
        return None

    fused = next((p for p in ("cpu", "triton", "cuda", "reference") if find(p)), None)
    mf_, me = (find(fused) if fused else None), find("eager")
    if not (mf_ and me):
        return []
    r = mf_["peak_mem_bytes"] / me["peak_mem_bytes"]
    out = [{"target": f"{fused} peak memory <= 0.25 x eager (step peak incl. gradients, B={B}, H={H})",
            "measured": r, "threshold": 0.25, "pass": r <= 0.25,
            "detail": f"{mf_['peak_mem_bytes'] / 2**20:.1f} MiB vs {me['peak_mem_bytes'] / 2**20:.1f} MiB"}]
    g = mf_.get("grad_bytes") or 0
    fa, ea = mf_["peak_mem_bytes"] - g, me["peak_mem_bytes"] - g
    if ea > 0:
        out.append({"target": f"{fused} peak memory <= 0.25 x eager (excluding the parameter "
                              f"gradients both must return)", "measured": fa / ea, "threshold": 0.25,
                    "pass": fa / ea <= 0.25,
                    "detail": f"{fa / 2**20:.1f} MiB vs {ea / 2**20:.1f} MiB beyond {g / 2**20:.1f} MiB "
                              f"of gradients"})
    return out


# ---------------------------------------------------------------- student vs teacher

def _student_width_matching(params, D, C, k=250):
    """Hidden width H of a 250L student with about `params` parameters (U, V, b1, W, b2)."""
    return max(1, round((params - k * D - C) / (k + C + 1)))


def student_pairs(D=PAPER["D"], C=PAPER["C"], ensemble_members=9, device="cpu"):
    """[(pair name, teacher builder, student builder)] at the paper's pairings; builders are lazy."""
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
        s = self.s
        return eager_mlp(x, s.U, s.V, s.b1, s.W, s.b2, s.activation)


def _model_flops(model, D):
    if hasattr(model, "U") and hasattr(model, "W"):
        return flops.mlp_flops(1, D, model.U.shape[0], model.V.shape[0], model.W.shape[0], "forward")
    try:
        return flops.model_flops_per_sample(model, (D,))
    except Exception:  # noqa: BLE001 - a count is context, never worth failing a run
        return None


METRICS = ("inference", "train_step", "latency_b1")


def _model_fns(model, train_fused, xb, tb, x1):
    """{metric: fn} for one model: batch inference, an SGD training step, batch-1 inference."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def infer(x):
        model.train(False)
        with torch.no_grad():
            return model(x)

    def train_step():
        model.train(True)
        opt.zero_grad(set_to_none=True)
        loss = model.mimic_loss(xb, tb) if train_fused else torch.nn.functional.mse_loss(model(xb), tb)
        loss.backward()
        opt.step()

    return {"inference": lambda: infer(xb), "train_step": train_step, "latency_b1": lambda: infer(x1)}


def measure_models(models, device, dtype, batch, warmup, rounds, D, C, max_seconds=None, log=print):
    """Records of inference samples/s and training-step samples/s at `batch` and batch-1 latency for
    `models` [(name, role, model, train_fused)], the models' rounds interleaved per metric."""
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(batch, D, generator=g).to(device, dtype)
    tb = torch.randn(batch, C, generator=g).to(device, dtype)
    x1 = xb[:1].clone()
    dt = str(dtype).replace("torch.", "")
    fns, base = {}, {}
    for name, role, model, train_fused in models:
        model.to(device=device, dtype=dtype)
        fns[name] = _model_fns(model, train_fused, xb, tb, x1)
        base[name] = {"suite": "student", "model": name, "role": role, "device": device, "dtype": dt,
                      "params": M.count_parameters(model), "flops_per_sample": _model_flops(model, D)}
    out = []
    for metric in METRICS:
        bsz = 1 if metric == "latency_b1" else batch
        times, errors = interleave({n: f[metric] for n, f in fns.items()}, device=device,
                                   warmup=warmup, rounds=rounds if bsz > 1 else 3 * rounds,
                                   max_seconds=max_seconds)
        for name in fns:
            rec = {**base[name], "metric": metric, "batch": bsz, "status": "ok", "error": None,
                   "name": f"student/{metric}/{name}/b{bsz}/{dt}/{device}",
                   "interleaved_with": sorted(n for n in fns if n not in errors)}
            if name in errors:
                rec.update(status=_status_of(errors[name]), error=_short(errors[name]))
                log(f"  {name} {metric}: {rec['error']}")
            else:
                rec.update(timing.summarize(times[name]))
                rec["samples_per_s"] = bsz / (rec["median_ms"] / 1e3)
                log(f"  {name:<22} {metric:<11} b={bsz:<4} {rec['median_ms']:9.3f} ms  "
                    f"{rec['samples_per_s']:10.0f} samples/s")
            out.append(rec)
    for _, _, model, _ in models:
        model.train(False)
    return out


def run_student(args, argv=None, log=print):
    """Teacher vs student pairs: inference and training throughput, batch-1 latency."""
    device = args.device
    doc = results.new_doc("student", command_line(argv), device, CPU_NOTE if device == "cpu" else None)
    dtype = getattr(torch, args.dtype or ("float32" if device == "cpu" else "bfloat16"))
    D, C = PAPER["D"], PAPER["C"]
    pairs = student_pairs(D, C, args.ensemble_members, device)
    selected = pairs if args.pairs is None else [pairs[i] for i in args.pairs]
    for pair, (tname, tbuild), (sname, sbuild) in selected:
        log(f"{pair}:")
        models = []
        for name, role, build in ((tname, "teacher", tbuild), (sname, "student", sbuild)):
            try:
                torch.manual_seed(0)
                models.append((name, role, build(), role == "student"))
            except Exception as e:  # noqa: BLE001
                doc["results"].append({"suite": "student", "pair": pair, "model": name, "role": role,
                                       "name": f"student/build/{name}", "status": "error",
                                       "error": _short(e)})
        if args.student_eager and any(role == "student" for _, role, _, _ in models):
            student = next(m for _, role, m, _ in models if role == "student")
            models.append((sname + " (eager)", "student-eager", _EagerStudent(student), False))
        recs = measure_models(models, device, dtype, args.batch, args.warmup, args.rounds, D, C,
                              max_seconds=args.max_seconds, log=log) if models else []
        for r in recs:
            r["pair"] = pair
        doc["results"] += recs
        models = student = None
        gc.collect()
        if device != "cpu":
            torch.cuda.empty_cache()
        results.write(doc, args.json)
    doc["targets"] = student_targets(doc)
    flag_noise(doc)
    results.write(results.finish(doc), args.json)
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
    ratio, median = timing.speedup(s, t)
    fr = (t["flops_per_sample"] / s["flops_per_sample"]) if s.get("flops_per_sample") and \
        t.get("flops_per_sample") else None
    return [{"target": f"snn-mimic-8k inference throughput >= 2.5 x dnn-2k (batch {s['batch']}, "
                       f"{doc['env'].get('device')})", "measured": ratio, "measured_median": median,
             "threshold": 2.5, "pass": ratio >= 2.5,
             "detail": f"best rounds: student {s['min_ms']:.3g} ms, teacher {t['min_ms']:.3g} ms "
                       f"(from the medians: {median:.2f}x); "
                       "FLOP ratio " + (f"{fr:.2f}" if fr else "n/a")}]
