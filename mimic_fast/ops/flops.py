"""FLOP formulas of the backends' fused ops for torch.utils.flop_counter.FlopCounterMode.

They count the GEMM FLOPs each op executes (2 per multiply-add), recomputation included, so the
cpu/triton/cuda ops count what the reference backend's own matmuls count under FlopCounterMode:
    forward  2B(Dk + kH + HC)                            z, a = z Vᵀ, y = h Wᵀ
    backward 2B(3kH + 2HC + 2Dk)                         a again, dW, dh, dV, dz, dU, dx
(mimic_fast.bench.counts.mlp_flops counts *model* FLOPs instead: no recompute, no dx.)
Every op shares the argument order of the backend interface (dispatch.py), extra trailing
arguments (activation, chunk sizes) are ignored; ops of extensions that are not built are skipped.
"""
import torch
from torch.utils.flop_counter import register_flop_formula


def forward_flops(B, D, k, H, C):
    return 2 * B * (D * k + k * H + H * C)


def backward_flops(B, D, k, H, C):
    return 2 * B * (3 * k * H + 2 * H * C + 2 * D * k)


def _fwd(x, U, V, b1, W, *args, out_shape=None, **kwargs):
    return forward_flops(x[0], x[1], U[0], V[0], W[0])


def _bwd(dy, x, z, U, V, b1, W, *args, out_shape=None, **kwargs):
    return backward_flops(x[0], x[1], U[0], V[0], W[0])


_FORMULAS = {"mlp_fwd": _fwd, "mimic_fwd": _fwd, "mlp_bwd": _bwd}


def _register():
    for prefix in ("cpu", "triton", "cuda"):
        for name, formula in _FORMULAS.items():
            try:
                op = getattr(torch.ops.mimic_fast, f"{prefix}_{name}")
            except (AttributeError, RuntimeError):  # that extension is not built here
                continue
            register_flop_formula(op)(formula)


_register()
