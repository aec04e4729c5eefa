"""Triton backend: fused bottleneck-MLP forward, mimic loss and recompute backward (never a (B, H) tensor).

Limits: CUDA tensors on Hopper (CPU only under TRITON_INTERPRET=1, for tests); fp16 / bf16 / fp32
operands with fp32 accumulation (float32 dots use TF32 when torch allows it for matmuls, IEEE
otherwise, which is slow); k <= 256 and C <= 256, so that the bottleneck and the outputs are each one
on-chip block (wider shapes would recompute z Vᵀ per block: the cuda and reference backends serve them).
The launchers here only prepare tensors and run the launches of the plan (ops/triton_plan.py, shared
with the cost model and the offline compile gate). The backward runs two passes per chunk of H with
a bounded da workspace (no reduce-adds): deterministic by construction, one path for every mode.
"""
import contextlib
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from .._checks import check_reduction
from ..activations import ACTIVATION_CODES
from . import triton_plan as P
from .triton_plan import C_MAX, K_MAX, Device, device_override, plan, split_c  # noqa: F401

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import triton  # noqa: F401

    from . import triton_kernels as K

    _IMPORT_ERROR = None
except ImportError as e:  # the module still imports so dispatch can report why triton is missing
    K = None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


# ---------------------------------------------------------------------------------------- interface
def availability():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not (K.INTERPRET or torch.cuda.is_available()):
        return "no CUDA device is visible (and TRITON_INTERPRET=1 is not set for the CPU interpreter)"
    return None


def _interpreting():
    return K is not None and K.INTERPRET


def reasons(problem):
    out = []
    dev = problem.device.type
    if dev == "cpu":
        if not _interpreting():
            out.append("CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter; slow, for tests)")
    elif dev != "cuda":
        out.append(f"tensors on {problem.device} need a CUDA device")
    elif torch.cuda.get_device_capability(problem.device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(problem.device)
        why = ("their tiles spill registers there" if major < 9 else
               "their tiles and shared memory are checked for Hopper only")
        out.append(f"the kernels are built for Hopper (sm_90: wgmma, TMA); on sm_{major}{minor} "
                   f"{why} (benchmarks/NOTES.md): the cuda backend serves it")
    elif problem.dtype in DTYPES and problem.k <= K_MAX and problem.C <= C_MAX:
        out.extend(_fit_reasons(problem))
    if problem.dtype not in DTYPES:
        out.append(f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)")
    elif problem.dtype == torch.bfloat16 and dev == "cpu":
        out.append("bfloat16 arithmetic is wrong in the Triton interpreter: run bfloat16 on a GPU")
    if problem.k > K_MAX:
        out.append(f"bottleneck k={problem.k} exceeds {K_MAX}: the kernels keep z and V_j as one "
                   f"on-chip block of k (the cuda backend serves wider bottlenecks)")
    if problem.C > C_MAX:
        out.append(f"C={problem.C} outputs exceed {C_MAX}: the kernels keep y and dW_j as one on-chip "
                   f"block of C (the cuda backend serves more outputs)")
    if problem.op == "mimic" and problem.teacher_dtype is not None and \
            not problem.teacher_dtype.is_floating_point:
        out.append(f"teacher_logits dtype {problem.teacher_dtype} is not floating point")
    return out


def _fit_reasons(problem):
    """Why no autotune config of some kernel fits this GPU's shared memory (empty: all fit)."""
    elem = torch.empty((), dtype=problem.dtype).element_size()
    p = plan(max(problem.B, 1), problem.k, problem.H, problem.C, elem)
    key = (problem.device, problem.dtype, p.KP, p.C1, p.C2, p.bwd_block_h)
    if key not in _FITS:
        limit, capability = K._device()
        _FITS[key] = [f"no {name} kernel config fits this GPU's {limit} bytes of shared memory at "
                      f"k_pad={p.KP}, C_pad={p.CP}, {problem.dtype} (the cuda backend serves it)"
                      for name in ("fwd", "bwd", "gemm")
                      if not P.fitting_configs(name, P.CONFIGS[name], p.meta(name), limit,
                                               capability)]
    return _FITS[key]


_FITS = {}


def auto_reasons(problem):
    """Inputs this backend serves when named, but that `auto` leaves to another backend."""
    if problem.device.type == "cuda" and problem.dtype == torch.float32 and \
            _dot_precision(torch.float32) == "ieee":
        return ["float32 with TF32 disallowed would run IEEE fp32 without tensor cores (slow): allow "
                "TF32 (torch.backends.cuda.matmul.fp32_precision = 'tf32') or name backend='triton'"]
    return []


def describe():
    if K is None:
        return {}
    return {"triton": triton.__version__, "interpreter": K.INTERPRET,
            "dz": "two passes per H chunk through a bounded da workspace (deterministic)",
            "workspace_max_bytes": P.WORKSPACE_BYTES, "k_max": K_MAX, "c_max": C_MAX}


# ------------------------------------------------------------------------------------------ helpers
def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dot_precision(dtype):
    """fp32 dots: "tf32" when torch allows TF32 for CUDA matmuls, else "ieee" (None: not fp32).

    The new precision API decides when it is set ("tf32" / "ieee", "none" inherits the global
    setting); the legacy getter only when both are "none" (it raises when the APIs are mixed)."""
    if dtype != torch.float32:
        return None
    new = getattr(torch.backends.cuda.matmul, "fp32_precision", None)
    if new is not None:
        if new == "none":
            new = getattr(torch.backends, "fp32_precision", "none")
        if new in ("tf32", "ieee"):
            return new
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "highest"
    return "ieee" if legacy == "highest" and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def _aligned(t):
    return t.data_ptr() % 16 == 0


def _padded(t, rows, cols, dtype):
    """t (r, c) zero-padded to (rows, cols), contiguous, in dtype; t itself when it already is."""
    r, c = t.shape
    if (r, c) == (rows, cols) and t.dtype == dtype and t.is_contiguous() and _aligned(t):
        return t
    out = t.new_zeros((rows, cols), dtype=dtype)
    out[:r, :c] = t
    return out


def _tma_rows(W, p):
    """W (C, H) as a TMA descriptor can read it: unit stride along H, 16-byte aligned rows; else
    a zero-padded (C, H_pad) copy (only when H·elem is not a multiple of 16 or W is strided)."""
    if W.stride(1) == 1 and (W.stride(0) * W.element_size()) % 16 == 0 and _aligned(W):
        return W
    return _padded(W, p.C, p.H_pad, W.dtype)


def _dy_scale(dy):
    """s (1,) fp32: a power of two >= max|dy| (1 for dy = 0). dy / s is exact and within [-1, 1],
    so the low-precision operand keeps dy's bits even where dy itself is subnormal in fp16
    (dy = 2(y − t)/(B·C) is, at the paper's shape, for |y − t| < 0.2)."""
    m = dy.detach().abs().amax().float().reshape(1)
    return torch.where(m > 0, torch.exp2(torch.ceil(torch.log2(m))), torch.ones_like(m))


def _common(p, dtype, b1, activation):
    return dict(has_b1=b1 is not None, activation_code=ACTIVATION_CODES[activation],
                dot_precision=_dot_precision(dtype))


def _plan_for(z, V, W):
    return plan(z.shape[0], z.shape[1], V.shape[0], W.shape[0], z.element_size())


# ---------------------------------------------------------------------------------------- launchers
def _forward(x, U, V, b1, W, b2, activation, t=None, reduction=None):
    """Forward launches; y (no t) or (loss, dy_unit) (with teacher logits t); and z."""
    z = torch.matmul(x, U.t())
    dtype, dev = z.dtype, z.device
    p = _plan_for(z, V, W)
    op = "forward" if t is None else "mimic"
    tensors = {
        "z_pad": _padded(z, p.rows, p.KP, dtype),
        "V_pad": _padded(V, p.H_pad, p.KP, dtype),
        "b1_pad": None if b1 is None else F.pad(b1, (0, p.H_pad - p.H)),
        "W_tma": _tma_rows(W, p),
        "yp": torch.empty((p.fwd_splits * p.rows, p.CP), dtype=torch.float32, device=dev),
        "b2": b2, "t": t, "_dummy": z.new_empty(1),
    }
    if t is None:
        tensors["y"] = torch.empty((p.B, p.C), dtype=dtype, device=dev)
    else:
        tensors["dy_unit"] = torch.empty((p.B, p.C), dtype=torch.float32, device=dev)
        tensors["loss"] = torch.empty((p.B, p.C), dtype=dtype, device=dev) if reduction == "none" \
            else torch.empty(P.reduce_grid(p, p.B, p.C), dtype=torch.float32, device=dev)
    tensors = {k: (tensors["_dummy"] if v is None else v) for k, v in tensors.items()}
    for launch in P.pass_launches(p, op, has_b2=b2 is not None, reduction=reduction,
                                  **_common(p, dtype, b1, activation)):
        K.run(launch, tensors)
    if t is None:
        return tensors["y"], z
    loss = tensors["loss"]
    if reduction != "none":
        # Per-program partial sums added by one torch reduction over a fixed-size vector
        # (no atomics: same value every run).
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / (p.B * p.C)
        loss = loss.to(dtype)
    return (loss, tensors["dy_unit"]), z


def fused_mlp_fwd(x, U, V, b1, W, b2, activation):
    """y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2 in x's dtype, and z = x Uᵀ (saved for backward)."""
    with _device_guard(x):
        return _forward(x, U, V, b1, W, b2, activation)


def fused_mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    """(loss, z, dy_unit): the mimic MSE loss of the fused forward, and ∂loss/∂y (fp32) for backward."""
    check_reduction(reduction)  # the launcher can be called directly, bypassing functional
    with _device_guard(x):
        (loss, dy), z = _forward(x, U, V, b1, W, b2, activation, t, reduction)
    return loss, z, dy


def backward_tensors(p, dy, z, V, b1, W):
    """Every tensor the backward's launches name (triton_plan.backward_buffers), allocated."""
    dtype, dev = z.dtype, z.device
    scale = _dy_scale(dy)
    dy_pad = z.new_zeros((p.rows, p.CP))
    dy_pad[:p.B, :p.C] = dy.float() / scale  # exact: scale is a power of two
    empty = dict(device=dev)
    t = {
        "z_pad": _padded(z, p.rows, p.KP, dtype), "dy_pad": dy_pad, "dy_scale": scale,
        "V": V, "b1": b1, "W_tma": _tma_rows(W, p),
        "da": torch.empty((p.ws_rows, p.rows), dtype=dtype, **empty),
        "vp": torch.empty((p.ws_rows, p.KP), dtype=dtype, **empty),
        "dzp": torch.empty((p.dz_splits, p.rows, p.KP), dtype=torch.float32, **empty),
        "dz": torch.empty((p.B, p.k), dtype=dtype, **empty),
        "dV": torch.empty((p.H, p.k), dtype=dtype, **empty),
        "dW": torch.empty((p.C, p.H), dtype=dtype, **empty),
        "db1": torch.empty((p.H,), dtype=dtype, **empty) if b1 is not None else None,
        "_dummy": z.new_empty(1),
    }
    if p.bwd_bchunks > 1:
        t["dwp"] = torch.empty((p.bwd_bchunks, p.CP, p.H_pad), dtype=torch.float32, **empty)
        t["db1p"] = torch.empty((p.bwd_bchunks, p.H_pad), dtype=torch.float32, **empty)
    if p.dv_splits > 1:
        t["dvp"] = torch.empty((p.dv_splits, p.ws_rows, p.KP), dtype=torch.float32, **empty)
    if b1 is not None:
        t["db1_row"] = t["db1"].view(1, p.H)
    return {k: (t["_dummy"] if v is None else v) for k, v in t.items()}


def fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx):
    """(dx, dU, dV, db1, dW, db2) by recompute; dx is None unless need_dx, db1/db2 are None
    without biases."""
    dtype = x.dtype
    with _device_guard(x):
        p = _plan_for(z, V, W)
        tensors = backward_tensors(p, dy, z, V, b1, W)
        scaled = P.dz_scaled(dtype)
        for launch in P.pass_launches(p, "backward", scale_dz=scaled,
                                      **_common(p, dtype, b1, activation)):
            K.run(launch, tensors)
        dz = tensors["dz"]
        dx = torch.matmul(dz, U) if need_dx else None
        dU = torch.matmul(dz.t(), x)
        if not scaled:  # fp16: dz is in dy / s units (it keeps its bits); s applies to the products
            s = tensors["dy_scale"].to(dtype)
            dx = dx.mul_(s) if need_dx else None
            dU = dU.mul_(s)
        db2 = dy.sum(0, dtype=torch.float32).to(dtype) if has_b2 else None
    return dx, dU, tensors["dV"], tensors["db1"] if b1 is not None else None, tensors["dW"], db2


# ------------------------------------------------------------------------------------- custom ops
# torch.library.custom_op (not triton_op, which the interpreter cannot run) + register_fake, so
# torch.compile(fullgraph=True) treats each launch sequence as one opaque op without a graph break.
# Optional outputs (dx, db1, db2) travel as empty tensors: custom-op schemas cannot return None.
_EMPTY = (0,)


@torch.library.custom_op("mimic_fast::triton_mlp_fwd", mutates_args=())
def triton_mlp_fwd(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, b1: Optional[torch.Tensor],
                   W: torch.Tensor, b2: Optional[torch.Tensor], activation: str
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    return fused_mlp_fwd(x, U, V, b1, W, b2, activation)


@triton_mlp_fwd.register_fake
def _(x, U, V, b1, W, b2, activation):
    return x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], U.shape[0]))


@torch.library.custom_op("mimic_fast::triton_mimic_fwd", mutates_args=())
def triton_mimic_fwd(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, b1: Optional[torch.Tensor],
                     W: torch.Tensor, b2: Optional[torch.Tensor], t: torch.Tensor, activation: str,
                     reduction: str) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return fused_mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction)


@triton_mimic_fwd.register_fake
def _(x, U, V, b1, W, b2, t, activation, reduction):
    B, C = x.shape[0], W.shape[0]
    loss = x.new_empty((B, C)) if reduction == "none" else x.new_empty(())
    return loss, x.new_empty((B, U.shape[0])), x.new_empty((B, C), dtype=torch.float32)


@torch.library.custom_op("mimic_fast::triton_mlp_bwd", mutates_args=())
def triton_mlp_bwd(dy: torch.Tensor, x: torch.Tensor, z: torch.Tensor, U: torch.Tensor,
                   V: torch.Tensor, b1: Optional[torch.Tensor], W: torch.Tensor, activation: str,
                   has_b2: bool, need_dx: bool) -> List[torch.Tensor]:
    dx, dU, dV, db1, dW, db2 = fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx)
    if dx is None:
        dx = x.new_empty(_EMPTY)
    if db1 is None:
        db1 = x.new_empty(_EMPTY)
    if db2 is None:
        db2 = x.new_empty(_EMPTY)
    return [dx, dU, dV, db1, dW, db2]


@triton_mlp_bwd.register_fake
def _(dy, x, z, U, V, b1, W, activation, has_b2, need_dx):
    H, C = V.shape[0], W.shape[0]
    return [x.new_empty(x.shape if need_dx else _EMPTY), x.new_empty(U.shape), x.new_empty(V.shape),
            x.new_empty((H,) if b1 is not None else _EMPTY), x.new_empty(W.shape),
            x.new_empty((C,) if has_b2 else _EMPTY)]


# ------------------------------------------------------------------------------ backend interface
def mlp_fwd(x, U, V, b1, W, b2, activation):
    return triton_mlp_fwd(x, U, V, b1, W, b2, activation)


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx):
    dx, dU, dV, db1, dW, db2 = triton_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx)
    return (dx if need_dx else None, dU, dV, db1 if b1 is not None else None, dW,
            db2 if has_b2 else None)


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    return triton_mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction)
