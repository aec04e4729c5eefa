"""Tolerances and comparison helpers shared by the tests, the GPU checks and the benchmarks.

One table (TOLERANCES), one rule for low precision (assert_within_2x: an output's error against the
float64 reference may be at most twice plain PyTorch's error in the same dtype, plus a small atol),
and one report format that names the worst element, the mismatch count and any NaN/Inf.
"""
import math

import torch
import torch.nn.functional as F

from .activations import act

# (rtol, atol) for comparing a backend's output in `dtype` against a float64 reference.
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (1e-2, 1e-3),
    torch.bfloat16: (5e-2, 1e-2),
}
# Small absolute slack added to the 2x rule, per dtype (errors of exactly-zero baselines).
ATOL_2X = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _report(name, actual, expected, bad, err, limit):
    idx = tuple(int(i) for i in torch.unravel_index(torch.argmax(err), err.shape)) if err.numel() else ()
    n_nan = int(torch.isnan(actual).sum())
    n_inf = int(torch.isinf(actual).sum())
    worst = f"worst at {idx}: actual {actual[idx].item():.6g} vs expected {expected[idx].item():.6g}" \
        if err.numel() else "empty"
    return (f"{name}: {int(bad.sum())}/{bad.numel()} elements off (limit {limit}); {worst}; "
            f"max abs err {err.max().item() if err.numel() else 0:.3g}; NaN {n_nan}, Inf {n_inf}")


def _as64(t):
    return t.detach().to("cpu", torch.float64)


def assert_close(actual, expected, name="tensor", dtype=None, rtol=None, atol=None):
    """|actual − expected| ≤ atol + rtol·|expected| everywhere, with the dtype's tolerances."""
    if actual is None or expected is None:
        if actual is not expected:
            raise AssertionError(f"{name}: one side is None ({actual is None}, {expected is None})")
        return
    if tuple(actual.shape) != tuple(expected.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    d_rtol, d_atol = TOLERANCES[dtype or actual.dtype]
    rtol = d_rtol if rtol is None else rtol
    atol = d_atol if atol is None else atol
    a, e = _as64(actual), _as64(expected)
    err = (a - e).abs()
    limit = atol + rtol * e.abs()
    bad = ~(err <= limit)  # NaN counts as bad
    if bad.any():
        raise AssertionError(_report(name, a, e, bad, torch.nan_to_num(err, nan=float("inf")),
                                     f"atol {atol} + rtol {rtol}·|expected|"))


def max_error(actual, reference):
    return (_as64(actual) - _as64(reference)).abs().max().item() if actual.numel() else 0.0


def assert_within_2x(actual, reference64, baseline, name="tensor", atol=None):
    """The 2x rule: max|actual − ref| ≤ 2·max|baseline − ref| + atol.

    `baseline` is plain PyTorch's result in the same low-precision dtype as `actual`. The default
    atol is the dtype's ATOL_2X, floored at one unit in the last place of the reference's largest
    element in `actual`'s dtype: below the dtype's resolution a result that rounds to the
    neighbouring grid point is as right as one that rounds to the nearest (a bias gradient summed
    from a few rows is one element, and plain PyTorch's draw may land on either).
    """
    if tuple(actual.shape) != tuple(reference64.shape):
        raise AssertionError(f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}")
    if atol is None:
        big = reference64.detach().abs().max().item() if reference64.numel() else 0.0
        ulp = torch.finfo(actual.dtype).eps * 2.0 ** math.floor(math.log2(big)) if big > 0 else 0.0
        atol = max(ATOL_2X[actual.dtype], ulp)
    a, e = _as64(actual), _as64(reference64)
    err = (a - e).abs()
    base_err = max_error(baseline, reference64)
    limit = 2.0 * base_err + atol
    bad = ~(err <= limit)
    if bad.any():
        raise AssertionError(_report(name, a, e, bad, torch.nan_to_num(err, nan=float("inf")),
                                     f"2 x PyTorch's {base_err:.3g} + {atol}"))


def eager_mlp(x, U, V, b1, W, b2, activation="relu"):
    """Plain unfused PyTorch in the inputs' dtype (it stores the (B, H) hidden layer): the baseline
    of the 2x rule in the tests and the "eager" provider of the benchmarks."""
    return F.linear(act(F.linear(F.linear(x, U), V, b1), activation), W, b2)
