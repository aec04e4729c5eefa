"""FLOP and byte counts of the ops: the one place every FLOP figure comes from (cost model, reports,
benchmarks, and the FlopCounterMode formulas of the backends' fused ops).

2 FLOPs per multiply-add of a GEMM; elementwise work is not counted. For the bottleneck MLP
y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2 (x (B, D), U (k, D), V (H, k), W (C, H)):
    forward                2B(Dk + kH + HC)           z = x Uᵀ, a = z Vᵀ, y = h Wᵀ
    backward (model)       2B(Dk + 2kH + 2HC)         dU = dzᵀ x, dV, dz, dW, dh
      + input_grad         2BDk                       dx = dz U (a student's x is data: off)
      + recompute          2BkH                       the fused backward forms a = z Vᵀ again
"Model" FLOPs (recompute=False) score a fused and an unfused provider on the same work; executed
FLOPs (recompute=True, input_grad=need_dx: dx only when x needs a gradient) are what the fused
backward ops run. The cost model passes padded sizes (k, C, H rounded to its tiles) to count padding.
"""
import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula

PASSES = ("forward", "backward", "full")


def _check_pass(pass_):
    if pass_ not in PASSES:
        raise ValueError(f"unknown pass {pass_!r}: expected 'forward', 'backward' or 'full'")


def mlp_flops(B, D, k, H, C, pass_="full", *, input_grad=False, recompute=False):
    """FLOPs of the bottleneck MLP for one pass (see the module docstring)."""
    _check_pass(pass_)
    fwd = 2 * B * (D * k + k * H + H * C)
    bwd = 2 * B * (D * k + 2 * k * H + 2 * H * C)
    if input_grad:
        bwd += 2 * B * D * k
    if recompute:
        bwd += 2 * B * k * H
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[pass_]


def mlp_params(D, k, H, C, bias=True):
    """Parameter count of the factored student U (k, D), V (H, k), b1 (H,), W (C, H), b2 (C,)."""
    return k * D + H * k + H * C + ((H + C) if bias else 0)


def mm_flops(M, N, K):
    return 2 * M * N * K


def loss_flops(B, C, pass_="forward"):
    """Elementwise work of a logit loss over (B, C) (these ops are scored on bandwidth)."""
    _check_pass(pass_)
    return {"forward": 3 * B * C, "backward": 3 * B * C, "full": 6 * B * C}[pass_]


def element_size(dtype):
    """Bytes per element of a torch dtype or its name ('bfloat16')."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.replace("torch.", ""))
    return dtype.itemsize


def loss_bytes(B, C, dtype, pass_="forward"):
    """Minimum memory traffic of a logit loss over (B, C) student/teacher logits: the forward reads
    both (2BC elements) and writes a scalar; the backward reads both again and writes the gradient
    (3BC); full = forward + backward."""
    _check_pass(pass_)
    n = B * C * element_size(dtype)
    return {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}[pass_]


def model_flops_per_sample(model, in_shape, train=False):
    """Model FLOPs per sample of any `model` (2 per MAC of every Linear/Conv), counted by
    FlopCounterMode on a batch of 2; train=True counts forward + backward."""
    p = next(model.parameters())
    x = torch.zeros(2, *in_shape, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2


# FlopCounterMode formulas of the backends' custom ops: what each executes (the backward recomputes
# a, and computes dx only when need_dx). The ops share the backend interface's argument order
# (dispatch.py); trailing arguments (chunk sizes, plan) are ignored; ops of extensions not built
# here are skipped.
def _fwd(x, U, V, b1, W, *args, out_shape=None, **kwargs):
    return mlp_flops(x[0], x[1], U[0], V[0], W[0], "forward")


def _bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, *args, out_shape=None, **kwargs):
    return mlp_flops(x[0], x[1], U[0], V[0], W[0], "backward", input_grad=bool(need_dx),
                     recompute=True)


_FORMULAS = {"mlp_fwd": _fwd, "mimic_fwd": _fwd, "mlp_bwd": _bwd}


def register_custom_ops():
    for prefix in ("cpu", "triton", "cuda"):
        for name, formula in _FORMULAS.items():
            try:
                op = getattr(torch.ops.mimic_fast, f"{prefix}_{name}")
            except (AttributeError, RuntimeError):  # that extension is not built here
                continue
            register_flop_formula(op)(formula)


register_custom_ops()
