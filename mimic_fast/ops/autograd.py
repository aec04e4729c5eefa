"""autograd.Functions that wire each backend's forward and backward ops (one pair per fused op).

The backend is passed by name (a string constant), so torch.compile traces straight through.
Backward recomputes the hidden layer inside the backend; only z = x Uᵀ (B, k) and, for the loss,
dy_unit (B, C) are saved.
"""
import torch

from .. import dispatch


def _no_autocast(t):
    # functional.py already cast the inputs to the autocast dtype; autocast must not re-cast the
    # GEMMs inside a backend (their outputs would no longer match the buffers they write into).
    return torch.autocast(device_type=t.device.type, enabled=False)


def _empty_batch_backend(x, backend):
    # Kernels need not handle B = 0; the reference produces the right empty/NaN results.
    return "reference" if x.shape[0] == 0 else backend


class BottleneckMLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, V, b1, W, b2, activation, backend):
        backend = _empty_batch_backend(x, backend)
        with _no_autocast(x):
            y, z = dispatch.get(backend).mlp_fwd(x, U, V, b1, W, b2, activation)
        ctx.save_for_backward(x, z, U, V, b1, W)
        ctx.activation, ctx.backend, ctx.has_b2 = activation, backend, b2 is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, z, U, V, b1, W = ctx.saved_tensors
        with _no_autocast(x):
            grads = dispatch.get(ctx.backend).mlp_bwd(dy.contiguous(), x, z, U, V, b1, W,
                                                      ctx.activation, ctx.has_b2)
        return (*grads, None, None)


class MimicLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, U, V, b1, W, b2, teacher_logits, activation, reduction, backend):
        backend = _empty_batch_backend(x, backend)
        with _no_autocast(x):
            loss, z, dy_unit = dispatch.get(backend).mimic_fwd(x, U, V, b1, W, b2, teacher_logits,
                                                               activation, reduction)
        ctx.save_for_backward(x, z, U, V, b1, W, dy_unit)
        ctx.activation, ctx.backend, ctx.has_b2 = activation, backend, b2 is not None
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        x, z, U, V, b1, W, dy_unit = ctx.saved_tensors
        dy = dy_unit * grad_loss.to(dy_unit.dtype)
        with _no_autocast(x):
            grads = dispatch.get(ctx.backend).mlp_bwd(dy.contiguous(), x, z, U, V, b1, W,
                                                      ctx.activation, ctx.has_b2)
        return (*grads, None, None, None, None)
