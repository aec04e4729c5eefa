"""Turn trained layers into mimic_fast's: low-rank factorisation and fusion of student chains."""
import torch
from torch import nn

from ._checks import check_int_at_least
from .activations import module_activation
from .nn import BottleneckLinear, WideShallowStudent


def factorize_linear(linear, rank):
    """The best rank-`rank` BottleneckLinear approximation (truncated SVD) of a trained nn.Linear.

    With weight = P Σ Qᵀ, U = √Σ_r Q_rᵀ and V = P_r √Σ_r, so ‖weight − V U‖ is minimal
    (Eckart–Young); the bias is copied. Computed in float64, stored in the layer's dtype and device.
    """
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
    out_features, in_features = linear.weight.shape
    check_int_at_least("rank", rank, 1)
    if rank > min(out_features, in_features):
        raise ValueError(f"rank must be at most min(out_features, in_features) = "
                         f"{min(out_features, in_features)} for a Linear({in_features}, "
                         f"{out_features}), got {rank}")
    w = linear.weight.detach()
    P, S, Qh = torch.linalg.svd(w.to(torch.float64), full_matrices=False)
    root = S[:rank].sqrt()
    layer = BottleneckLinear(in_features, rank, out_features, bias=linear.bias is not None,
                             device=w.device, dtype=w.dtype)
    with torch.no_grad():
        layer.U.copy_(root[:, None] * Qh[:rank])
        layer.V.copy_(P[:, :rank] * root[None, :])
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


def _match(modules, i):
    """A WideShallowStudent for the chain starting at modules[i], or None."""
    first = modules[i]
    if isinstance(first, BottleneckLinear):
        U, V, b1, rest = first.U, first.V, first.bias, modules[i + 1:i + 3]
    elif (isinstance(first, nn.Linear) and first.bias is None and i + 1 < len(modules)
          and isinstance(modules[i + 1], nn.Linear)
          and modules[i + 1].in_features == first.out_features):
        U, V, b1, rest = first.weight, modules[i + 1].weight, modules[i + 1].bias, modules[i + 2:i + 4]
    else:
        return None
    if len(rest) != 2:
        return None
    activation, last = module_activation(rest[0]), rest[1]
    if activation is None or not isinstance(last, nn.Linear) or last.in_features != V.shape[0]:
        return None
    if (b1 is None) != (last.bias is None):
        return None  # the fused student has both biases or neither
    student = WideShallowStudent(U.shape[1], last.out_features, V.shape[0], U.shape[0], activation,
                                 bias=b1 is not None, device="meta")
    # Share the trained Parameters themselves, so optimizers holding them keep working.
    student.U, student.V, student.W = U, V, last.weight
    if b1 is not None:
        student.b1, student.b2 = b1, last.bias
    length = 3 if isinstance(first, BottleneckLinear) else 4
    return student, length


def fuse_student(model):
    """Replace Linear(no bias) → Linear → act → Linear chains (or BottleneckLinear → act → Linear)
    inside nn.Sequential containers, at any depth, by a WideShallowStudent holding the same
    Parameters. Outputs are unchanged; `model` is modified in place (Sequentials are renumbered)
    and returned.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    for child in model.children():
        fuse_student(child)
    if not isinstance(model, nn.Sequential):
        return model
    modules, out, i, changed = list(model), [], 0, False
    while i < len(modules):
        found = _match(modules, i)
        if found is None:
            out.append(modules[i])
            i += 1
        else:
            out.append(found[0])
            i += found[1]
            changed = True
    if changed:
        model._modules.clear()
        for index, module in enumerate(out):
            model.add_module(str(index), module)
    return model
