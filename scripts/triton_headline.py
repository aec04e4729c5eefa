"""The GPU check's headline (stage 2 of scripts/gpu_check.sh): the bf16 training step of the paper's
student (B=4096, D=1845, k=250, C=183) at H=400000 and H=8000, triton vs eager PyTorch (and the
cuda backend when it is already built), with the bf16 matmul peak and the copy bandwidth measured in
the same run (before and after), the triton step's per-kernel split beside the cost model's
prediction at those measured rates (measured ÷ predicted: the first GPU run calibrates the model),
and the first call's compile + autotune time. The JSON is rewritten after every case, so a timeout
keeps what was measured.

    python scripts/triton_headline.py --out headline.json [--budget-s 150] [--dry-run]

--dry-run: on CPU at tiny shapes (fp32; triton under the interpreter), to keep the script working.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

if "--dry-run" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before mimic_fast defines the kernels


import torch.nn.functional as F  # noqa: E402

import mimic_fast as mf  # noqa: E402
from mimic_fast import dispatch  # noqa: E402
from mimic_fast.ops.triton_cost import floor_flops  # noqa: E402
from mimic_fast.testing import eager_mlp  # noqa: E402

PAPER = dict(B=4096, D=1845, k=250, C=183)
TINY = dict(B=32, D=16, k=16, C=16)


def _sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_ms(fn, dev):
    """One timed call: CUDA events on a GPU, wall clock on CPU."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def peaks(dev):
    """bf16 matmul TFLOP/s (8192³) and device-copy GB/s (1 GiB), medians of 10 (tiny on CPU)."""
    n, dt = (8192, torch.bfloat16) if dev.type == "cuda" else (256, torch.float32)
    a, b = torch.randn(n, n, device=dev, dtype=dt), torch.randn(n, n, device=dev, dtype=dt)
    src = torch.empty((2**30 if dev.type == "cuda" else 2**24) // 4, device=dev)
    dst = torch.empty_like(src)
    for _ in range(3):
        a @ b
        dst.copy_(src)
    mm = statistics.median(_time_ms(lambda: a @ b, dev) for _ in range(10))
    cp = statistics.median(_time_ms(lambda: dst.copy_(src), dev) for _ in range(10))
    return {"matmul": {"tflops": 2 * n ** 3 / mm / 1e9, "n": n, "dtype": str(dt)},
            "copy": {"gbps": 2 * src.numel() * 4 / cp / 1e6, "bytes": src.numel() * 4}}


def _inputs(shape, H, dev, dtype):
    g = torch.Generator().manual_seed(H)
    B, D, k, C = shape["B"], shape["D"], shape["k"], shape["C"]

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(dev, dtype).requires_grad_()

    x = torch.randn(B, D, generator=g).to(dev, dtype)
    params = [rnd(k, D, std=D ** -0.5), rnd(H, k, std=k ** -0.5), rnd(H, std=0.5),
              rnd(C, H, std=H ** -0.5), rnd(C, std=0.5)]
    t = torch.randn(B, C, generator=g).to(dev, dtype)
    return x, params, t


def _steps(x, params, t, dev):
    """{provider: one training step (forward + backward)} for the providers that can run here."""
    U, V, b1, W, b2 = params

    def fused(backend):
        def step():
            for p in params:
                p.grad = None
            mf.mimic_loss(x, U, V, b1, W, b2, t, backend=backend).backward()
        return step

    def eager():
        for p in params:
            p.grad = None
        F.mse_loss(eager_mlp(x, U, V, b1, W, b2, "relu"), t).backward()

    out, why = {"eager": eager}, {}
    for backend in ("triton", "cuda"):
        problem = dispatch.Problem("mimic", dev, x.dtype, x.shape[0], x.shape[1], U.shape[0],
                                   V.shape[0], W.shape[0], "relu", t.dtype)
        reasons = dispatch.why_not(backend, problem)
        if reasons:
            why[backend] = "; ".join(reasons)[:300]
        else:
            out[backend] = fused(backend)
    return out, why


def kernel_split(step, dev):
    """{kernel name: device ms} of one call (GPU only)."""
    if dev.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        _sync(dev)
    split = {}
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        if us:
            split[e.key] = split.get(e.key, 0.0) + us / 1e3
    return split


def predicted(shape, H, dtype, pk, dev):
    """The cost model at the measured rates: full-step ms and ms per kernel name."""
    from mimic_fast.ops.triton_cost import predict

    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else ""
    gpu = "h200" if "H200" in name else "h100"
    p = predict(shape["B"], shape["D"], shape["k"], H, shape["C"], dtype=str(dtype).split(".")[-1],
                op="mimic", gpu=gpu, peak_tflops=pk["matmul"]["tflops"],
                bandwidth_tbs=pk["copy"]["gbps"] / 1e3)
    per = {}
    for x in p["full"]["kernels"]:
        per[x["kernel"]] = per.get(x["kernel"], 0.0) + x["time_s"] * 1e3
    return {"preset": gpu, "step_ms": p["full"]["time_s"] * 1e3,
            "forward_ms": p["forward"]["time_s"] * 1e3, "kernels_ms": per}


def run_case(shape, H, dev, dtype, pk, deadline):
    x, params, t = _inputs(shape, H, dev, dtype)
    steps, why = _steps(x, params, t, dev)
    case = {"shape": {**shape, "H": H}, "dtype": str(dtype), "unavailable": why, "providers": {}}
    from mimic_fast.ops import triton_kernels as TK

    for name, step in steps.items():  # first calls: compile, autotune
        tuned = len(TK.TUNING_LOG)
        t0 = time.perf_counter()
        try:
            step()
            _sync(dev)
        except Exception as e:  # noqa: BLE001 - recorded (e.g. eager out of memory), others go on
            case["providers"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
            continue
        case["providers"][name] = {"first_call_s": round(time.perf_counter() - t0, 3)}
        if name == "triton":
            case["providers"][name]["autotune"] = TK.TUNING_LOG[tuned:]
    live = [n for n in steps if "error" not in case["providers"][n]]
    for name in live:
        steps[name]()
    _sync(dev)
    times = {n: [] for n in live}
    rounds = 0
    while rounds < (30 if dev.type == "cuda" else 2) and time.perf_counter() < deadline:
        for name in live:  # interleaved: a load change hits every provider alike
            times[name].append(_time_ms(steps[name], dev))
        rounds += 1
    for name in live:
        ms = sorted(times[name])
        case["providers"][name].update(median_ms=statistics.median(ms) if ms else None,
                                       min_ms=ms[0] if ms else None, rounds=len(ms))
    if "triton" in live:
        model = predicted(shape, H, dtype, pk, dev)
        split = kernel_split(steps["triton"], dev)
        tri = case["providers"]["triton"]
        tri["predicted"] = model
        if tri.get("median_ms"):
            tri["measured_over_predicted"] = tri["median_ms"] / model["step_ms"]
        if split is not None:
            tri["kernels"] = {k: {"measured_ms": v, "predicted_ms": model["kernels_ms"].get(k),
                                  "measured_over_predicted": v / model["kernels_ms"][k]
                                  if model["kernels_ms"].get(k) else None}
                              for k, v in sorted(split.items(), key=lambda kv: -kv[1])[:12]}
    eager_ms = case["providers"].get("eager", {}).get("median_ms")
    for name in live:
        ms = case["providers"][name].get("median_ms")
        if eager_ms and ms:
            case["providers"][name]["speedup_vs_eager"] = eager_ms / ms
    # issue 18's yardstick: the one-recompute floor (dx included) per measured second
    floor = floor_flops(shape["B"], shape["D"], shape["k"], H, shape["C"])
    case["floor_tflop"] = floor / 1e12
    for name in live:
        ms = case["providers"][name].get("median_ms")
        if ms:
            case["providers"][name]["floor_tflops"] = floor / ms / 1e9
            case["providers"][name]["of_matmul_peak"] = floor / ms / 1e9 / pk["matmul"]["tflops"]
    return case


def _write(doc, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


def summarize(path):
    doc = json.load(open(path))
    pk = doc.get("peaks_before", {})
    lines = [f"step times (headline.json) on {doc.get('device')}: bf16 matmul "
             f"{pk.get('matmul', {}).get('tflops', 0):.0f} TFLOP/s, copy "
             f"{pk.get('copy', {}).get('gbps', 0):.0f} GB/s"]
    for c in doc.get("cases", []):
        for name, r in c["providers"].items():
            if "error" in r:
                lines.append(f"  H={c['shape']['H']:<7} {name:<7} error: {r['error'][:80]}")
                continue
            extra = ""
            if "predicted" in r:
                extra = (f", predicted {r['predicted']['step_ms']:.3f} ms "
                         f"(measured/predicted {r.get('measured_over_predicted', 0):.2f})")
            lines.append(f"  H={c['shape']['H']:<7} {name:<7} {r.get('median_ms') or 0:9.3f} ms "
                         f"x{r.get('speedup_vs_eager', 0):.2f} eager, "
                         f"{100 * r.get('of_matmul_peak', 0):.0f}% of peak{extra}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="the JSON to write")
    ap.add_argument("--budget-s", type=float, default=150.0)
    ap.add_argument("--H", type=int, nargs="+", default=None)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--summarize", metavar="JSON", help="print the short table of a headline JSON")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(args.summarize))
        return 0
    if not args.out:
        ap.error("--out is required")
    deadline = time.perf_counter() + args.budget_s
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not args.dry_run:
        print("error: no CUDA device (use --dry-run on CPU)", file=sys.stderr)
        return 2
    gpu = dev.type == "cuda"
    shape, dtype = (PAPER, torch.bfloat16) if gpu else (TINY, torch.float32)
    H_values = args.H or ([400000, 8000] if gpu else [256, 64])
    doc = {"device": torch.cuda.get_device_name(dev) if gpu else "cpu (dry run)",
           "torch": torch.__version__, "dry_run": not gpu, "cases": []}
    doc["peaks_before"] = peaks(dev)
    _write(doc, args.out)
    for H in H_values:
        if time.perf_counter() > deadline:
            doc.setdefault("skipped", []).append({"H": H, "why": "budget spent"})
            continue
        doc["cases"].append(run_case(shape, H, dev, dtype, doc["peaks_before"], deadline))
        _write(doc, args.out)
        torch.cuda.empty_cache() if gpu else None
    doc["peaks_after"] = peaks(dev)
    _write(doc, args.out)
    print(summarize(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
