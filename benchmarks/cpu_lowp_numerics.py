"""The cpu backend's bf16 / fp16 numerics against the 2x rule, per compute path, as a table.

For every dtype x path (native: low-precision GEMM operands, float32 accumulation; float32: upcast
per chunk) x activation x shape, the error of each output and gradient against float64 is divided
by the 2x rule's bound: 2 x plain PyTorch's error in the same dtype (the eager chain) + an atol (the
dtype's small one of mimic_fast.testing, floored at one ulp of the tensor's largest element, as in
tests/test_cpu_backend.py); the tests require <= 1. The table shows the worst ratio per tensor
over the cases, and how many cases exceed 1 (seeds vary the inputs). The native path is forced with the backend's tuning knob, so this runs on any CPU (where the
CPU lacks bf16/fp16 matrix units ATen emulates those GEMMs: slower, same rounding points).

    PYTHONPATH=. python benchmarks/cpu_lowp_numerics.py [--json out.json]
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F

import mimic_fast as mf
from mimic_fast.activations import ACTIVATIONS
from mimic_fast.ops import cpu
from mimic_fast.testing import ATOL_2X, eager_mlp, max_error

NAMES = ("output", "x", "U", "V", "b1", "W", "b2")
SHAPES = [  # B, D, k, H, C, chunk (None: the plan's)
    (16, 24, 8, 200, 6, 64),
    (7, 13, 5, 131, 3, 48),
    (1, 9, 1, 70, 1, 32),
    (64, 200, 32, 3000, 17, None),
    (256, 300, 64, 4096, 183, None),
]


def _inputs(B, D, k, H, C, dtype, seed):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype)

    return [rnd(B, D), rnd(k, D, std=D ** -0.5), rnd(H, k, std=k ** -0.5), rnd(H, std=0.5),
            rnd(C, H, std=H ** -0.5), rnd(C, std=0.5)], rnd(B, C)


def _run(fn, tensors, t, g):
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    out = fn(leaves, t)
    out.backward(g.to(out.dtype))
    return [out.detach()] + [x.grad for x in leaves]


def ratios(dtype, native, activation, shape, op, seed=0):
    B, D, k, H, C, chunk = shape
    inputs, t = _inputs(B, D, k, H, C, dtype, seed)
    g = torch.randn((B, C) if op == "mlp" else (), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(seed + 1))
    if op == "mlp":
        def ours(p, t):
            return mf.bottleneck_mlp(*p, activation=activation, backend="cpu")

        def plain(p, t):
            return eager_mlp(*p, activation)
    else:
        def ours(p, t):
            return mf.mimic_loss(*p, t, activation=activation, backend="cpu")

        def plain(p, t):
            return F.mse_loss(eager_mlp(*p, activation), t)
    with cpu.tuning(chunk_h=chunk, native=native):
        got = _run(ours, inputs, t, g)
    base = _run(plain, inputs, t, g)
    ref = _run(plain, [x.double() for x in inputs], t.double(), g)
    out = {}
    for name, a, b, r in zip(NAMES, got, base, ref):
        big = r.abs().max().item()
        ulp = torch.finfo(dtype).eps * 2.0 ** math.floor(math.log2(big)) if big > 0 else 0.0
        out[name] = max_error(a, r) / (2 * max_error(b, r) + max(ATOL_2X[dtype], ulp))
    return out


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", help="write the per-case ratios here")
    p.add_argument("--seeds", type=int, default=1, help="input draws per case")
    args = p.parse_args()
    torch.manual_seed(0)
    rows, cases = [], []
    for dtype in (torch.bfloat16, torch.float16):
        for path, native in (("native", True), ("float32", False)):
            worst = {n: (0.0, None) for n in NAMES}
            over = {n: 0 for n in NAMES}
            count = 0
            for op in ("mlp", "mimic"):
                for activation in ACTIVATIONS:
                    for shape in SHAPES:
                        for seed in range(args.seeds):
                            r = ratios(dtype, native, activation, shape, op, seed)
                            count += 1
                            cases.append({"dtype": str(dtype), "path": path, "op": op, "seed": seed,
                                          "activation": activation, "shape": shape, "ratios": r})
                            for n, v in r.items():
                                over[n] += v > 1
                                if v > worst[n][0]:
                                    worst[n] = (v, f"{op}/{activation}/{shape[:5]}/seed {seed}")
            rows.append((str(dtype).replace("torch.", ""), path, worst, over, count))
    print("worst error / (2 x plain PyTorch's error + atol), over all cases (the tests need <= 1);")
    print("in brackets: cases above 1")
    print(f"{'dtype':<9} {'path':<8} " + " ".join(f"{n:>11}" for n in NAMES) + "  cases")
    for dtype, path, worst, over, count in rows:
        print(f"{dtype:<9} {path:<8} " + " ".join(f"{worst[n][0]:>6.2f} [{over[n]:>2}]" for n in NAMES)
              + f"  {count}")
    for dtype, path, worst, _, _ in rows:
        n = max(worst, key=lambda k: worst[k][0])
        print(f"{dtype} {path}: worst {n} {worst[n][0]:.2f} at {worst[n][1]}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "cases": cases}, f, indent=1)


if __name__ == "__main__":
    main()
