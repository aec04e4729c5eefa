"""CUDA backend: hand-written CUDA kernels (csrc/cuda, torch.ops.mimic_fast.cuda_*), no Triton.

The MLP is streamed over H in chunks whose (B, chunk) tile stays in L2 (sized from the device's L2):
per chunk cuBLAS GEMMs through ATen (ReLU's bias+activation fused into the GEMM by cuBLASLt) and one
bias+activation epilogue otherwise; backward recomputes the tile. Each chunk loop is replayed from a
CUDA graph captured on its second call with the same shapes and parameters (set_graphs / graphs()). float32 / float16 / bfloat16 only (float64: use "reference"); needs torch with CUDA and the
extension mimic_fast._C_cuda (built by setup.py when nvcc is found). Also the one-pass loss kernels
with autograd: logit_mse_loss and kd_loss (mimic_fast.dispatch's loss ops, `auto`'s choice on CUDA).
"""
import contextlib
import math
import os
import warnings

import torch
import torch.nn.functional as F

from .._checks import REDUCTION_CODES
from ..activations import ACTIVATION_CODES

NAME = "cuda"
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEFAULT_ARCH_LIST = "8.0;9.0"  # setup.py's default TORCH_CUDA_ARCH_LIST


def _env_chunk_h():
    """MIMIC_FAST_CUDA_CHUNK_H: columns of H per chunk for tuning runs; 0 / unset sizes the tile from
    the device's L2. Read when used, so a bad value is a clear error, never an import failure."""
    value = os.environ.get("MIMIC_FAST_CUDA_CHUNK_H", "").strip()
    if not value:
        return 0
    if not value.isdigit():
        raise ValueError(f"environment variable MIMIC_FAST_CUDA_CHUNK_H={value!r} must be a positive "
                         f"integer (a chunk width); unset it to let mimic_fast choose")
    return int(value)


def _import_extension():
    if torch.version.cuda is None:
        return f"torch {torch.__version__} was built without CUDA"
    try:
        from .. import _C_cuda  # noqa: F401  (loading it registers torch.ops.mimic_fast.cuda_*)
    except (ImportError, OSError) as e:  # not built, or built against another torch / CUDA
        reason = (f"the CUDA extension mimic_fast._C_cuda is not available ({type(e).__name__}: {e}); "
                  f"build it with `pip install --no-build-isolation -e .` (needs nvcc)")
        warnings.warn(f"mimic_fast: {reason}", RuntimeWarning, stacklevel=3)
        return reason
    return None


_IMPORT_ERROR = _import_extension()
_ARCH_REASON = {}  # device index -> None or why the built kernels cannot run there


def _dtype_list():
    return ", ".join(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)


def availability():
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def built_archs():
    """Compute capabilities the kernels were compiled for, e.g. [80, 90]; [] when not built."""
    if _IMPORT_ERROR is not None:
        return []
    return [int(a) // 10 for a in torch.ops.mimic_fast.cuda_built_archs()]


def _arch_reason(device):
    if _IMPORT_ERROR is not None or not torch.cuda.is_available():
        return None  # availability() already says why
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _ARCH_REASON:
        major, minor = torch.cuda.get_device_capability(index)
        archs = built_archs()
        # SASS runs on the same major revision with an equal or newer minor one.
        ok = any(a // 10 == major and a % 10 <= minor for a in archs)
        _ARCH_REASON[index] = None if ok else (
            f"cuda:{index} is sm_{major}{minor} but the extension was built for "
            f"{', '.join(f'sm_{a}' for a in archs) or 'no architecture'} "
            f"(rebuild with TORCH_CUDA_ARCH_LIST={major}.{minor})")
    return _ARCH_REASON[index]


def reasons(problem):
    out = []
    if problem.device.type != "cuda":
        out.append(f"tensors are on {problem.device}; the cuda backend runs on CUDA tensors only")
    if problem.dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {problem.dtype} is not supported ({_dtype_list()})")
    if problem.teacher_dtype is not None and problem.teacher_dtype not in SUPPORTED_DTYPES:
        out.append(f"teacher_logits dtype {problem.teacher_dtype} is not supported ({_dtype_list()})")
    # The capability query is not traceable; under torch.compile it ran in eager mode already.
    if not out and not torch.compiler.is_compiling():
        why = _arch_reason(problem.device)
        if why:
            out.append(why)
    return out


def describe():
    if _IMPORT_ERROR is not None:
        archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
        return {"built": False, "arch_list": f"{archs} (when built)"}
    info = {"built": True, "arch_list": ";".join(f"{a // 10}.{a % 10}" for a in built_archs()),
            "chunk_h": _env_chunk_h() or "auto (L2)",
            "chunk_loop": "CUDA-graph replay" if graph_stats()["enabled"] else "eager (graphs off)"}
    if torch.cuda.is_available():
        info["l2_bytes"] = int(torch.ops.mimic_fast.cuda_l2_bytes(torch.cuda.current_device()))
    return info


def chunk_h(B, H, dtype, backward=False, device=None):
    """Columns of H per chunk that the ops pick for this batch on `device` (for benchmarks)."""
    if _env_chunk_h():
        return min(_env_chunk_h(), H)
    index = torch.cuda.current_device() if device is None else torch.device(device).index or 0
    return int(torch.ops.mimic_fast.cuda_chunk_h(B, H, torch.empty((), dtype=dtype).element_size(),
                                                  backward, index))


# Order of torch.ops.mimic_fast.cuda_graph_stats()'s counters.
GRAPH_STATS = ("enabled", "graphs", "captures", "replays", "eager", "failures", "bytes")


def graph_stats():
    """{enabled, graphs held, captures, replays, eager runs, failed captures, bytes} of the chunk
    loops; bytes: device memory the held graphs' static buffers (tiles, z/dy copies, outputs) keep."""
    return dict(zip(GRAPH_STATS, torch.ops.mimic_fast.cuda_graph_stats()))


def set_graphs(enabled):
    """Turn the chunk loops' CUDA-graph replay on or off (drops captured graphs); returns the old setting.

    On by default; MIMIC_FAST_CUDA_GRAPHS=0 in the environment starts with it off.
    """
    return bool(torch.ops.mimic_fast.cuda_set_graphs(bool(enabled)))


@contextlib.contextmanager
def graphs(enabled):
    """Run a block with the chunk loops' graph replay on or off, then restore the previous setting."""
    old = set_graphs(enabled)
    try:
        yield
    finally:
        set_graphs(old)


# ---- the backend interface of mimic_fast.dispatch --------------------------------------------------
def _chunk(chunk_h_arg):
    return _env_chunk_h() if chunk_h_arg is None else int(chunk_h_arg)


def mlp_fwd(x, U, V, b1, W, b2, activation, chunk_h=None):
    return torch.ops.mimic_fast.cuda_mlp_fwd(x, U, V, b1, W, b2, ACTIVATION_CODES[activation],
                                             _chunk(chunk_h))


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, chunk_h=None):
    dx, dU, dV, db1, dW, db2 = torch.ops.mimic_fast.cuda_mlp_bwd(
        dy, x, z, U, V, b1, W, ACTIVATION_CODES[activation], has_b2, need_dx, _chunk(chunk_h))
    # The schema cannot return None: absent gradients (dx not needed, no biases) come back empty.
    return ((dx if need_dx else None), dU, dV, (db1 if b1 is not None else None), dW,
            (db2 if has_b2 else None))


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction, chunk_h=None):
    return torch.ops.mimic_fast.cuda_mimic_fwd(x, U, V, b1, W, b2, t, ACTIVATION_CODES[activation],
                                               REDUCTION_CODES[reduction], _chunk(chunk_h))


# ---- the loss kernels with autograd ---------------------------------------------------------------
def _rows(x):
    C = x.shape[-1]
    return x.reshape(math.prod(x.shape[:-1]), C)


def _kd_terms(s, t, T):
    acc = torch.promote_types(s.dtype, torch.float32)
    lq = F.log_softmax(s.to(acc) / T, dim=-1)
    lp = F.log_softmax(t.to(acc) / T, dim=-1)
    # Tensor / 0 is NaN, as batchmean of an empty batch is.
    return lq, lp, (lp.exp() * (lp - lq)).sum() * (T * T) / s.shape[0]


def _logit_mse_kernel(s, t, reduction, zero_mean):
    """(loss in s's dtype, float32 dy_unit) from the one-pass kernel; 2-D inputs."""
    return torch.ops.mimic_fast.cuda_logit_mse(s, t, REDUCTION_CODES[reduction], zero_mean)


def _kd_kernel(s, t, T):
    """(loss in s's dtype, float32 dy_unit) from the two-pass kernel; 2-D inputs."""
    return torch.ops.mimic_fast.cuda_kd_loss(s, t, T)


class _LogitMSELoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, reduction, zero_mean):
        loss, dy = _logit_mse_kernel(_rows(s), _rows(t), reduction, zero_mean)
        ctx.save_for_backward(dy)
        ctx.reduction, ctx.zero_mean, ctx.shape = reduction, zero_mean, s.shape
        ctx.s_dtype, ctx.t_dtype = s.dtype, t.dtype
        return loss.reshape(s.shape) if reduction == "none" else loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (dy,) = ctx.saved_tensors
        acc = torch.promote_types(dy.dtype, torch.float32)
        if ctx.reduction == "none":
            grad = dy.to(acc) * g.reshape(dy.shape).to(acc)
            if ctx.zero_mean:  # d(loss)/d(s - t) is the row-centred 2 r ⊙ g
                grad = grad - grad.mean(dim=-1, keepdim=True)
        else:
            grad = dy.to(acc) * g.to(acc)
        ds = grad.to(ctx.s_dtype).reshape(ctx.shape) if ctx.needs_input_grad[0] else None
        dt = (-grad).to(ctx.t_dtype).reshape(ctx.shape) if ctx.needs_input_grad[1] else None
        return ds, dt, None, None


class _KDLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, temperature):
        s2, t2 = _rows(s), _rows(t)
        loss, dy = _kd_kernel(s2, t2, float(temperature))
        ctx.save_for_backward(dy, s2, t2)
        ctx.shape, ctx.T = s.shape, float(temperature)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        dy, s2, t2 = ctx.saved_tensors
        acc = torch.promote_types(dy.dtype, torch.float32)
        ds = dt = None
        if ctx.needs_input_grad[0]:
            ds = (dy.to(acc) * g.to(acc)).to(s2.dtype).reshape(ctx.shape)
        if ctx.needs_input_grad[1]:
            # Teacher logits rarely need a gradient: PyTorch ops, not a kernel.
            with torch.enable_grad():
                t_leaf = t2.detach().requires_grad_()
                _, _, loss = _kd_terms(s2.detach(), t_leaf, ctx.T)
                (gt,) = torch.autograd.grad(loss, t_leaf, g.to(loss.dtype))
            dt = gt.to(t2.dtype).reshape(ctx.shape)
        return ds, dt, None


def logit_mse_loss(student_logits, teacher_logits, reduction="mean", zero_mean=False):
    """mimic_fast.functional.logit_mse_loss on the one-pass CUDA kernel (inputs already validated).

    Same value, dtype and gradients (for both arguments). Any leading dims.
    """
    return _LogitMSELoss.apply(student_logits, teacher_logits, reduction, zero_mean)


def kd_loss(student_logits, teacher_logits, temperature=4.0):
    """mimic_fast.functional.kd_loss on the two-pass CUDA kernel (inputs already validated).

    Same value, dtype and gradients; the teacher's gradient, if asked for, is computed with PyTorch
    ops in backward.
    """
    return _KDLoss.apply(student_logits, teacher_logits, temperature)


if _IMPORT_ERROR is None:
    # Shapes and dtypes only, so torch.compile(fullgraph=True) traces the ops without a graph break.
    @torch.library.register_fake("mimic_fast::cuda_mlp_fwd")
    def _mlp_fwd_fake(x, U, V, b1, W, b2, activation, chunk_h):
        return x.new_empty((x.shape[0], W.shape[0])), x.new_empty((x.shape[0], U.shape[0]))

    @torch.library.register_fake("mimic_fast::cuda_mlp_bwd")
    def _mlp_bwd_fake(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, chunk_h):
        H, C = V.shape[0], W.shape[0]
        return (x.new_empty(x.shape if need_dx else (0,)), U.new_empty(U.shape), V.new_empty(V.shape),
                V.new_empty((H if b1 is not None else 0,)), W.new_empty(W.shape),
                W.new_empty((C if has_b2 else 0,)))

    @torch.library.register_fake("mimic_fast::cuda_mimic_fwd")
    def _mimic_fwd_fake(x, U, V, b1, W, b2, teacher, activation, reduction, chunk_h):
        B, C, k = x.shape[0], W.shape[0], U.shape[0]
        loss = x.new_empty((B, C)) if reduction == REDUCTION_CODES["none"] else x.new_empty(())
        return loss, x.new_empty((B, k)), x.new_empty((B, C), dtype=torch.float32)

    @torch.library.register_fake("mimic_fast::cuda_logit_mse")
    def _logit_mse_fake(student, teacher, reduction, zero_mean):
        loss = student.new_empty(student.shape) if reduction == REDUCTION_CODES["none"] \
            else student.new_empty(())
        return loss, student.new_empty(student.shape, dtype=torch.float32)

    @torch.library.register_fake("mimic_fast::cuda_kd_loss")
    def _kd_loss_fake(student, teacher, temperature):
        return student.new_empty(()), student.new_empty(student.shape, dtype=torch.float32)

    @torch.library.register_fake("mimic_fast::cuda_bias_act")
    def _bias_act_fake(a, b, activation):
        return a.new_empty(a.shape)

    @torch.library.register_fake("mimic_fast::cuda_bias_act_bwd")
    def _bias_act_bwd_fake(a, b, dh, activation):
        return a.new_empty(a.shape), a.new_empty(a.shape)
