"""Autograd corners of the fused ops: double backward, torch.func (grad, vmap), FlopCounterMode,
autocast following nn.Linear, the meta device."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mimic_fast as mf
from mimic_fast.ops import flops
from helpers import eager_mlp, make_mlp_inputs
from mimic_fast.testing import assert_close

_AVAILABLE = {name for name, e in mf.info()["backends"].items() if e["available"]}
BACKENDS = ["reference"] + (["cpu"] if "cpu" in _AVAILABLE else [])  # float64-capable ones
KERNELS = [b for b in ("cpu", "triton") if b in _AVAILABLE]  # ops with registered FLOP formulas
ACTS = ["relu", "sigmoid", "tanh", "gelu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["tanh", "gelu"])
def test_double_backward_matches_plain_pytorch(backend, activation):
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 5, 2, 7, 4, dtype=torch.float64)
    ins = (x, U, V, b1, W, b2)

    def grad_norm(f):
        g = torch.autograd.grad(f(*ins).square().sum(), ins, create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), ins)

    fused = grad_norm(lambda *a: mf.bottleneck_mlp(*a, activation=activation, backend=backend))
    plain = grad_norm(lambda *a: eager_mlp(*a, activation=activation))
    for name, a, b in zip("x U V b1 W b2".split(), fused, plain):
        assert_close(a, b, f"second-order d{name}")
    assert torch.autograd.gradgradcheck(
        lambda *a: mf.bottleneck_mlp(*a, activation=activation, backend=backend), ins)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mimic_loss_gradgradcheck(backend, reduction):
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 4, 2, 6, 3, dtype=torch.float64, bias=False)
    t = torch.randn(3, 3, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda x, U, V, W: mf.mimic_loss(x, U, V, None, W, None, t, activation="sigmoid",
                                         reduction=reduction, backend=backend), (x, U, V, W))


@pytest.mark.parametrize("backend", BACKENDS)
def test_func_grad_and_vmap(backend):
    x, U, V, b1, W, b2 = make_mlp_inputs(4, 5, 2, 9, 3, dtype=torch.float64)
    t = torch.randn(4, 3, dtype=torch.float64)
    loss = lambda U, V: mf.mimic_loss(x, U, V, b1, W, b2, t, backend=backend)  # noqa: E731
    gU, gV = torch.func.grad(loss, argnums=(0, 1))(U, V)
    eU, eV = torch.autograd.grad(F.mse_loss(eager_mlp(x, U, V, b1, W, b2), t), (U, V))
    assert_close(gU, eU, "func.grad dU")
    assert_close(gV, eV, "func.grad dV")

    xs = torch.randn(6, 4, 5, dtype=torch.float64)  # vmap over x: folded into one call
    ys = torch.func.vmap(lambda xi: mf.bottleneck_mlp(xi, U, V, b1, W, b2, backend=backend))(xs)
    assert_close(ys, eager_mlp(xs, U, V, b1, W, b2), "vmap over x")
    Us = torch.randn(3, *U.shape, dtype=torch.float64)  # vmap over weights: one call per member
    ys = torch.func.vmap(lambda Ui: mf.bottleneck_mlp(x, Ui, V, b1, W, b2, backend=backend))(Us)
    assert_close(ys, torch.stack([eager_mlp(x, Ui, V, b1, W, b2) for Ui in Us]), "vmap over U")

    # per-sample gradients: vmap(grad) with a mean loss per sample
    per = torch.func.vmap(torch.func.grad(
        lambda U, xi, ti: mf.mimic_loss(xi[None], U, V, b1, W, b2, ti[None], backend=backend)),
        in_dims=(None, 0, 0))(U.detach(), x.detach(), t)
    for i in range(4):
        e, = torch.autograd.grad(F.mse_loss(eager_mlp(x[i:i + 1], U, V, b1, W, b2), t[i:i + 1]), U)
        assert_close(per[i], e, f"per-sample dU[{i}]")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_vmap_mimic_loss_keeps_each_reduction(reduction):
    x, U, V, b1, W, b2 = make_mlp_inputs(4, 5, 2, 9, 3, dtype=torch.float64)
    xs, ts = torch.randn(3, 4, 5, dtype=torch.float64), torch.randn(3, 4, 3, dtype=torch.float64)
    out = torch.func.vmap(lambda xi, ti: mf.mimic_loss(xi, U, V, b1, W, b2, ti,
                                                       reduction=reduction))(xs, ts)
    want = torch.stack([F.mse_loss(eager_mlp(xi, U, V, b1, W, b2), ti, reduction=reduction)
                        for xi, ti in zip(xs, ts)])
    assert_close(out, want, f"vmap mimic_loss {reduction}")


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_flop_counter_counts_the_fused_ops(backend):
    B, D, k, H, C = 3, 5, 2, 7, 4
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C)

    def count(f):
        with FlopCounterMode(display=False) as fc:
            f(x, U, V, b1, W, b2).sum().backward()
        return fc.get_total_flops()

    # every backend executes the same GEMMs: the eager chain's (x needs a gradient here) plus the
    # backward's recompute of a = z Vᵀ
    executed = flops.mlp_flops(B, D, k, H, C, "full", input_grad=True, recompute=True)
    assert count(eager_mlp) == flops.mlp_flops(B, D, k, H, C, "full", input_grad=True)
    assert count(lambda *a: mf.bottleneck_mlp(*a, backend=backend)) == executed
    with FlopCounterMode(display=False) as fc:
        mf.mimic_loss(x, U, V, b1, W, b2, torch.randn(B, C), backend=backend)
    assert fc.get_total_flops() == flops.mlp_flops(B, D, k, H, C, "forward")


def test_autocast_follows_nn_linear():
    student = mf.nn.WideShallowStudent(5, 4, 16, 3, dtype=torch.float64)
    lin = torch.nn.Linear(5, 4, dtype=torch.float64)
    x64 = torch.randn(6, 5, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lin(x64).dtype == torch.float64  # nn.Linear leaves float64 alone ...
        assert student(x64).dtype == torch.float64  # ... and so does the student
    s32 = mf.nn.WideShallowStudent(5, 4, 16, 3)
    x, t = torch.randn(6, 5), torch.randn(6, 4)
    for reduction in ("mean", "sum", "none"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = s32(x)
            loss = s32.mimic_loss(x, t, reduction)
            mse = mf.logit_mse_loss(y, t, reduction)
            assert y.dtype == torch.bfloat16
            assert loss.dtype == torch.float32 == F.mse_loss(y, t).dtype == mse.dtype
            assert mf.kd_loss(y, t).dtype == torch.float32
        # the float32 loss of bf16 operands (fp32 accumulation), not a bf16 rounding of it
        ins = [x] + [getattr(s32, n) for n in ("U", "V", "b1", "W", "b2")]
        exact = F.mse_loss(eager_mlp(*[p.detach().bfloat16().float() for p in ins]), t,
                           reduction=reduction)
        assert_close(loss, exact, "autocast loss", rtol=1e-5, atol=1e-6)
        assert_close(mse, F.mse_loss(y.float(), t, reduction=reduction), "autocast logit_mse_loss",
                     rtol=1e-6, atol=1e-7)
    s32.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s32.mimic_loss(x, t).backward()
    assert s32.W.grad.dtype == torch.float32 and torch.isfinite(s32.W.grad).all()


def test_meta_device_forward_and_loss():
    student = mf.nn.WideShallowStudent(1845, 183, 400_000, 250, device="meta")
    x = torch.empty(64, 1845, device="meta")
    assert student(x).shape == (64, 183) and student(x).device.type == "meta"
    loss = student.mimic_loss(x, torch.empty(64, 183, device="meta"))
    assert loss.shape == () and loss.device.type == "meta"
