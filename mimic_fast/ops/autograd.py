"""autograd.Functions that wire each backend's forward and backward ops (one pair per fused op).

The backend is passed by name (a string constant), so torch.compile traces straight through.
Backward recomputes the hidden layer inside the backend; only z = x Uᵀ (B, k) and, for the loss,
dy_unit (B, C) are saved (as extra, non-differentiable outputs: setup_context style, so
torch.func.grad/vmap/jacrev apply).

Higher-order gradients (create_graph=True, and torch.func.grad, which always builds a graph) run
the backward as out-of-place PyTorch ops recomputing z, a (and, for the loss, y) from the inputs:
exact to any order and transformable by vmap, at the cost of a (B, H) hidden layer in the graph
(which any graph of the gradients holds). First-order backward() keeps the fused backend kernels.
vmap: when only x (and the teacher logits) are batched, the vmap dimension is folded into the
batch dimension (one fused call); batched weights (an ensemble of students) run one call each.
"""
import contextlib

import torch

from .. import dispatch
from . import flops  # noqa: F401  (registers FlopCounterMode formulas for the backends' ops)
from ..activations import act, act_grad
from .reference import compute_dtype


def _no_autocast(t):
    # functional.py already cast the inputs to the autocast dtype; autocast must not re-cast the
    # GEMMs inside a backend (their outputs would no longer match the buffers they write into).
    if not torch.amp.is_autocast_available(t.device.type):  # e.g. meta: nothing to switch off
        return contextlib.nullcontext()
    return torch.autocast(device_type=t.device.type, enabled=False)


def _empty_batch_backend(x, backend):
    # Kernels need not handle B = 0; the reference produces the right empty/NaN results.
    return "reference" if x.shape[0] == 0 else backend


def _hidden(x, U, V, b1, activation):
    """(z, a, h) of the unfused formula, out of place (so autograd and vmap both apply)."""
    cd = compute_dtype(x.dtype)
    z = x.to(cd) @ U.to(cd).t()
    a = z @ V.to(cd).t() + (0 if b1 is None else b1.to(cd))
    return z, a, act(a, activation)


def _differentiable_grads(dy, x, U, V, b1, W, activation, has_b2, need_dx, hidden=None):
    """(dx, dU, dV, db1, dW, db2) as differentiable functions of every input and of dy: the
    create_graph path. It holds the (B, H) hidden layer, as a graph of the gradients must. dx is
    None when x needs no gradient (autograd would drop it)."""
    z, a, h = hidden or _hidden(x, U, V, b1, activation)
    cd = z.dtype
    dy = dy.to(cd)
    da = (dy @ W.to(cd)) * act_grad(a, activation)
    dz = da @ V.to(cd)
    grads = (dz @ U.to(cd) if need_dx else None, dz.t() @ x.to(cd), da.t() @ z, da.sum(0) if b1 is not None else None,
             dy.t() @ h, dy.sum(0) if has_b2 else None)
    return tuple(None if g is None else g.to(x.dtype) for g in grads)


def _differentiable_dy_unit(x, U, V, b1, W, b2, t, activation, reduction):
    """∂loss/∂y for a unit upstream gradient, as a function of the inputs (as mimic_fwd's)."""
    hidden = _hidden(x, U, V, b1, activation)
    y = hidden[2] @ W.to(hidden[2].dtype).t() + (0 if b2 is None else b2.to(hidden[2].dtype))
    r = y - t.to(y.dtype)
    return r * (2.0 / max(r.numel(), 1) if reduction == "mean" else 2.0), hidden


def _select(t, dim, i):
    return t if dim is None or t is None else t.select(dim, i)


def _by_member(fn, info, in_dims, args):
    """vmap over batched weights: one call per member, outputs stacked along dim 0."""
    outs = [fn(*(_select(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
    return tuple(torch.stack(o) for o in zip(*outs))


class BottleneckMLPFunction(torch.autograd.Function):
    """(y, z) = fused forward; z = x Uᵀ is returned only to be saved (non-differentiable)."""

    @staticmethod
    def forward(x, U, V, b1, W, b2, activation, backend):
        with _no_autocast(x):
            return dispatch.get(_empty_batch_backend(x, backend)).mlp_fwd(x, U, V, b1, W, b2,
                                                                          activation)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, U, V, b1, W, b2, activation, backend = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(x, output[1], U, V, b1, W)
        ctx.activation, ctx.has_b2 = activation, b2 is not None
        ctx.backend = _empty_batch_backend(x, backend)

    @staticmethod
    def backward(ctx, dy, _dz):
        x, z, U, V, b1, W = ctx.saved_tensors
        need_dx = ctx.needs_input_grad[0]  # x is data for a student: no dx GEMM, no (B, D) tensor
        if torch.is_grad_enabled():
            grads = _differentiable_grads(dy, x, U, V, b1, W, ctx.activation, ctx.has_b2, need_dx)
        else:
            with _no_autocast(x):
                grads = dispatch.get(ctx.backend).mlp_bwd(dy.contiguous(), x, z, U, V, b1, W,
                                                          ctx.activation, ctx.has_b2, need_dx)
        return (*grads, None, None)

    @staticmethod
    def vmap(info, in_dims, x, U, V, b1, W, b2, activation, backend):
        apply = BottleneckMLPFunction.apply
        if all(d is None for d in in_dims[1:6]):  # only x batched: one call on (N·B, D)
            xb = x.movedim(in_dims[0], 0)
            N, B = xb.shape[:2]
            y, z = apply(xb.reshape(N * B, xb.shape[-1]), U, V, b1, W, b2, activation, backend)
            return (y.reshape(N, B, -1), z.reshape(N, B, -1)), (0, 0)
        out = _by_member(lambda *a: apply(*a, activation, backend), info, in_dims[:6],
                         (x, U, V, b1, W, b2))
        return out, (0, 0)


class MimicLossFunction(torch.autograd.Function):
    """(loss, z, dy_unit) = fused forward + loss; z and dy_unit only travel to backward."""

    @staticmethod
    def forward(x, U, V, b1, W, b2, teacher_logits, activation, reduction, backend):
        with _no_autocast(x):
            return dispatch.get(_empty_batch_backend(x, backend)).mimic_fwd(
                x, U, V, b1, W, b2, teacher_logits, activation, reduction)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, U, V, b1, W, b2, t, activation, reduction, backend = inputs
        _, z, dy_unit = output
        ctx.mark_non_differentiable(z, dy_unit)
        ctx.save_for_backward(x, z, U, V, b1, W, b2, t, dy_unit)
        ctx.activation, ctx.reduction = activation, reduction
        ctx.backend = _empty_batch_backend(x, backend)

    @staticmethod
    def backward(ctx, grad_loss, _dz, _ddy):
        x, z, U, V, b1, W, b2, t, dy_unit = ctx.saved_tensors
        has_b2, need_dx = b2 is not None, ctx.needs_input_grad[0]
        if torch.is_grad_enabled():  # recompute dy_unit from the inputs so it is differentiable
            dy_unit, hidden = _differentiable_dy_unit(x, U, V, b1, W, b2, t, ctx.activation,
                                                      ctx.reduction)
            dy = dy_unit * grad_loss.to(dy_unit.dtype)
            grads = _differentiable_grads(dy, x, U, V, b1, W, ctx.activation, has_b2, need_dx,
                                          hidden)
        else:
            dy = dy_unit * grad_loss.to(dy_unit.dtype)
            with _no_autocast(x):
                grads = dispatch.get(ctx.backend).mlp_bwd(dy.contiguous(), x, z, U, V, b1, W,
                                                          ctx.activation, has_b2, need_dx)
        return (*grads, None, None, None, None)

    @staticmethod
    def vmap(info, in_dims, x, U, V, b1, W, b2, t, activation, reduction, backend):
        apply = MimicLossFunction.apply
        if all(d is None for d in in_dims[1:6]):  # weights shared: one call on (N·B, D)
            N = info.batch_size
            xb = x.movedim(in_dims[0], 0) if in_dims[0] is not None else x.expand(N, *x.shape)
            tb = t.movedim(in_dims[6], 0) if in_dims[6] is not None else t.expand(N, *t.shape)
            B = xb.shape[1]
            loss, z, dy = apply(xb.reshape(N * B, xb.shape[-1]), U, V, b1, W, b2,
                                tb.reshape(N * B, tb.shape[-1]), activation, "none", backend)
            loss = loss.reshape(N, B, -1)
            if reduction == "mean":
                loss = loss.mean(dim=(1, 2))
            elif reduction == "sum":
                loss = loss.sum(dim=(1, 2))
            return (loss, z.reshape(N, B, -1), dy.reshape(N, B, -1)), (0, 0, 0)
        out = _by_member(lambda *a: apply(*a, activation, reduction, backend), info, in_dims[:7],
                         (x, U, V, b1, W, b2, t))
        return out, (0, 0, 0)
