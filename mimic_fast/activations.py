"""The hidden-layer activations every backend supports, in plain PyTorch (the reference for kernels).

Kernels pass the activation as an integer code (`ACTIVATION_CODES`), so the table here is the one
place that fixes both the names and the codes.
"""
import math

import torch

ACTIVATIONS = ("relu", "sigmoid", "tanh", "gelu")
ACTIVATION_CODES = {name: i for i, name in enumerate(ACTIVATIONS)}
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


def module_activation(module):
    """The activation name of an nn activation module, or None if it is not one we fuse."""
    import torch.nn as nn

    if isinstance(module, nn.ReLU):
        return "relu"
    if isinstance(module, nn.Sigmoid):
        return "sigmoid"
    if isinstance(module, nn.Tanh):
        return "tanh"
    if isinstance(module, nn.GELU) and module.approximate == "none":
        return "gelu"
    return None
