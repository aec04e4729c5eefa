"""Triton backend: fused bottleneck-MLP forward, mimic loss and recompute backward (never a (B, H) tensor).

Limits: CUDA tensors (CPU only under TRITON_INTERPRET=1, for tests); float16 / bfloat16 / float32
operands with fp32 accumulation (float32 dots use TF32 only when torch allows it for matmuls);
k <= K_MAX, C <= C_MAX (the kernels loop any size, but recompute grows with ceil(k/256), ceil(C/256)).
The cross-H reduction of dz is deterministic by default: a (n_splits, B, k) fp32 partial buffer,
n_splits capped so the buffer stays under `split_budget` x the bytes of one (B, H) tensor in the input
dtype (default 1/4); fewer splits mean fewer backward programs. `dz_reduction("atomic")` (a context
manager, or `set_dz_reduction`) trades bit-reproducibility for one (B, k) fp32 buffer and one program
per 128 hidden units; it is read when the backward runs, so wrap `loss.backward()` too.
"""
import contextlib
import os
from typing import List, Optional, Tuple

import torch

from .._checks import check_reduction
from ..activations import ACTIVATION_CODES

NAME = "triton"
K_MAX = 1024
C_MAX = 2048
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

try:
    import triton

    from . import triton_kernels as K

    _IMPORT_ERROR = None
except ImportError as e:  # the module still imports so dispatch can report why triton is missing
    triton, K = None, None
    _IMPORT_ERROR = f"triton is not importable ({type(e).__name__}: {e})"


class _Settings:
    """Backend knobs (module state, never read from the environment at import)."""

    dz_reduction = "split"  # "split": deterministic partial buffers; "atomic": fp32 atomic adds
    split_budget = 0.25  # split buffers <= this fraction of one (B, H) tensor in the input dtype
    # Widest k block of the dV/dz kernel: 256 keeps k = 250 in one block (no recompute of a and
    # dh per block) but spills registers (ptxas); 128 halves the spills and recomputes twice.
    bwd_block_k = 256


settings = _Settings()


def set_dz_reduction(mode):
    """'split' (default, bit-identical across runs) or 'atomic' (less memory, more parallelism)."""
    if mode not in ("split", "atomic"):
        raise ValueError(f"dz reduction mode must be 'split' or 'atomic', got {mode!r}")
    settings.dz_reduction = mode


@contextlib.contextmanager
def dz_reduction(mode):
    """`with dz_reduction("atomic"): loss = ...; loss.backward()` — the mode in force at backward."""
    previous = settings.dz_reduction
    set_dz_reduction(mode)
    try:
        yield
    finally:
        settings.dz_reduction = previous


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
    if problem.dtype not in DTYPES:
        out.append(f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)")
    elif problem.dtype == torch.bfloat16 and dev == "cpu":
        out.append("bfloat16 arithmetic is wrong in the Triton interpreter: run bfloat16 on a GPU")
    if problem.k > K_MAX:
        out.append(f"bottleneck k={problem.k} exceeds {K_MAX}: the backward recomputes z Vᵀ per "
                   f"k block, so an unfused path is faster there")
    if problem.C > C_MAX:
        out.append(f"C={problem.C} outputs exceed {C_MAX}: the forward and dW kernels recompute "
                   f"z Vᵀ per C block, so an unfused path is faster there")
    if problem.op == "mimic" and problem.teacher_dtype is not None and \
            not problem.teacher_dtype.is_floating_point:
        out.append(f"teacher_logits dtype {problem.teacher_dtype} is not floating point")
    return out


def describe():
    if K is None:
        return {}
    return {"triton": triton.__version__, "interpreter": K.INTERPRET,
            "dz_reduction": settings.dz_reduction, "k_max": K_MAX, "c_max": C_MAX}


# ------------------------------------------------------------------------------------------ helpers
_SM_COUNT = {}


def _target_programs(device):
    """Programs per launch that fill the machine (2 waves); small under the interpreter."""
    if K.INTERPRET or device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _h_align():
    # Split boundaries on multiples of every config's BLOCK_H, so no tile straddles two splits.
    return 16 if K.INTERPRET else 128


def _block(n, cap):
    """Power-of-two block covering n (>= 16 for tl.dot), at most cap; 16 under the interpreter."""
    if K.INTERPRET:
        return 16
    return max(16, min(cap, triton.next_power_of_2(n)))


def _dot_precision(dtype):
    if dtype != torch.float32:
        return None
    try:
        tf32 = torch.backends.cuda.matmul.fp32_precision == "tf32"
    except AttributeError:
        tf32 = torch.backends.cuda.matmul.allow_tf32
    return "tf32" if tf32 or torch.get_float32_matmul_precision() != "highest" else "ieee"


def _split_h(H, n_splits):
    """(h_per_split, n_splits) with split boundaries on the H alignment."""
    align = _h_align()
    n_splits = max(1, min(n_splits, triton.cdiv(H, align)))
    h_per_split = triton.cdiv(triton.cdiv(H, n_splits), align) * align
    return h_per_split, triton.cdiv(H, h_per_split)


def _budget_splits(B, H, width, dtype):
    """Most (B, width) fp32 partial buffers within settings.split_budget x one (B, H) tensor."""
    budget = settings.split_budget * B * H * torch.empty((), dtype=dtype).element_size()
    return max(1, int(budget // (B * width * 4)))


def _device_guard(t):
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _dummy(t):
    return t.new_empty(1)


# ---------------------------------------------------------------------------------------- launchers
def _forward_partials(z, V, b1, W, activation, n_splits=None):
    """YP (S, B, C) fp32: the partial outputs of each H split (no b2)."""
    B, k = z.shape
    H, C = V.shape[0], W.shape[0]
    block_c = _block(C, 256)
    n_cb = triton.cdiv(C, block_c)
    if n_splits is None:
        # Enough splits to fill the machine counting batch tiles of 64 rows, within the budget.
        tiles = triton.cdiv(B, 16 if K.INTERPRET else 64) * n_cb
        n_splits = min(triton.cdiv(_target_programs(z.device), tiles),
                       _budget_splits(B, H, C, z.dtype))
    h_per_split, n_splits = _split_h(H, n_splits)
    yp = torch.empty((n_splits, B, C), dtype=torch.float32, device=z.device)
    grid = lambda META: (triton.cdiv(B, META["BLOCK_B"]), n_cb, n_splits)  # noqa: E731
    K._fused_mlp_fwd_kernel[grid](
        z, V, _dummy(z) if b1 is None else b1, W, yp,
        B, k, H, C, h_per_split,
        z.stride(0), z.stride(1), V.stride(0), V.stride(1), 0 if b1 is None else b1.stride(0),
        W.stride(0), W.stride(1),
        HAS_B1=b1 is not None, ACTIVATION=ACTIVATION_CODES[activation],
        DOT_PRECISION=_dot_precision(z.dtype), BLOCK_C=block_c)
    return yp


def _reduce_splits(parts, bias=None, out_dtype=None, t=None, reduction=None):
    """Σ over the split axis of parts (S, M, N) fp32 (+ bias) -> (M, N) in out_dtype, or, with
    teacher logits t, the mimic-loss epilogue -> (loss, dy_unit)."""
    S, M, N = parts.shape
    dev = parts.device
    bm, bn = (16, 16) if K.INTERPRET else (32, 128)
    grid = (triton.cdiv(M, bm), triton.cdiv(N, bn))
    mimic = t is not None
    out = None if mimic else torch.empty((M, N), dtype=out_dtype, device=dev)
    dy = torch.empty((M, N), dtype=torch.float32, device=dev) if mimic else None
    if mimic and reduction == "none":
        loss = torch.empty((M, N), dtype=out_dtype, device=dev)
    elif mimic:
        loss = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=dev)
    else:
        loss = None
    scale = {"mean": 2.0 / (M * N), "sum": 2.0, "none": 2.0}.get(reduction, 0.0)
    d = _dummy(parts)
    K._reduce_splits_kernel[grid](
        parts, d if bias is None else bias, d if out is None else out, d if t is None else t,
        d if dy is None else dy, d if loss is None else loss,
        S, M, N, scale,
        0 if bias is None else bias.stride(0),
        *(out.stride() if out is not None else (0, 0)),
        *(t.stride() if t is not None else (0, 0)),
        *(dy.stride() if dy is not None else (0, 0)),
        HAS_BIAS=bias is not None, STORE_OUT=out is not None, MIMIC=mimic,
        LOSS_ELEMENTWISE=reduction == "none", BLOCK_M=bm, BLOCK_N=bn, num_warps=4)
    if not mimic:
        return out
    if reduction != "none":
        # Per-program partial sums added by one torch reduction over a fixed-size vector
        # (no atomics: same value every run).
        loss = loss.sum()
        if reduction == "mean":
            loss = loss / (M * N)
        loss = loss.to(out_dtype)
    return loss, dy


def fused_mlp_fwd(x, U, V, b1, W, b2, activation, n_splits=None):
    """y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2 in x's dtype, and z = x Uᵀ (saved for backward)."""
    with _device_guard(x):
        z = torch.matmul(x, U.t())
        yp = _forward_partials(z, V, b1, W, activation, n_splits)
        y = _reduce_splits(yp, b2, x.dtype)
    return y, z


def fused_mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction, n_splits=None):
    """(loss, z, dy_unit): the mimic MSE loss of the fused forward, and ∂loss/∂y (fp32) for backward."""
    check_reduction(reduction)  # the launcher can be called directly, bypassing functional
    with _device_guard(x):
        z = torch.matmul(x, U.t())
        yp = _forward_partials(z, V, b1, W, activation, n_splits)
        loss, dy = _reduce_splits(yp, b2, x.dtype, t=t, reduction=reduction)
    return loss, z, dy


def fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, n_splits=None, mode=None):
    """(dx, dU, dV, db1, dW, db2) by recompute; db1/db2 are None without biases.

    mode: "split" | "atomic" (default: settings.dz_reduction); n_splits overrides the heuristic.
    """
    mode = settings.dz_reduction if mode is None else mode
    if mode not in ("split", "atomic"):
        raise ValueError(f"dz reduction mode must be 'split' or 'atomic', got {mode!r}")
    dtype = x.dtype
    B, k = z.shape
    H, C = V.shape[0], W.shape[0]
    code = ACTIVATION_CODES[activation]
    prec = _dot_precision(dtype)
    with _device_guard(x):
        dy_op = dy.to(dtype)  # tensor-core operand; eager's dy is in this dtype too
        b1_arg = _dummy(z) if b1 is None else b1
        stride_b1 = 0 if b1 is None else b1.stride(0)

        # dV, db1, dz
        block_k = _block(k, settings.bwd_block_k)
        n_kb = triton.cdiv(k, block_k)
        if mode == "atomic":
            h_per_split, S = _split_h(H, triton.cdiv(H, _h_align()))
            dz_buf = torch.zeros((B, k), dtype=torch.float32, device=z.device)
        else:
            if n_splits is None:
                n_splits = min(triton.cdiv(_target_programs(z.device), n_kb),
                               _budget_splits(B, H, k, dtype))
            h_per_split, S = _split_h(H, n_splits)
            dz_buf = torch.empty((S, B, k), dtype=torch.float32, device=z.device)
        dV = torch.empty((H, k), dtype=dtype, device=z.device)
        db1 = torch.empty((H,), dtype=dtype, device=z.device) if b1 is not None else None
        K._fused_mlp_bwd_dv_kernel[(S, n_kb)](
            dy_op, z, V, b1_arg, W, dV, _dummy(z) if db1 is None else db1, dz_buf,
            B, k, H, C, h_per_split,
            dy_op.stride(0), dy_op.stride(1), z.stride(0), z.stride(1), V.stride(0), V.stride(1),
            stride_b1, W.stride(0), W.stride(1), dV.stride(0), dV.stride(1),
            HAS_B1=b1 is not None, ACTIVATION=code, ATOMIC_DZ=mode == "atomic",
            DOT_PRECISION=prec, BLOCK_K=block_k)

        # dW
        block_c = _block(C, 256)
        dW = torch.empty((C, H), dtype=dtype, device=z.device)
        grid = lambda META: (triton.cdiv(H, META["BLOCK_H"]), triton.cdiv(C, block_c))  # noqa: E731
        K._fused_mlp_bwd_dw_kernel[grid](
            dy_op, z, V, b1_arg, dW,
            B, k, H, C,
            dy_op.stride(0), dy_op.stride(1), z.stride(0), z.stride(1), V.stride(0), V.stride(1),
            stride_b1, dW.stride(0), dW.stride(1),
            HAS_B1=b1 is not None, ACTIVATION=code, DOT_PRECISION=prec, BLOCK_C=block_c)

        dz = dz_buf.to(dtype) if mode == "atomic" else _reduce_splits(dz_buf, None, dtype)
        del dz_buf
        dx = torch.matmul(dz, U)
        dU = torch.matmul(dz.t(), x)
        db2 = dy.sum(0, dtype=torch.float32).to(dtype) if has_b2 else None
    return dx, dU, dV, db1, dW, db2


# ------------------------------------------------------------------------------------- custom ops
# torch.library.custom_op (not triton_op, which the interpreter cannot run) + register_fake, so
# torch.compile(fullgraph=True) treats each launch sequence as one opaque op without a graph break.
# Optional outputs (db1, db2) travel as empty tensors: custom-op schemas cannot return None.
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
                   has_b2: bool) -> List[torch.Tensor]:
    dx, dU, dV, db1, dW, db2 = fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2)
    if db1 is None:
        db1 = x.new_empty(_EMPTY)
    if db2 is None:
        db2 = x.new_empty(_EMPTY)
    return [dx, dU, dV, db1, dW, db2]


@triton_mlp_bwd.register_fake
def _(dy, x, z, U, V, b1, W, activation, has_b2):
    H, C = V.shape[0], W.shape[0]
    return [x.new_empty(x.shape), x.new_empty(U.shape), x.new_empty(V.shape),
            x.new_empty((H,) if b1 is not None else _EMPTY), x.new_empty(W.shape),
            x.new_empty((C,) if has_b2 else _EMPTY)]


# ------------------------------------------------------------------------------ backend interface
def mlp_fwd(x, U, V, b1, W, b2, activation):
    return triton_mlp_fwd(x, U, V, b1, W, b2, activation)


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2):
    dx, dU, dV, db1, dW, db2 = triton_mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2)
    return dx, dU, dV, db1 if b1 is not None else None, dW, db2 if has_b2 else None


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    return triton_mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction)
