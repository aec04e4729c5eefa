"""CPU target of the benchmarks issue: the cpu backend's forward+backward against eager PyTorch.

Measures, in one run and on the same threads: eager unfused PyTorch (nn.Linear chain + F.mse_loss +
backward), mf.mimic_loss(backend="cpu") + backward at several loop orders and chunk widths,
and a plain fp32 matmul for the machine's GEMM throughput. Timings are medians of --repeats runs
after one warm-up, interleaved across variants; peak memory is taken in a separate profiled run (it slows the step down).

    PYTHONPATH=. python benchmarks/tune_cpu.py                       # the issue's shape, 2 threads
    PYTHONPATH=. python benchmarks/tune_cpu.py --H 8192 --repeats 3  # quicker
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import mimic_fast as mf


def peak_bytes(reset, step):
    """Peak bytes live in torch's CPU allocator during step(), above what was live before it.

    reset() runs first, outside the profile: frees of tensors allocated before profiling would
    show up as negative sizes.
    """
    reset()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def timed(step, repeats):
    step()  # warm-up: allocator, MKL buffers, thread pool
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--B", type=int, default=256)
    p.add_argument("--D", type=int, default=1845)
    p.add_argument("--k", type=int, default=250)
    p.add_argument("--C", type=int, default=183)
    p.add_argument("--H", type=int, default=32768)
    p.add_argument("--activation", default="relu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--variants", default="default,gemm:512,gemm:1024,gemm:2048,chunks:256,chunks:512,chunks:1024",
                   help="comma-separated LOOP:CHUNK (MIMIC_FAST_CPU_LOOP / _CHUNK_H); 'default' = the "
                        "built-in rules")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    B, D, k, C, H = args.B, args.D, args.k, args.C, args.H
    act_module = {"relu": nn.ReLU(), "sigmoid": nn.Sigmoid(), "tanh": nn.Tanh(), "gelu": nn.GELU()}

    eager = nn.Sequential(nn.Linear(D, k, bias=False), nn.Linear(k, H), act_module[args.activation],
                          nn.Linear(H, C))
    student = mf.nn.WideShallowStudent(D, C, H, k, activation=args.activation, backend="cpu")
    with torch.no_grad():
        student.U.copy_(eager[0].weight)
        student.V.copy_(eager[1].weight)
        student.b1.copy_(eager[1].bias)
        student.W.copy_(eager[3].weight)
        student.b2.copy_(eager[3].bias)
    x = torch.randn(B, D)
    t = torch.randn(B, C)

    def eager_reset():
        eager.zero_grad(set_to_none=True)

    def fused_reset():
        student.zero_grad(set_to_none=True)

    def eager_step():
        eager_reset()
        F.mse_loss(eager(x), t).backward()

    def fused_step():
        fused_reset()
        student.mimic_loss(x, t).backward()

    # Correctness before timing: the fused gradients against eager's (both float32).
    eager_step()
    fused_step()
    pairs = [("U", student.U, eager[0].weight), ("V", student.V, eager[1].weight),
             ("b1", student.b1, eager[1].bias), ("W", student.W, eager[3].weight),
             ("b2", student.b2, eager[3].bias)]
    rel = {n: ((a.grad - b.grad).norm() / b.grad.norm()).item() for n, a, b in pairs}
    assert max(rel.values()) < 1e-4, f"fused gradients differ from eager: {rel}"

    n = 2048
    a_mm, b_mm = torch.randn(n, n), torch.randn(n, n)
    mm_time = timed(lambda: torch.mm(a_mm, b_mm), 3)  # warm-up; timed again in the round-robin

    # Model FLOPs of a training step (x needs no grad): fwd 2B(Dk+kH+HC), bwd 2B(Dk) + 4B(kH+HC).
    model_flops = 2 * B * (D * k + k * H + H * C) + 2 * B * D * k + 4 * B * (k * H + H * C)
    fused_flops = model_flops + 2 * B * k * H + 2 * B * D * k  # recompute of a; dx is computed too

    results = {"shape": dict(B=B, D=D, k=k, C=C, H=H), "activation": args.activation,
               "threads": args.threads, "torch": torch.__version__, "repeats": args.repeats,
               "parallel_backend": mf.info()["backends"]["cpu"].get("parallel_backend"),
               "grad_rel_err_vs_eager": rel, "runs": []}
    variants = [("eager", None, eager_reset, eager_step)]
    for v in args.variants.split(","):
        if v == "default":
            variants.append((f"cpu default (chunk={torch.ops.mimic_fast.cpu_chunk_h(B, H)})", None,
                             fused_reset, fused_step))
        else:
            loop, chunk = v.split(":")
            variants.append((f"cpu {loop} chunk={min(int(chunk), H)}", (loop, chunk), fused_reset,
                             fused_step))

    def use_chunk(setting):
        for var in ("MIMIC_FAST_CPU_LOOP", "MIMIC_FAST_CPU_CHUNK_H"):
            os.environ.pop(var, None)
        if setting is not None:
            os.environ["MIMIC_FAST_CPU_LOOP"], os.environ["MIMIC_FAST_CPU_CHUNK_H"] = setting

    # Round-robin: the machine is shared, so a burst of someone else's load hits every variant.
    times = {name: [] for name, *_ in variants}
    for name, chunk, _, step in variants:  # warm-up
        use_chunk(chunk)
        step()
    mm_times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        torch.mm(a_mm, b_mm)
        mm_times.append(time.perf_counter() - t0)
        for name, chunk, _, step in variants:
            use_chunk(chunk)
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    mm_flops = 2 * n ** 3 / statistics.median(mm_times)
    results["matmul_gflops"] = mm_flops / 1e9
    grad_bytes = sum(p_.numel() * p_.element_size() for p_ in student.parameters())
    for name, chunk, reset, step in variants:
        use_chunk(chunk)
        ts = times[name]
        q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
        med = statistics.median(ts)
        peak = peak_bytes(reset, step)
        run = dict(name=name, median_s=med, q20_s=q[0], q80_s=q[-1], min_s=min(ts),
                   peak_mb=peak / 2**20, workspace_mb=(peak - grad_bytes) / 2**20,
                   gflops_model=model_flops / med / 1e9)
        if name != "eager":
            run["gflops_executed"] = fused_flops / med / 1e9
        results["runs"].append(run)
    use_chunk(None)

    print(f"B={B} D={D} k={k} C={C} H={H} {args.activation} fp32, {args.threads} threads, torch "
          f"{torch.__version__}, median of {args.repeats}")
    print(f"plain fp32 matmul ({n}^3): {mm_flops / 1e9:.1f} GFLOP/s; grad rel err vs eager: "
          + ", ".join(f"{k_}={v:.1e}" for k_, v in rel.items()))
    print("peak MB: allocator peak above the step's start, gradients included; work MB: the same "
          f"minus the {grad_bytes / 2**20:.1f} MB of parameter gradients every variant must hold")
    e = results["runs"][0]
    print(f"{'variant':<26}{'median ms':>10}{'q20-q80 ms':>16}{'min ms':>8}{'vs eager':>9}{'peak MB':>9}"
          f"{'/eager':>7}{'work MB':>8}{'/eager':>7}{'model GF/s':>11}{'exec GF/s':>10}{'exec/mm':>8}")
    for r in results["runs"]:
        ex = r.get("gflops_executed", r["gflops_model"])
        print(f"{r['name']:<26}{r['median_s'] * 1e3:>10.1f}{r['q20_s'] * 1e3:>8.1f}-{r['q80_s'] * 1e3:<7.1f}"
              f"{r['min_s'] * 1e3:>8.1f}{r['median_s'] / e['median_s']:>9.2f}{r['peak_mb']:>9.1f}"
              f"{r['peak_mb'] / e['peak_mb']:>7.2f}{r['workspace_mb']:>8.1f}"
              f"{r['workspace_mb'] / e['workspace_mb']:>7.2f}"
              f"{r['gflops_model']:>11.1f}{ex:>10.1f}{ex * 1e9 / mm_flops:>8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
