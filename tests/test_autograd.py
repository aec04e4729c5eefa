"""Autograd corners of the fused ops: double backward, torch.func (grad, vmap), FlopCounterMode,
no dx when x needs no gradient (every backend), autocast following nn.Linear, the meta device."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.ops import flops
from helpers import eager_mlp, make_mlp_inputs
from mimic_fast.testing import assert_close

_AVAILABLE = {name for name, e in mf.info()["backends"].items() if e["available"]}
BACKENDS = ["reference"] + (["cpu"] if "cpu" in _AVAILABLE else [])  # float64-capable ones
KERNELS = [b for b in ("cpu", "triton") if b in _AVAILABLE]  # ops with registered FLOP formulas
ACTS = ["relu", "sigmoid", "tanh", "gelu"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,x_grad", [("tanh", True), ("gelu", True), ("tanh", False)])
def test_double_backward_matches_plain_pytorch(backend, activation, x_grad):
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 5, 2, 7, 4, dtype=torch.float64)
    x.requires_grad_(x_grad)  # without: the create_graph path skips dx, as autograd would drop it
    ins = (x, U, V, b1, W, b2)
    wrt = ins if x_grad else ins[1:]

    def grad_norm(f):
        g = torch.autograd.grad(f(*ins).square().sum(), wrt, create_graph=True)
        return torch.autograd.grad(sum(t.square().sum() for t in g), wrt)

    fused = grad_norm(lambda *a: mf.bottleneck_mlp(*a, activation=activation, backend=backend))
    plain = grad_norm(lambda *a: eager_mlp(*a, activation=activation))
    names = "x U V b1 W b2".split()[len(ins) - len(wrt):]
    for name, a, b in zip(names, fused, plain):
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


@pytest.mark.parametrize("x_grad", [True, False])
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_flop_counter_counts_the_fused_ops(backend, x_grad):
    B, D, k, H, C = 3, 5, 2, 7, 4
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C)
    x.requires_grad_(x_grad)
    t = torch.randn(B, C)

    def count(f, backward=True):
        with FlopCounterMode(display=False) as fc:
            out = f(x, U, V, b1, W, b2)
            if backward:
                out.sum().backward()
        return fc.get_total_flops()

    # every backend executes the same GEMMs: the eager chain's (dx = dz U only when x needs a
    # gradient, as eager) plus the backward's recompute of a = z Vᵀ. The reference's PyTorch ops
    # are counted as they run; the kernels' ops by their formula, from the need_dx they are passed.
    executed = flops.mlp_flops(B, D, k, H, C, "full", input_grad=x_grad, recompute=True)
    assert count(eager_mlp) == flops.mlp_flops(B, D, k, H, C, "full", input_grad=x_grad)
    assert count(lambda *a: mf.bottleneck_mlp(*a, backend=backend)) == executed
    assert count(lambda *a: mf.mimic_loss(*a, t, backend=backend)) == executed
    assert count(lambda *a: mf.mimic_loss(*a, t, backend=backend), backward=False) == \
        flops.mlp_flops(B, D, k, H, C, "forward")


def _tuned(backend):
    """Several chunks (a ragged last one) in the chunks loop order for the cpu backend."""
    if backend == "cpu":
        return dispatch.get("cpu").tuning(chunk_h=16, loop="chunks")
    return contextlib.nullcontext()


@pytest.mark.parametrize("op", ["mlp", "mimic"])
@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_x_without_grad_gets_none_and_the_same_other_grads(backend, op):
    """x is data for a student: no dx, and every other gradient bit for bit what it is when dx is
    computed (the same kernels run, less the dx GEMM)."""
    B, D, k, H, C = 19, 13, 17, 45, 18
    x0, *weights = make_mlp_inputs(B, D, k, H, C)
    t = torch.randn(B, C)
    f = {"mlp": lambda *a: mf.bottleneck_mlp(*a, activation="tanh", backend=backend),
         "mimic": lambda *a: mf.mimic_loss(*a, t, activation="tanh", backend=backend)}[op]

    def run(x_grad):
        x = x0.detach().clone().requires_grad_(x_grad)
        for w in weights:
            w.grad = None
        with _tuned(backend):
            out = f(x, *weights)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(7)))
        return x.grad, [w.grad for w in weights]

    dx, grads = run(True)
    no_dx, grads_without = run(False)
    assert dx is not None and dx.shape == x0.shape and no_dx is None
    for name, a, b in zip(("U", "V", "b1", "W", "b2"), grads, grads_without):
        assert torch.equal(a, b), f"d{name} changed when dx was skipped"


@pytest.mark.parametrize("backend", ["reference"] + KERNELS)
def test_backend_mlp_bwd_returns_no_dx_when_not_needed(backend):
    """The backend interface itself (autograd would drop a dx returned for x without grad)."""
    x, U, V, b1, W, b2 = (t.detach() for t in make_mlp_inputs(19, 13, 17, 45, 18))
    ops = dispatch.get(backend)
    with _tuned(backend):
        y, z = ops.mlp_fwd(x, U, V, b1, W, b2, "gelu")
        dy = torch.randn_like(y)
        with_dx = ops.mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, True)
        without = ops.mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, False)
    assert with_dx[0].shape == x.shape and without[0] is None
    for name, a, b in zip(("dU", "dV", "db1", "dW", "db2"), with_dx[1:], without[1:]):
        assert torch.equal(a, b), name


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
