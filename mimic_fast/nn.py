"""Modules: drop-in layers for a student and its loss.

Init (documented contract): every weight and bias is drawn like nn.Linear's, U(-1/√fan_in, 1/√fan_in)
with fan_in the layer's input width (D for U, k for V and b1, H for W and b2), so a student
initialises exactly like the chain Linear(D,k,bias=False) → Linear(k,H) → act → Linear(H,C).
"""
import math

import torch
from torch import nn

from . import functional as MF
from ._checks import check_int_at_least, check_reduction
from .activations import check_activation
from .dispatch import BACKENDS


def _uniform_(tensor, fan_in):
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    with torch.no_grad():
        return tensor.uniform_(-bound, bound)


class BottleneckLinear(nn.Module):
    """y = x Uᵀ Vᵀ + b: a linear layer of rank `bottleneck` (Ba & Caruana's linear bottleneck).

    U: (bottleneck, in_features), V: (out_features, bottleneck), bias: (out_features,) or None.
    """

    def __init__(self, in_features, bottleneck, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("bottleneck", bottleneck),
                            ("out_features", out_features)):
            check_int_at_least(name, value, 1)
        self.in_features, self.bottleneck, self.out_features = in_features, bottleneck, out_features
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(bottleneck, in_features, **kw))
        self.V = nn.Parameter(torch.empty(out_features, bottleneck, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.U, self.in_features)
        _uniform_(self.V, self.bottleneck)
        if self.bias is not None:
            _uniform_(self.bias, self.bottleneck)

    def forward(self, x):
        return nn.functional.linear(nn.functional.linear(x, self.U), self.V, self.bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, bottleneck={self.bottleneck}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")


def _bias_pair(bias):
    if isinstance(bias, bool):
        return bias, bias
    if isinstance(bias, (tuple, list)) and len(bias) == 2 and all(isinstance(b, bool) for b in bias):
        return tuple(bias)
    raise TypeError(f"bias must be a bool or a pair of bools (b1, b2), got {bias!r}")


class WideShallowStudent(nn.Module):
    """The SNN-MIMIC student: x → U (linear bottleneck k) → V, b1 → act (H wide) → W, b2 → logits.

    Parameters U (k, D), V (H, k), b1 (H,), W (C, H), b2 (C,); forward runs the fused
    mf.bottleneck_mlp, so the (B, H) hidden layer is never stored. `mimic_loss(x, t)` runs the
    forward and the logit-regression loss as one fused op. `bias`: True/False for both b1 and b2,
    or a pair (b1?, b2?). mimic_fast.convert.unfuse turns it back into plain nn.Linear layers.
    """

    def __init__(self, in_features, num_classes, hidden, bottleneck, activation="relu", bias=True,
                 backend="auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("num_classes", num_classes),
                            ("hidden", hidden), ("bottleneck", bottleneck)):
            check_int_at_least(name, value, 1)
        self.in_features, self.num_classes = in_features, num_classes
        self.hidden, self.bottleneck = hidden, bottleneck
        self.activation = check_activation(activation)
        if backend != "auto" and backend not in BACKENDS:  # refused now, not at the first forward
            raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of "
                             f"{', '.join(BACKENDS)}")
        self.backend = backend
        bias1, bias2 = _bias_pair(bias)
        kw = {"device": device, "dtype": dtype}
        self.U = nn.Parameter(torch.empty(bottleneck, in_features, **kw))
        self.V = nn.Parameter(torch.empty(hidden, bottleneck, **kw))
        self.b1 = nn.Parameter(torch.empty(hidden, **kw)) if bias1 else None
        self.W = nn.Parameter(torch.empty(num_classes, hidden, **kw))
        self.b2 = nn.Parameter(torch.empty(num_classes, **kw)) if bias2 else None
        self.reset_parameters()

    def reset_parameters(self):
        _uniform_(self.U, self.in_features)
        _uniform_(self.V, self.bottleneck)
        _uniform_(self.W, self.hidden)
        if self.b1 is not None:
            _uniform_(self.b1, self.bottleneck)
        if self.b2 is not None:
            _uniform_(self.b2, self.hidden)

    def forward(self, x):
        return MF.bottleneck_mlp(x, self.U, self.V, self.b1, self.W, self.b2, self.activation,
                                 self.backend)

    def mimic_loss(self, x, teacher_logits, reduction="mean"):
        return MF.mimic_loss(x, self.U, self.V, self.b1, self.W, self.b2, teacher_logits,
                             self.activation, reduction, self.backend)

    def extra_repr(self):
        b1, b2 = self.b1 is not None, self.b2 is not None
        return (f"in_features={self.in_features}, bottleneck={self.bottleneck}, hidden={self.hidden}, "
                f"num_classes={self.num_classes}, activation={self.activation!r}, "
                f"bias={b1 if b1 == b2 else (b1, b2)}, backend={self.backend!r}")


class LogitRegressionLoss(nn.Module):
    """mean((student − teacher)²) on logits: mf.logit_mse_loss as a module."""

    def __init__(self, reduction="mean", zero_mean=False):
        super().__init__()
        self.reduction = check_reduction(reduction)
        self.zero_mean = bool(zero_mean)

    def forward(self, student_logits, teacher_logits):
        return MF.logit_mse_loss(student_logits, teacher_logits, self.reduction, self.zero_mean)

    def extra_repr(self):
        return f"reduction={self.reduction!r}, zero_mean={self.zero_mean}"
