"""Cost model of the triton backend: executed FLOPs and memory traffic of every launch of the plan
(ops/triton_plan.py: the grids, tiles, padded sizes and workspace the launchers use), and the time
they imply on a GPU. Pure Python: no GPU, no compiler (it runs anywhere, the interpreter too).

Per launch, with the tiles of the plan:
  flops         executed (padding and recompute included), 2 per multiply-add
  hbm_bytes     unique bytes to and from device memory: every operand read once per launch, outputs
                written once (z and dy tiles re-read by every program stay in L2)
  l2_bytes      the bytes the programs load and store (every program's tiles go through L2)
  reduce_add    bytes reduce-added into memory (none in this design; the term stays for comparisons)
time_s = max(flops / (peak x busy), hbm / copy bandwidth, l2 / L2 bandwidth, reduce_add / reduce-add
rate) (`kernel_time`; busy = the grid's wave quantisation, or the schedule of the pass-2 launch's
two program lengths: `launch_busy`), summed over the launches of a pass, at
the rates of a GPU preset (`GPUS`) or measured ones. The torch ops around the kernels (x Uᵀ, the
pads, dx, dU) are one line per pass, counted the same way.

    mimic-fast bench model [--gpu h100|h200] [--B 4096 --H 8000 400000 --dtype bfloat16] [--json F]
"""
import argparse
import json
import math
import sys

import torch

from . import triton_plan as P
from .flops import element_size, mlp_flops

# Rates per GPU kind (issue 18): the matmul peak and copy bandwidth are those recorded for the lent
# GPU kinds of this workplace (bf16 matmul on random data, device copy); the L2 and reduce-add rates
# are published or estimated figures, explicit assumptions: L2 read ~6.9 TB/s on H100 PCIe and
# 9.7-10.3 TB/s on H200 (te42kyfo/gpu-benches gpu-l2-cache), reduce-add throughput ~2.4-4 TB/s.
GPUS = {
    "h100": {"name": "H100 SXM", "tflops": 798.0, "hbm_tbs": 3.0, "l2_tbs": 7.0, "reduce_add_tbs": 3.0,
             "l2_mb": 50},
    "h200": {"name": "H200", "tflops": 788.0, "hbm_tbs": 4.3, "l2_tbs": 10.0, "reduce_add_tbs": 3.0,
             "l2_mb": 50},
}
# A da workspace chunk of at most this share of L2 is read back by pass 2 from L2 (pass 1 has just
# written it; z, dy and the weight tiles in flight take a few MB): its bytes then never reach HBM.
L2_RESIDENT_SHARE = 1 / 3
TERMS = ("compute", "hbm", "l2", "reduce_add")
PAPER = dict(D=1845, k=250, C=183)


def floor_flops(B, D, k, H, C, pass_="full"):
    """FLOPs of the fused math with one recompute, dx included and no padding."""
    return mlp_flops(B, D, k, H, C, pass_, input_grad=True, recompute=True)


def kernel_time(flops, hbm, l2, reduce_add, rates, busy=1.0):
    """(seconds, bounding term, {term: seconds}) of one kernel: max(FLOPs / (peak x busy), HBM /
    copy bandwidth, L2 / L2 bandwidth, reduce-adds / reduce-add rate). `busy` is the wave
    quantisation of its grid (programs / (waves x SMs)): a part-empty last wave idles tensor cores."""
    terms = {"compute": flops / (rates["tflops"] * 1e12 * busy),
             "hbm": hbm / (rates["hbm_tbs"] * 1e12),
             "l2": l2 / (rates["l2_tbs"] * 1e12),
             "reduce_add": reduce_add / (rates["reduce_add_tbs"] * 1e12)}
    bound = max(terms, key=terms.get)
    return terms[bound], bound, terms


def rates_for(gpu="h100", peak_tflops=None, bandwidth_tbs=None, l2_tbs=None, reduce_add_tbs=None):
    """The preset's rates, each replaced by a measured one where given."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu preset {gpu!r}: expected one of {sorted(GPUS)}")
    r = dict(GPUS[gpu])
    for key, v in (("tflops", peak_tflops), ("hbm_tbs", bandwidth_tbs), ("l2_tbs", l2_tbs),
                   ("reduce_add_tbs", reduce_add_tbs)):
        if v:
            r[key] = float(v)
    r["preset"] = gpu
    return r


# ---------------------------------------------------------------------------------------- counts
def _role(launch):
    """fwd, bwd (pass 1), dV (= DAᵀ z), dz (+= DA V_j), the reductions by what they sum."""
    a = launch.args
    if launch.kernel == "gemm":
        return "dz + dV"
    if launch.kernel == "reduce":
        name = a["P"].name
        return {"yp": "reduce y" + (" + loss" if a["MIMIC"] else ""), "dzp": "reduce dz",
                "dvp": "reduce dV", "dwp": "reduce dW", "db1p": "reduce db1"}[name]
    return launch.kernel


def launch_counts(p, launch, l2_resident=False):
    """(flops, hbm_bytes, l2_bytes, reduce_add_bytes, programs) of one planned launch.
    l2_resident: the da workspace chunk stays in L2 between pass 1 and pass 2 (no HBM for it)."""
    a, e = launch.args, p.elem
    ws = 0 if l2_resident else 1
    KP, CP, C, k = p.KP, p.CP, p.C, p.k
    programs = math.prod(launch.grid)
    if launch.kernel == "fwd":
        h_exec = _cdiv(p.H, p.fwd_block_h) * p.fwd_block_h
        batch_tiles = p.rows // p.fwd_block_b
        flops = 2 * p.rows * h_exec * (KP + CP)
        yp = p.fwd_splits * p.rows * CP * 4
        hbm = p.H_pad * KP * e + C * p.H * e + p.H_pad * e + p.rows * KP * e + yp
        l2 = batch_tiles * h_exec * (KP + C + 1) * e + p.rows * KP * e + yp
        return flops, hbm, l2, 0, programs
    if launch.kernel == "bwd":
        n = launch.grid[0] * p.bwd_block_h
        flops = 2 * p.rows * n * (KP + 2 * CP)
        dw = (p.bwd_bchunks * CP * n * 4) if p.bwd_bchunks > 1 else C * n * e
        outs = n * p.rows * e + n * KP * e + dw + n * 4  # da, VP, dW, db1
        weights = n * (k + C + 1) * e
        hbm = weights + p.rows * (KP + CP) * e + outs - (1 - ws) * n * p.rows * e
        l2 = (n // p.bwd_block_h) * p.rows * (KP + CP) * e + weights * p.bwd_bchunks + outs
        return flops, hbm, l2, 0, programs
    if launch.kernel == "gemm":  # dz and dV programs of one chunk of n hidden units
        bm, bk = p.gemm_block_m, p.gemm_block_k
        n = a["VP_LO"].shape[0]
        (n_dz, dz_n_k), (n_dv, dv_n_k) = P.pass2_programs(p, n)
        # executed MACs: zero-filled K blocks past a split's end too
        flops = 2 * bm * bk * KP * (n_dz * dz_n_k + n_dv * dv_n_k)
        # dz: A = DA (rows x n), B = VP (n x KP) re-read by every batch tile, fp32 partials
        # written (first chunk) or read and written (later chunks)
        partial = p.dz_splits * p.rows * KP * 4 * (2 if a["DZ_ACCUMULATE"] else 1)
        hbm = ws * p.rows * n * e + n * KP * e + partial
        l2 = p.rows * n * e + (p.rows // bm) * n * KP * e + partial
        # dV: A = DAᵀ (n x rows), B = z (rows x KP) re-read by every hidden tile, dV rows or fp32
        # partials written (a da chunk not kept in L2 is read from HBM by both GEMMs)
        out = p.dv_splits * n * KP * 4 if p.dv_splits > 1 else n * k * e
        hbm += ws * n * p.rows * e + p.rows * KP * e + out
        l2 += n * p.rows * e + a["dv_tiles"] * p.rows * KP * e + out
        return flops, hbm, l2, 0, programs
    if launch.kernel == "reduce":
        S, M, N = a["n_splits"], a["M"], a["N"]
        out = M * N * (4 if a["MIMIC"] else e)
        io = S * M * N * 4 + out + (M * N * (e + 4) if a["MIMIC"] else 0)
        return S * M * N, io, io, 0, programs
    raise ValueError(f"no cost formula for launch {launch.kernel!r}")


def launch_busy(p, launch):
    """The SMs' busy fraction over a launch: its grid's wave quantisation, or for the pass-2 launch
    (programs of two lengths) the schedule of triton_plan.pass2_busy."""
    if launch.kernel == "gemm":
        return P.pass2_busy(p, launch.args["VP_LO"].shape[0])
    return P.busy(math.prod(launch.grid), p.sms)


def _cdiv(a, b):
    return -(-a // b)


def torch_counts(p, D, pass_, w_aligned, scale_dz=True):
    """(flops, hbm_bytes) of the torch ops around the kernels of a pass (scale_dz: the dz
    reduction applies the dy scale, else dx and dU are scaled in place after their GEMMs)."""
    B, k, e = p.B, p.k, p.elem
    if pass_ == "forward":  # z = x Uᵀ; z -> z_pad; V -> V_pad; b1 pad; W padded if unaligned
        flops = 2 * B * D * k
        hbm = (B * D + k * D + B * k) * e + (B * k + p.rows * p.KP) * e
        hbm += (p.H * k + p.H_pad * p.KP) * e + 2 * p.H_pad * e
        hbm += 0 if w_aligned else (p.C * p.H + p.C * p.H_pad) * e
        return flops, hbm
    # dy scale (max |dy|), dy -> dy_pad / s, z -> z_pad, dx = dz U, dU = dzᵀ x, db2
    flops = 2 * 2 * B * D * k
    hbm = 3 * B * p.C * 4 + p.rows * p.CP * e + (B * k + p.rows * p.KP) * e
    hbm += 2 * (B * k + k * D + B * D) * e
    hbm += 0 if scale_dz else 2 * (B * D + k * D) * e  # dx, dU read and written by mul_(s)
    hbm += 0 if w_aligned else (p.C * p.H + p.C * p.H_pad) * e
    return flops, hbm


def predict(B, D, k, H, C, dtype="bfloat16", op="mimic", peak_tflops=None, bandwidth_tbs=None,
            target="sm_90a", gpu="h100", l2_tbs=None, reduce_add_tbs=None, sms=None):
    """Predicted cost of the triton backend for one call, per pass.

    Returns {"forward": {...}, "full": {...}, "plan": {...}, "rates": {...}}; each pass has
    "flops" (executed), "model_flops" (floor_flops: one recompute, no padding), "bytes" (HBM),
    "l2_bytes", "atomic_bytes" (reduce-adds), "time_s" (sum over launches of `kernel_time`),
    "kernels" (one dict per launch, with the term that bounds it) and "roles" (the launches of
    each kind summed). Rates: the `gpu` preset's, each replaced by a measured one where given (pass
    the peaks of the same run to put a prediction beside a measurement). The activation does not
    change the counts, so it is no argument.
    `target` names the compile target the tiles are for (sm_90a; the backend serves Hopper only).
    """
    if target != "sm_90a":
        raise ValueError(f"the cost model plans the sm_90a kernels, not {target!r}")
    dt = str(dtype).replace("torch.", "")
    elem = element_size(dt)
    rates = rates_for(gpu, peak_tflops, bandwidth_tbs, l2_tbs, reduce_add_tbs)
    device = P.Device(sms) if sms else P.OFFLINE_DEVICE
    p = P.plan(B, k, H, C, elem, device=device, interpret=False)
    w_aligned = (H * elem) % 16 == 0
    scale_dz = P.dz_scaled(getattr(torch, dt))
    fwd_op = "mimic" if op == "mimic" else "forward"
    l2_resident = p.workspace_bytes <= rates["l2_mb"] * 1e6 * L2_RESIDENT_SHARE
    passes = {}
    for name, op_ in (("forward", fwd_op), ("backward", "backward")):
        records = []
        for launch in P.pass_launches(p, op_, scale_dz=scale_dz):
            flops, hbm, l2, red, programs = launch_counts(p, launch, l2_resident)
            t, bound, terms = kernel_time(flops, hbm, l2, red, rates, launch_busy(p, launch))
            records.append({"kernel": P.KERNELS[launch.kernel], "role": _role(launch),
                            "programs": programs, "flops": flops, "bytes": hbm, "l2_bytes": l2,
                            "atomic_bytes": red, "time_s": t, "bound": bound, "terms_s": terms})
        flops, hbm = torch_counts(p, D, name, w_aligned, scale_dz)
        t, bound, terms = kernel_time(flops, hbm, 0, 0, rates)
        records.append({"kernel": "torch ops", "role": f"torch ops ({name})", "programs": 0,
                        "flops": flops, "bytes": hbm, "l2_bytes": 0, "atomic_bytes": 0,
                        "time_s": t, "bound": bound, "terms_s": terms})
        passes[name] = records

    def total(records, pass_):
        roles = {}
        for r in records:
            x = roles.setdefault(r["role"], {"launches": 0, "flops": 0, "bytes": 0, "l2_bytes": 0,
                                             "atomic_bytes": 0, "time_s": 0.0, "bounds": {}})
            x["launches"] += 1
            for key in ("flops", "bytes", "l2_bytes", "atomic_bytes", "time_s"):
                x[key] += r[key]
            x["bounds"][r["bound"]] = x["bounds"].get(r["bound"], 0) + 1
        return {"flops": sum(x["flops"] for x in records),
                "model_flops": floor_flops(B, D, k, H, C, pass_),
                "bytes": sum(x["bytes"] for x in records),
                "l2_bytes": sum(x["l2_bytes"] for x in records),
                "atomic_bytes": sum(x["atomic_bytes"] for x in records),
                "time_s": sum(x["time_s"] for x in records), "kernels": records, "roles": roles}

    plan = p._asdict()
    plan["workspace_bytes"] = p.workspace_bytes
    plan["workspace_in_l2"] = l2_resident
    return {"forward": total(passes["forward"], "forward"),
            "full": total(passes["forward"] + passes["backward"], "full"),
            "plan": plan, "target": target, "dtype": dt, "rates": rates,
            "peak_tflops": rates["tflops"], "bandwidth_tbs": rates["hbm_tbs"]}


def format_prediction(pred, shape):
    B, D, k, H, C = shape
    r = pred["rates"]
    lines = [f"B={B} D={D} k={k} H={H} C={C} {pred['dtype']} on {pred['target']}, {r['name']} "
             f"preset: {r['tflops']:.0f} TFLOP/s, HBM {r['hbm_tbs']:.1f} TB/s, L2 {r['l2_tbs']:.1f} "
             f"TB/s, reduce-add {r['reduce_add_tbs']:.1f} TB/s"]
    for name in ("forward", "full"):
        t = pred[name]
        lines.append(f"  {name:<8} {t['flops'] / 1e12:8.3f} TFLOP executed "
                     f"({t['flops'] / t['model_flops']:.3f}x the one-recompute floor "
                     f"{t['model_flops'] / 1e12:.3f}), HBM {t['bytes'] / 1e9:6.3f} GB, "
                     f"L2 {t['l2_bytes'] / 1e9:6.1f} GB, reduce-adds {t['atomic_bytes'] / 1e9:4.1f} GB"
                     f" -> {t['time_s'] * 1e3:7.3f} ms")
    lines.append(f"  {'launches of':<24} {'n':>3} {'GFLOP':>9} {'HBM MB':>9} {'L2 GB':>7} "
                 f"{'ms':>7}  bound (launches)")
    for role, x in pred["full"]["roles"].items():
        bounds = ", ".join(f"{b} ({n})" for b, n in x["bounds"].items())
        lines.append(f"  {role[:24]:<24} {x['launches']:>3} {x['flops'] / 1e9:>9.1f} "
                     f"{x['bytes'] / 1e6:>9.1f} {x['l2_bytes'] / 1e9:>7.2f} "
                     f"{x['time_s'] * 1e3:>7.3f}  {bounds}")
    return "\n".join(lines)


def main(argv=None):
    """`mimic-fast bench model`: print the cost model at the paper shape (or the given one)."""
    p = argparse.ArgumentParser(allow_abbrev=False, prog="mimic-fast bench model",
                                description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--D", type=int, default=PAPER["D"])
    p.add_argument("--k", type=int, default=PAPER["k"])
    p.add_argument("--C", type=int, default=PAPER["C"])
    p.add_argument("--H", type=int, nargs="+", default=[8000, 400000])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS),
                   help="rate preset (default h100: H100 SXM 798 TFLOP/s, 3.0 TB/s HBM, 7 TB/s L2, "
                        "3 TB/s reduce-add; h200: 788, 4.3, 10, 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="replaces the preset's")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="replaces the preset's")
    p.add_argument("--json", default=None, help="also write the predictions as JSON")
    args = p.parse_args(argv)
    out = []
    for H in args.H:
        shape = (args.B, args.D, args.k, H, args.C)
        try:
            pred = predict(*shape, dtype=args.dtype, peak_tflops=args.peak_tflops,
                           bandwidth_tbs=args.bandwidth_tbs, gpu=args.gpu)
        except ValueError as e:
            print(f"mimic-fast bench model: error: {e}", file=sys.stderr)
            return 2
        print(format_prediction(pred, shape))
        out.append({"shape": dict(zip("B D k H C".split(), shape)),
                    "step_ms": pred["full"]["time_s"] * 1e3,
                    "forward_ms": pred["forward"]["time_s"] * 1e3, **pred})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"raw JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
