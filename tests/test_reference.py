"""The reference backend: exact against unfused PyTorch, gradcheck, odd shapes, no (B, H) tensor."""
import pytest
import torch

import mimic_fast as mf
from mimic_fast.activations import ACTIVATIONS
from mimic_fast.ops import reference
from mimic_fast.testing import assert_close, assert_within_2x
from tests.helpers import AllocationRecorder, eager_mlp, make_mlp_inputs, to64

PARAMS = ("x", "U", "V", "b1", "W", "b2")


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, g.to(out.dtype)))
    return [None if t is None else next(grads) for t in inputs]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_mlp(activation, bias):
    inputs = make_mlp_inputs(3, 5, 2, 7, 4, dtype=torch.float64, bias=bias)
    fn = lambda *a: mf.bottleneck_mlp(*a, activation=activation, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_mimic(reduction):
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 5, 2, 7, 4, dtype=torch.float64)
    t = torch.randn(3, 4, dtype=torch.float64)
    fn = lambda *a: mf.mimic_loss(*a, t, "tanh", reduction, backend="reference")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, U, V, b1, W, b2))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(1, 7, 1, 2500, 1), (13, 5, 3, 1025, 6), (4, 9, 4, 3000, 2)])
def test_float64_matches_unfused(shape, activation):
    """H spans several chunks, including a ragged last one; every gradient is compared."""
    inputs = make_mlp_inputs(*shape, dtype=torch.float64)
    y = mf.bottleneck_mlp(*inputs, activation=activation, backend="reference")
    y_ref = eager_mlp(*inputs, activation)
    assert_close(y, y_ref, "y")
    for name, got, want in zip(PARAMS, _grads(y, inputs), _grads(y_ref, inputs)):
        assert_close(got, want, f"d{name}")


def test_three_d_and_non_contiguous():
    x, U, V, b1, W, b2 = make_mlp_inputs(6, 8, 3, 1100, 5, dtype=torch.float64, lead=(2, 3))
    Wt = W.detach().t().contiguous().t().requires_grad_()  # same values, transposed strides
    xs = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    y = mf.bottleneck_mlp(xs, U, V, b1, Wt, b2, backend="reference")
    assert y.shape == (2, 3, 5)
    assert_close(y, eager_mlp(x, U, V, b1, W, b2, "relu"), "y")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_2x_rule(dtype):
    inputs = make_mlp_inputs(16, 33, 8, 2100, 7, dtype=dtype)
    inputs64 = to64(inputs)
    y = mf.bottleneck_mlp(*inputs, activation="gelu", backend="reference")
    assert y.dtype == dtype
    y64 = eager_mlp(*inputs64, "gelu")
    y_torch = eager_mlp(*inputs, "gelu")
    assert_within_2x(y, y64, y_torch, "y")
    for name, got, want, base in zip(PARAMS, _grads(y, inputs), _grads(y64, inputs64),
                                     _grads(y_torch, inputs)):
        assert got.dtype == dtype
        assert_within_2x(got, want, base, f"d{name}")


def test_mimic_loss_equals_mse_of_forward():
    x, U, V, b1, W, b2 = make_mlp_inputs(7, 6, 3, 1500, 4, dtype=torch.float64, lead=(7,))
    t = torch.randn(7, 4, dtype=torch.float64)
    for reduction in ("mean", "sum", "none"):
        loss = mf.mimic_loss(x, U, V, b1, W, b2, t, "sigmoid", reduction, backend="reference")
        y = eager_mlp(x, U, V, b1, W, b2, "sigmoid")
        want = torch.nn.functional.mse_loss(y, t, reduction=reduction)
        assert_close(loss, want, f"loss[{reduction}]")
        inputs = (x, U, V, b1, W, b2)
        for name, got, ref in zip(PARAMS, _grads(loss, inputs), _grads(want, inputs)):
            assert_close(got, ref, f"d{name}[{reduction}]")


def test_teacher_logits_get_no_gradient_and_may_have_another_dtype():
    x, U, V, b1, W, b2 = make_mlp_inputs(4, 5, 2, 9, 3)
    t = torch.randn(4, 3, dtype=torch.float16, requires_grad=True)
    loss = mf.mimic_loss(x, U, V, b1, W, b2, t, backend="reference")
    loss.backward()
    assert t.grad is None and x.grad is not None
    want = torch.nn.functional.mse_loss(eager_mlp(x, U, V, b1, W, b2, "relu"), t.float())
    assert_close(loss, want, "loss")


def test_never_allocates_batch_by_hidden():
    """No tensor with B*H elements is created in forward or backward (H spans 3 chunks)."""
    B, D, k, H, C = 64, 7, 3, 2 * reference.CHUNK_H + 100, 5
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C)
    t = torch.randn(B, C)
    with AllocationRecorder() as rec:
        mf.mimic_loss(x, U, V, b1, W, b2, t, backend="reference").backward()
        mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="reference").sum().backward()
    numel, op = rec.largest()
    assert rec.sizes, "the recorder saw no allocation"
    assert numel < B * H, f"{op} created a tensor of {numel} >= B*H = {B * H} elements"
    assert numel >= B * reference.CHUNK_H  # it did see the hidden chunks


def test_empty_batch():
    x, U, V, b1, W, b2 = make_mlp_inputs(0, 5, 2, 9, 3)
    y = mf.bottleneck_mlp(x, U, V, b1, W, b2)
    assert y.shape == (0, 3)
    y.sum().backward()
    assert U.grad is not None and torch.all(U.grad == 0)
    t = torch.empty(0, 3)
    assert mf.mimic_loss(x, U, V, b1, W, b2, t, reduction="sum").item() == 0.0
    assert mf.mimic_loss(x, U, V, b1, W, b2, t, reduction="none").shape == (0, 3)
