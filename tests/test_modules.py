"""nn modules and convert: init, meta device, fusion and factorisation round-trips, torch.compile."""
import subprocess
import sys

import pytest
import torch
from torch import nn

import mimic_fast as mf
from mimic_fast.testing import assert_close


def test_student_parameters_and_init_bounds():
    m = mf.nn.WideShallowStudent(20, 3, 50, 4, activation="tanh", dtype=torch.float64)
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"U": (4, 20), "V": (50, 4), "b1": (50,), "W": (3, 50), "b2": (3,)}
    for name, fan_in in (("U", 20), ("V", 4), ("b1", 4), ("W", 50), ("b2", 50)):
        p = getattr(m, name)
        assert p.abs().max() <= fan_in ** -0.5 and p.std() > 0.2 * fan_in ** -0.5, name
    assert "hidden=50" in repr(m) and "activation='tanh'" in repr(m)


def test_paper_student_on_meta_device():
    m = mf.nn.WideShallowStudent(1845, 183, 400_000, 250, device="meta")
    n = sum(p.numel() for p in m.parameters())
    assert n == 1845 * 250 + 250 * 400_000 + 400_000 + 400_000 * 183 + 183
    assert m.W.device.type == "meta"


def test_student_forward_equals_linear_chain_and_mimic_loss():
    torch.manual_seed(1)
    m = mf.nn.WideShallowStudent(12, 4, 40, 3, activation="gelu", dtype=torch.float64)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    chain = nn.functional.linear(nn.functional.gelu(nn.functional.linear(
        nn.functional.linear(x, m.U), m.V, m.b1)), m.W, m.b2)
    assert_close(m(x), chain, "y")
    t = torch.randn(2, 5, 4, dtype=torch.float64)
    assert_close(m.mimic_loss(x, t), nn.functional.mse_loss(chain, t), "loss")


def test_bottleneck_linear():
    layer = mf.nn.BottleneckLinear(9, 2, 5, dtype=torch.float64)
    x = torch.randn(3, 9, dtype=torch.float64)
    assert_close(layer(x), x @ layer.U.t() @ layer.V.t() + layer.bias, "y")
    assert mf.nn.BottleneckLinear(9, 2, 5, bias=False).bias is None
    assert "bottleneck=2" in repr(layer)


def test_factorize_linear_is_truncated_svd():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20).double()
    full = mf.convert.factorize_linear(lin, 20)
    x = torch.randn(4, 30, dtype=torch.float64)
    assert_close(full(x), lin(x), "full rank reproduces the layer")
    r = 5
    low = mf.convert.factorize_linear(lin, r)
    S = torch.linalg.svdvals(lin.weight.detach())
    err = torch.linalg.matrix_norm(low.V @ low.U - lin.weight.detach(), ord=2)
    assert_close(err, S[r], "spectral error equals the (r+1)-th singular value (Eckart–Young)")
    with pytest.raises(ValueError, match=r"rank must be at most min\(out_features, in_features\) = 20"):
        mf.convert.factorize_linear(lin, 21)
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear"):
        mf.convert.factorize_linear(nn.Conv1d(2, 2, 1), 1)


@pytest.mark.parametrize("act_module, name", [(nn.ReLU(), "relu"), (nn.Sigmoid(), "sigmoid"),
                                              (nn.Tanh(), "tanh"), (nn.GELU(), "gelu")])
def test_fuse_student_nested(act_module, name):
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(10, 3, bias=False), nn.Linear(3, 25), act_module, nn.Linear(25, 4))
    class Net(nn.Module):  # a Sequential nested in a custom module, the chain nested again
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Flatten(), chain, nn.Softmax(-1))

        def forward(self, x):
            return self.body(x)

    model = Net().double()
    x = torch.randn(6, 10, dtype=torch.float64)
    before = model(x)
    w_before = chain[3].weight
    fused = mf.convert.fuse_student(model)
    assert fused is model
    student = model.body[1][0]
    assert isinstance(student, mf.nn.WideShallowStudent) and len(model.body[1]) == 1
    assert student.activation == name and student.W is w_before  # shared Parameters
    assert_close(model(x), before, "fused output")


def test_fuse_student_from_bottleneck_linear_and_no_match():
    bl = mf.nn.BottleneckLinear(8, 2, 16)
    model = nn.Sequential(bl, nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(4, 8)
    before = model(x)
    mf.convert.fuse_student(model)
    assert isinstance(model[0], mf.nn.WideShallowStudent)
    assert_close(model(x), before, "fused")
    plain = nn.Sequential(nn.Linear(8, 3), nn.ReLU(), nn.Linear(3, 2))  # first layer has a bias
    mf.convert.fuse_student(plain)
    assert isinstance(plain[0], nn.Linear)


@pytest.mark.slow
def test_compile_fullgraph_training_step_matches_eager():
    torch.manual_seed(0)
    m = mf.nn.WideShallowStudent(7, 4, 48, 3, backend="reference")
    x, t = torch.randn(5, 7), torch.randn(5, 4)
    step = torch.compile(lambda x, t: m.mimic_loss(x, t), fullgraph=True)
    loss = step(x, t)
    loss.backward()
    compiled = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    eager = m.mimic_loss(x, t)
    eager.backward()
    assert_close(loss, eager, "loss")
    for (n, _), a, b in zip(m.named_parameters(), compiled, [p.grad for p in m.parameters()]):
        assert_close(a, b, f"grad {n}")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_autocast_runs_in_low_precision(backend):
    """Inputs are cast once to the autocast dtype; backends run with autocast off, also in a
    backward called inside the autocast region."""
    m = mf.nn.WideShallowStudent(7, 4, 48, 3, backend=backend)
    x, t = torch.randn(5, 7), torch.randn(5, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        y.float().sum().backward()
        loss = m.mimic_loss(x, t)
        loss.backward()
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32  # as F.mse_loss under autocast
    assert m.W.grad.dtype == torch.float32 and torch.isfinite(m.W.grad).all()


def test_import_is_light_and_info_reports_every_backend():
    code = ("import sys, mimic_fast as mf; r = mf.info(); "
            "assert set(r['backends']) == {'reference','cpu','triton','cuda'}, r; "
            "assert r['backends']['reference']['available']; "
            "assert all(e['available'] or e['reason'] for e in r['backends'].values()), r; "
            "bad = [m for m in ('sklearn', 'matplotlib') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
