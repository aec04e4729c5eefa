"""The public functional API: bottleneck_mlp, mimic_loss, logit_mse_loss, kd_loss.

Each function validates once (mimic_fast._checks), picks a backend once (mimic_fast.dispatch) and
hands flattened (B, D) inputs to an autograd.Function; leading batch dims are restored on the way out.
"""
import torch

from . import dispatch
from ._checks import check_logit_pair, check_mlp, check_positive, check_reduction
from .ops.autograd import BottleneckMLPFunction, MimicLossFunction


def _autocast_on(device_type):
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def _autocast(device_type, tensors):
    # Under torch.autocast the fused op follows nn.Linear (F.linear is on autocast's lower-precision
    # list): floating tensors other than float64 are cast to the autocast dtype, float64 stays.
    if not _autocast_on(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return [t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64
            else t for t in tensors]


def _float32_loss(dtype, device_type):
    # F.mse_loss / F.kl_div return float32 under autocast: so do the losses here.
    return _autocast_on(device_type) and dtype in (torch.float16, torch.bfloat16)


def _prepare(x, U, V, b1, W, b2, activation, teacher_logits=None):
    if isinstance(x, torch.Tensor):
        x, U, V, b1, W, b2 = _autocast(x.device.type, [x, U, V, b1, W, b2])
    dims = check_mlp(x, U, V, b1, W, b2, activation, teacher_logits)
    return (x, U, V, b1, W, b2), dims


def _problem(op, dims, x, activation, teacher_logits=None):
    return dispatch.Problem(op, x.device, x.dtype, dims.B, dims.D, dims.k, dims.H, dims.C, activation,
                            None if teacher_logits is None else teacher_logits.dtype)


def bottleneck_mlp(x, U, V, b1, W, b2, activation="relu", backend="auto"):
    """y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2, without ever materialising the (B, H) hidden layer.

    x: (..., D); U: (k, D); V: (H, k); b1: (H,) or None; W: (C, H); b2: (C,) or None.
    Returns (..., C) in x's dtype. `backend`: "auto" | "reference" | "cpu" | "triton" | "cuda".
    """
    (x, U, V, b1, W, b2), dims = _prepare(x, U, V, b1, W, b2, activation)
    name = dispatch.select(backend, _problem("mlp", dims, x, activation))
    y, _ = BottleneckMLPFunction.apply(x.reshape(dims.B, dims.D), U, V, b1, W, b2, activation, name)
    return y.reshape(*dims.lead, dims.C)


def mimic_loss(x, U, V, b1, W, b2, teacher_logits, activation="relu", reduction="mean",
               backend="auto"):
    """logit_mse_loss(bottleneck_mlp(x, ...), teacher_logits) as one fused op.

    Equal to F.mse_loss(student_logits, teacher_logits, reduction=reduction); the backward recomputes
    the hidden layer and gives gradients for x, U, V, b1, W, b2 (none for teacher_logits).
    Under autocast the GEMMs run in the autocast dtype and the loss comes back float32, as
    F.mse_loss's does.
    """
    check_reduction(reduction)
    (x, U, V, b1, W, b2), dims = _prepare(x, U, V, b1, W, b2, activation, teacher_logits)
    name = dispatch.select(backend, _problem("mimic", dims, x, activation, teacher_logits))
    loss, _, dy_unit = MimicLossFunction.apply(x.reshape(dims.B, dims.D), U, V, b1, W, b2,
                                               teacher_logits.reshape(dims.B, dims.C).detach(),
                                               activation, reduction, name)
    if _float32_loss(loss.dtype, x.device.type):
        # The backends return the loss in x's (autocast) dtype; its float32 value follows from
        # dy_unit = ∂loss/∂y (float32). The correction is detached: gradients flow through `loss`.
        r = dy_unit / (2.0 / max(dy_unit.numel(), 1) if reduction == "mean" else 2.0)
        exact = {"mean": lambda: (r * r).mean(), "sum": lambda: (r * r).sum(),
                 "none": lambda: r * r}[reduction]()
        loss = loss.float() + (exact.float() - loss.float()).detach()
    return loss.reshape(*dims.lead, dims.C) if reduction == "none" else loss


def _loss(op, student_logits, teacher_logits, backend, *args):
    name = dispatch.select(backend, dispatch.loss_problem(op, student_logits, teacher_logits))
    loss = getattr(dispatch.get(name), dispatch.OP_FUNCTIONS[op])(student_logits, teacher_logits,
                                                                   *args)
    # The backends return float32 (or wider) or s's dtype; the public dtype is s's, or float32
    # under autocast as F.mse_loss / F.kl_div give.
    dtype = student_logits.dtype
    return loss.float() if _float32_loss(dtype, student_logits.device.type) else loss.to(dtype)


def logit_mse_loss(student_logits, teacher_logits, reduction="mean", zero_mean=False, backend="auto"):
    """F.mse_loss on logits (Ba & Caruana's logit regression), accumulated in float32.

    zero_mean=True first subtracts each row's mean from both sides (Hinton et al. 2015: KD at high
    temperature then equals this loss up to a constant factor). Gradients flow to both arguments,
    as with F.mse_loss; detach the teacher's logits if they must not receive one.
    `backend`: "auto" | "reference" | "cuda" (mf.info() lists which backends have the op).
    """
    check_logit_pair(student_logits, teacher_logits)
    check_reduction(reduction)
    return _loss("logit_mse", student_logits, teacher_logits, backend, reduction, zero_mean)


def kd_loss(student_logits, teacher_logits, temperature=4.0, backend="auto"):
    """Hinton knowledge distillation: KL(softmax(t/T) ‖ softmax(s/T)), batch-mean, times T².

    The T² factor keeps the gradient scale independent of T when mixed with a hard-label loss.
    Leading dims are flattened: the batch is every row of (..., C).
    `backend`: "auto" | "reference" | "cuda" (mf.info() lists which backends have the op).
    """
    check_logit_pair(student_logits, teacher_logits)
    check_positive("temperature", temperature)
    return _loss("kd", student_logits, teacher_logits, backend, temperature)
