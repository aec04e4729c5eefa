"""Validation of user inputs: the one place each op's arguments are checked.

Every check raises TypeError (wrong kind or dtype) or ValueError (wrong shape, device, option) with
the tensor's name, what was expected and what was given. Nothing here touches tensor data, so it is
cheap and traceable by torch.compile.
"""
from typing import NamedTuple, Tuple

import torch

from .activations import check_activation

REDUCTIONS = ("mean", "sum", "none")
REDUCTION_CODES = {name: i for i, name in enumerate(REDUCTIONS)}  # the C++/CUDA ops' integer codes


class MLPDims(NamedTuple):
    """Sizes of one bottleneck-MLP call; x is (*lead, D) and flattens to (B, D)."""

    lead: Tuple[int, ...]
    B: int
    D: int
    k: int
    H: int
    C: int


def _shape(t):
    return "(" + ", ".join(str(s) for s in t.shape) + (",)" if t.dim() == 1 else ")")


def check_tensor(name, t, ndim=None, allow_none=False):
    if t is None and allow_none:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} has dtype {t.dtype}; expected a floating-point dtype")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {_shape(t)}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}: expected one of {', '.join(REDUCTIONS)}")
    return reduction


def check_same_device(named):
    devices = {name: t.device for name, t in named if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def check_mlp(x, U, V, b1, W, b2, activation, teacher_logits=None) -> MLPDims:
    """Check the inputs of bottleneck_mlp / mimic_loss and return their sizes."""
    check_activation(activation)
    check_tensor("x", x)
    if x.dim() < 1:
        raise ValueError("x must have at least 1 dimension (..., D), got a 0-d tensor")
    check_tensor("U", U, 2)
    check_tensor("V", V, 2)
    check_tensor("W", W, 2)
    check_tensor("b1", b1, 1, allow_none=True)
    check_tensor("b2", b2, 1, allow_none=True)
    params = [("x", x), ("U", U), ("V", V), ("b1", b1), ("W", W), ("b2", b2)]
    dtypes = {n: t.dtype for n, t in params if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"x, U, V, b1, W, b2 must share one dtype, got {listing}")
    named = params
    if teacher_logits is not None:
        check_tensor("teacher_logits", teacher_logits)
        named = params + [("teacher_logits", teacher_logits)]
    check_same_device(named)

    D = x.shape[-1]
    k, H, C = U.shape[0], V.shape[0], W.shape[0]
    for name, size in (("D", D), ("k", k), ("H", H), ("C", C)):
        if size == 0:
            raise ValueError(f"{name} must be at least 1, got 0 (shapes x {_shape(x)}, U {_shape(U)}, "
                             f"V {_shape(V)}, W {_shape(W)})")
    if U.shape[1] != D:
        raise ValueError(_features_mismatch(x, U))
    if V.shape[1] != k:
        raise ValueError(f"V has shape {_shape(V)} but U implies k={k}: expected ({H}, {k})")
    if W.shape[1] != H:
        raise ValueError(f"W has shape {_shape(W)} but V implies H={H}: expected ({C}, {H})")
    if b1 is not None and b1.shape[0] != H:
        raise ValueError(f"b1 has shape {_shape(b1)} but V implies H={H}: expected ({H},)")
    if b2 is not None and b2.shape[0] != C:
        raise ValueError(f"b2 has shape {_shape(b2)} but W implies C={C}: expected ({C},)")
    lead = tuple(x.shape[:-1])
    B = 1
    for s in lead:
        B *= s
    if teacher_logits is not None:
        expected = lead + (C,)
        if tuple(teacher_logits.shape) != expected:
            raise ValueError(f"teacher_logits has shape {_shape(teacher_logits)} but x {_shape(x)} and "
                             f"W {_shape(W)} imply {expected}")
    return MLPDims(lead, B, D, k, H, C)


def _features_mismatch(x, U):
    """Why x's last dimension does not fit U (k, D): U transposed, rows not flattened, or x of
    other data."""
    k, D_u = U.shape
    D = x.shape[-1]
    if k == D:
        return (f"U has shape {_shape(U)} but x has D={D} features: U must be (k, D) = (k, {D}), "
                f"nn.Linear's (out_features, in_features) layout; this U looks transposed (pass "
                f"U.t(), of shape ({D_u}, {k}))")
    rows = 1
    for s in x.shape[1:]:
        rows *= s
    if x.dim() > 2 and rows == D_u:
        return (f"x has shape {_shape(x)}: its last dimension ({D}) is read as the features and the "
                f"others as batch dimensions, but U {_shape(U)} takes D={D_u} features; flatten "
                f"each row first: x.flatten(1), of shape ({x.shape[0]}, {D_u})")
    if x.dim() == 1:
        return (f"x has shape {_shape(x)}: a 1-D x is one row (as for nn.Linear) of {D} features, "
                f"but U {_shape(U)} takes D={D_u}; a batch of rows is (B, {D_u})")
    return (f"x has D={D} features (shape {_shape(x)}) but U has shape {_shape(U)}, which takes "
            f"D={D_u}: U must be (k, D) = ({k}, {D}) for this x, or x (..., {D_u}) for this U")


def check_logit_pair(student_logits, teacher_logits):
    check_tensor("student_logits", student_logits)
    check_tensor("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits has shape {_shape(student_logits)} but teacher_logits has "
                         f"shape {_shape(teacher_logits)}: expected equal shapes")
    if student_logits.dim() < 1:
        raise ValueError("logits must have at least 1 dimension (..., C), got 0-d tensors")
    check_same_device([("student_logits", student_logits), ("teacher_logits", teacher_logits)])


def check_positive(name, value):
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value!r}")
    return value


INT64_MAX = 2**63 - 1  # numpy's shapes and offsets, torch's sizes


def is_int(value, low=0, high=INT64_MAX):
    """An int (bool excluded: True is an int to Python, never a count to us) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_int_at_least(name, value, low):
    if not is_int(value, low):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value
