"""Cost model of the triton backend: executed FLOPs and memory traffic per kernel, from the launches
the real launchers make (ops/triton_offline.trace: the same grids, tiles and padded sizes), and the
time they imply at a peak rate and bandwidth.

Counts, per kernel, with its first config the autotuner keeps for the target:
  flops         executed (padding and recompute included), 2 per multiply-add
  hbm_bytes     unique bytes to and from device memory: every operand read once, outputs written
                once (what the L2 cannot hide); the torch ops around the kernels are counted too
  l2_bytes      tile bytes the programs load and store (every program's tiles go through L2)
  atomic_bytes  the backward's dz reduce-adds into the (B, KP) fp32 buffer (through L2)
time_s = max(flops / (peak x busy), hbm_bytes / copy bandwidth, l2_bytes / L2 bandwidth,
atomic_bytes / reduce-add rate) per kernel (`kernel_time`; busy = the grid's wave quantisation),
summed over the kernels of a pass, at the rates of a GPU preset (`GPUS`) or measured ones.

    mimic-fast bench model [--B 4096 --H 8000 400000 --dtype bfloat16 --target sm_90a]
"""
import argparse
import math
import sys

import torch

from . import triton_fused as T
from .flops import element_size, mlp_flops

# Rates per GPU kind (issue 18): the matmul peak and copy bandwidth are those recorded for the lent
# GPU kinds of this workplace (bf16 matmul on random data, device copy); the L2 and reduce-add rates
# are published or estimated figures, explicit assumptions: L2 read ~6.9 TB/s on H100 PCIe and
# 9.7-10.3 TB/s on H200 (te42kyfo/gpu-benches gpu-l2-cache), reduce-add throughput ~2.4-4 TB/s.
GPUS = {
    "h100": {"name": "H100 SXM", "tflops": 798.0, "hbm_tbs": 3.0, "l2_tbs": 7.0, "reduce_add_tbs": 3.0},
    "h200": {"name": "H200", "tflops": 788.0, "hbm_tbs": 4.3, "l2_tbs": 10.0, "reduce_add_tbs": 3.0},
}
TERMS = ("compute", "hbm", "l2", "reduce_add")
PAPER = dict(D=1845, k=250, C=183)


def floor_flops(B, D, k, H, C, pass_="full"):
    """FLOPs of the fused math with one recompute, dx included and no padding."""
    return mlp_flops(B, D, k, H, C, pass_, input_grad=True, recompute=True)


def kernel_time(flops, hbm, l2, reduce_add, rates, busy=1.0):
    """{term: seconds} of one kernel and the bounding term: max(FLOPs / (peak x busy), HBM / copy
    bandwidth, L2 / L2 bandwidth, reduce-adds / reduce-add rate). `busy` is the wave quantisation
    of its grid (programs / (waves x SMs)): a half-empty last wave leaves tensor cores idle."""
    terms = {"compute": flops / (rates["tflops"] * 1e12 * busy),
             "hbm": hbm / (rates["hbm_tbs"] * 1e12),
             "l2": l2 / (rates["l2_tbs"] * 1e12),
             "reduce_add": reduce_add / (rates["reduce_add_tbs"] * 1e12)}
    bound = max(terms, key=terms.get)
    return terms[bound], bound, terms


def _busy(programs, sms):
    if programs <= 0:
        return 1.0
    return programs / (math.ceil(programs / sms) * sms)


def _kernel_cost(launch, config, elem):
    """(flops, hbm_bytes, l2_bytes, atomic_bytes, programs) of one recorded launch."""
    a = launch.bound(config)
    meta = {**a, **(config.kwargs if config is not None else {})}
    name = launch.name
    if name == "_reduce_splits_kernel":
        P = a["P"]
        S, M, N = P.shape[0], a["M"], a["N"]
        out_elem = a["OUT"].element_size() if a["STORE_OUT"] else 0
        io = S * M * N * 4 + M * N * out_elem
        if a["MIMIC"]:
            io += M * N * (a["T"].element_size() + 4)
        return 3 * S * M * N, io, 0, 0, math.prod(launch.grid_for(meta))
    KP, CP = a["KP"], a["C1"] + a["C2"]
    H, C = a["H"], a["C"]
    programs = math.prod(launch.grid_for(meta))
    if name == "_fused_mlp_fwd_kernel":
        rows = a["YP"].shape[1]
        bh = meta["BLOCK_H"]
        h_exec = math.ceil(H / bh) * bh
        flops = 2 * rows * h_exec * (KP + CP)
        weights = (a["V"].shape[0] * KP + C * H) * elem
        hbm = weights + rows * KP * elem + a["YP"].numel() * 4
        l2 = (rows // meta["BLOCK_B"]) * h_exec * (KP + CP) * elem + rows * KP * elem
        l2 += a["YP"].numel() * 4
        return flops, hbm, l2, 0, programs
    if name == "_fused_mlp_dz_kernel":
        rows = a["DZP"].shape[1]
        bh = meta["BLOCK_H"]
        h_exec = math.ceil(H / bh) * bh
        flops = 2 * rows * h_exec * (2 * KP + CP)
        weights = (a["V"].shape[0] * KP + C * H) * elem
        hbm = weights + rows * (KP + CP) * elem + a["DZP"].numel() * 4
        l2 = (rows // meta["BLOCK_B"]) * h_exec * (KP + CP) * elem + rows * (KP + CP) * elem
        return flops, hbm, l2, 0, programs
    if name == "_fused_mlp_bwd_kernel":
        bb, bh = meta["BLOCK_B"], meta["BLOCK_H"]
        n_h, chunks = launch.grid_for(meta)
        rows = bb * a["tiles_per_chunk"] * chunks
        h_exec = n_h * bh
        gemms = 2 * KP + 2 * CP + (KP if a["DZ_ATOMIC"] else 0)
        flops = 2 * rows * h_exec * gemms
        weights_in = (a["V"].numel() + C * H) * elem  # the user's V: read once, not padded
        out = a["DV"].numel() * a["DV"].element_size() + a["DW"].numel() * a["DW"].element_size()
        hbm = weights_in + out + rows * (KP + CP) * elem
        l2 = n_h * rows * (KP + CP) * elem + weights_in + out
        atomic = n_h * rows * KP * 4 if a["DZ_ATOMIC"] else 0
        return flops, hbm, l2, atomic, programs
    raise ValueError(f"no cost formula for {name}")


def _torch_ops(op, B, D, k, H, C, elem, p, deterministic):
    """(flops, hbm_bytes) of the torch ops around the kernels: z = x Uᵀ, padding, dx, dU, db2."""
    if op in ("forward", "mimic"):
        flops = 2 * B * D * k
        hbm = (B * D + k * D + B * k) * elem + 2 * B * k * elem  # GEMM, then z -> z_pad
        hbm += p.H_pad * p.KP * elem + H * k * elem  # V -> V_pad for the streamed V tiles
        return flops, hbm
    flops = 2 * 2 * B * D * k
    hbm = 2 * (B * k + k * D + B * D) * elem + B * D * elem  # dx = dz U, dU = dzᵀ x
    hbm += B * (p.KP + p.CP) * elem * 2 + B * C * 4  # z_pad, dy_pad
    if not p.dz_kernel:
        hbm += p.rows_bwd * p.KP * 4 * 2  # dzᵀ fp32 buffer: zeroed, read back
    else:
        hbm += p.H_pad * p.KP * elem + H * k * elem  # V -> V_pad for the dz kernel
    return flops, hbm


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


def predict(B, D, k, H, C, dtype="bfloat16", op="mimic", activation="relu", peak_tflops=None,
            bandwidth_tbs=None, target="sm_90a", deterministic=False, gpu="h100", l2_tbs=None,
            reduce_add_tbs=None):
    """Predicted cost of the triton backend for one call, per pass.

    Returns {"forward": {...}, "full": {...}, "plan": {...}}; each pass has "flops" (executed),
    "model_flops" (floor_flops: one recompute, no padding), "bytes" (HBM), "l2_bytes",
    "atomic_bytes", "time_s" (sum over kernels of `kernel_time`) and "kernels" (one dict per
    launch, with the term that bounds it). Rates: the `gpu` preset's, each replaced by a measured
    one where given (pass the peaks of the same run to put a prediction beside a measurement).
    """
    from . import triton_offline as O

    if T.K is None or T.K.INTERPRET:
        raise RuntimeError("the cost model plans the compiled GPU kernels: it needs triton with "
                           "TRITON_INTERPRET unset")
    dt = getattr(torch, str(dtype).replace("torch.", ""))
    elem = element_size(dt)
    rates = rates_for(gpu, peak_tflops, bandwidth_tbs, l2_tbs, reduce_add_tbs)
    sms = T.OFFLINE_DEVICE.sms
    fwd_op = "mimic" if op == "mimic" else "forward"
    with T.device_override(T.OFFLINE_DEVICE), O._tf32(dt):
        p = T.plan(B, k, H, C, elem, deterministic)
        traced = {"forward": O.trace(fwd_op, B, D, k, H, C, dt, activation, True, deterministic),
                  "backward": O.trace("backward", B, D, k, H, C, dt, activation, True,
                                      deterministic)}
    passes = {}
    for name, launches in traced.items():
        kernels = []
        for launch in launches:
            configs = O.candidates(launch, target)
            config = configs[0] if configs else None
            flops, hbm, l2, atomic, programs = _kernel_cost(launch, config, elem)
            t, bound, terms = kernel_time(flops, hbm, l2, atomic, rates, _busy(programs, sms))
            kernels.append({"kernel": launch.name, "config": O._config_label(config),
                            "programs": programs, "flops": flops, "bytes": hbm, "l2_bytes": l2,
                            "atomic_bytes": atomic, "time_s": t, "bound": bound,
                            "terms_s": terms})
        flops, hbm = _torch_ops("mimic" if name == "forward" else "backward", B, D, k, H, C, elem,
                                p, deterministic)
        t, bound, terms = kernel_time(flops, hbm, 0, 0, rates)
        kernels.append({"kernel": "torch ops (x Uᵀ, pads, dx, dU)", "config": "-", "programs": 0,
                        "flops": flops, "bytes": hbm, "l2_bytes": 0, "atomic_bytes": 0,
                        "time_s": t, "bound": bound, "terms_s": terms})
        passes[name] = kernels

    def total(kernels, pass_):
        return {"flops": sum(x["flops"] for x in kernels),
                "model_flops": floor_flops(B, D, k, H, C, pass_),
                "bytes": sum(x["bytes"] for x in kernels),
                "l2_bytes": sum(x["l2_bytes"] for x in kernels),
                "atomic_bytes": sum(x["atomic_bytes"] for x in kernels),
                "time_s": sum(x["time_s"] for x in kernels), "kernels": kernels}

    return {"forward": total(passes["forward"], "forward"),
            "full": total(passes["forward"] + passes["backward"], "full"),
            "plan": p._asdict(), "target": target, "dtype": str(dt).replace("torch.", ""),
            "rates": rates, "peak_tflops": rates["tflops"], "bandwidth_tbs": rates["hbm_tbs"]}


def format_prediction(pred, shape):
    B, D, k, H, C = shape
    r = pred["rates"]
    lines = [f"B={B} D={D} k={k} H={H} C={C} {pred['dtype']} on {pred['target']}, {r['name']} preset: "
             f"{r['tflops']:.0f} TFLOP/s, HBM {r['hbm_tbs']:.1f} TB/s, L2 {r['l2_tbs']:.1f} TB/s, "
             f"reduce-add {r['reduce_add_tbs']:.1f} TB/s"]
    for name in ("forward", "full"):
        t = pred[name]
        lines.append(f"  {name:<8} {t['flops'] / 1e12:8.3f} TFLOP executed "
                     f"({t['flops'] / t['model_flops']:.3f}x the one-recompute floor "
                     f"{t['model_flops'] / 1e12:.3f}), HBM {t['bytes'] / 1e9:6.3f} GB, "
                     f"L2 {t['l2_bytes'] / 1e9:7.1f} GB, dz atomics {t['atomic_bytes'] / 1e9:6.1f} GB"
                     f" -> {t['time_s'] * 1e3:7.3f} ms")
    lines.append(f"  {'kernel':<32} {'config':<22} {'programs':>8} {'GFLOP':>9} {'HBM MB':>8} "
                 f"{'L2 GB':>7} {'atom GB':>7} {'ms':>7}  bound")
    for x in pred["full"]["kernels"]:
        lines.append(f"  {x['kernel'][:32]:<32} {x['config'][:22]:<22} {x['programs']:>8} "
                     f"{x['flops'] / 1e9:>9.1f} {x['bytes'] / 1e6:>8.1f} {x['l2_bytes'] / 1e9:>7.2f} "
                     f"{x['atomic_bytes'] / 1e9:>7.2f} {x['time_s'] * 1e3:>7.3f}  {x['bound']}")
    return "\n".join(lines)


def main(argv=None):
    """`mimic-fast bench model`: print the cost model at the paper shape (or the given one)."""
    p = argparse.ArgumentParser(prog="mimic-fast bench model", description=__doc__.splitlines()[0])
    p.add_argument("--B", type=int, default=4096)
    p.add_argument("--D", type=int, default=PAPER["D"])
    p.add_argument("--k", type=int, default=PAPER["k"])
    p.add_argument("--C", type=int, default=PAPER["C"])
    p.add_argument("--H", type=int, nargs="+", default=[8000, 400000])
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--target", default="sm_90a", choices=("sm_90a", "sm_80"))
    p.add_argument("--deterministic", action="store_true", help="the deterministic dz kernel")
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS),
                   help="rate preset (default h100: H100 SXM 798 TFLOP/s, 3.0 TB/s HBM, 7 TB/s L2, "
                        "3 TB/s reduce-add; h200: 788, 4.3, 10, 3)")
    p.add_argument("--peak-tflops", type=float, default=None, help="replaces the preset's")
    p.add_argument("--bandwidth-tbs", type=float, default=None, help="replaces the preset's")
    p.add_argument("--json", default=None, help="also write the predictions as JSON")
    args = p.parse_args(argv)
    if T.K is None:
        print(f"mimic-fast bench model: error: {T._IMPORT_ERROR}", file=sys.stderr)
        return 2
    if T.K.INTERPRET:
        print("mimic-fast bench model: error: the model plans the compiled GPU kernels: unset "
              "TRITON_INTERPRET", file=sys.stderr)
        return 2
    out = []
    for H in args.H:
        shape = (args.B, args.D, args.k, H, args.C)
        pred = predict(*shape, dtype=args.dtype, peak_tflops=args.peak_tflops,
                       bandwidth_tbs=args.bandwidth_tbs, target=args.target,
                       deterministic=args.deterministic, gpu=args.gpu)
        print(format_prediction(pred, shape))
        out.append({"shape": dict(zip("B D k H C".split(), shape)), **pred})
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"raw JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
