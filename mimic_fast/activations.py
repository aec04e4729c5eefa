"""The hidden-layer activations every backend supports, in plain PyTorch (the reference for kernels).

Kernels pass the activation as an integer code (`ACTIVATION_CODES`) and models build the nn module of
a name (`ACTIVATION_MODULES`, the exact-erf GELU), so the tables here are the one place that fixes
the names, the codes and the modules.
"""
import math

import torch
from torch import nn

ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu")
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
ACTIVATION_MODULES = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU}
_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def check_activation(activation):
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")
    return activation


def act(a, activation):
    """h = act(a). gelu is the exact erf form (nn.GELU(approximate='none'))."""
    if activation == "relu":
        return torch.relu(a)
    if activation == "sigmoid":
        return torch.sigmoid(a)
    if activation == "tanh":
        return torch.tanh(a)
    if activation == "gelu":
        return 0.5 * a * (1.0 + torch.erf(a * _INV_SQRT2))
    raise ValueError(f"unknown activation {activation!r}")


def act_grad(a, activation):
    """d act(a) / d a, evaluated at a (relu'(0) = 0, as autograd does)."""
    if activation == "relu":
        return (a > 0).to(a.dtype)
    if activation == "sigmoid":
        s = torch.sigmoid(a)
        return s * (1.0 - s)
    if activation == "tanh":
        t = torch.tanh(a)
        return 1.0 - t * t
    if activation == "gelu":
        cdf = 0.5 * (1.0 + torch.erf(a * _INV_SQRT2))
        pdf = torch.exp(-0.5 * a * a) * _INV_SQRT_2PI
        return cdf + a * pdf
    raise ValueError(f"unknown activation {activation!r}")
