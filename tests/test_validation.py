"""Bad input gets a clear ValueError/TypeError naming the tensor, the expected and the actual."""
import pytest
import torch

import mimic_fast as mf
from tests.helpers import make_mlp_inputs


def _inputs(**over):
    x, U, V, b1, W, b2 = make_mlp_inputs(4, 6, 3, 10, 5, requires_grad=False)
    d = dict(x=x, U=U, V=V, b1=b1, W=W, b2=b2)
    d.update(over)
    return d


def _call(**over):
    d = _inputs(**over)
    return mf.bottleneck_mlp(d["x"], d["U"], d["V"], d["b1"], d["W"], d["b2"], backend="reference")


@pytest.mark.parametrize("name, bad, pattern", [
    ("U", torch.randn(3, 7), r"x has D=6 features \(shape \(4, 6\)\) but U has shape \(3, 7\), "
                             r"which takes D=7: U must be \(k, D\) = \(3, 6\) for this x, or x "
                             r"\(\.\.\., 7\) for this U"),
    ("V", torch.randn(10, 4), r"V has shape \(10, 4\) but U implies k=3: expected \(10, 3\)"),
    ("W", torch.randn(5, 11), r"W has shape \(5, 11\) but V implies H=10: expected \(5, 10\)"),
    ("b1", torch.randn(9), r"b1 has shape \(9,\) but V implies H=10: expected \(10,\)"),
    ("b2", torch.randn(4), r"b2 has shape \(4,\) but W implies C=5: expected \(5,\)"),
    ("U", torch.randn(3, 6, 1), r"U must be 2-D, got shape \(3, 6, 1\)"),
    ("b1", torch.randn(10, 1), r"b1 must be 1-D"),
    ("x", torch.randn(()), r"x must have at least 1 dimension"),
    ("V", torch.randn(0, 3), r"H must be at least 1"),
])
def test_shape_errors(name, bad, pattern):
    with pytest.raises(ValueError, match=pattern):
        _call(**{name: bad})


@pytest.mark.parametrize("name", ["x", "U", "V", "b1", "W", "b2"])
def test_integer_dtype_is_type_error(name):
    good = _inputs()[name]
    with pytest.raises(TypeError, match=rf"{name} has dtype torch.int64; expected a floating-point"):
        _call(**{name: good.to(torch.int64)})


def test_mixed_dtypes_named():
    with pytest.raises(TypeError, match=r"share one dtype.*V torch.float64"):
        _call(V=_inputs()["V"].double())


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"W must be a torch.Tensor, got list"):
        _call(W=[[1.0]])


def test_different_devices():
    with pytest.raises(ValueError, match=r"one device.*W on meta"):
        _call(W=torch.empty(5, 10, device="meta"))


def test_unknown_activation_backend_reduction():
    d = _inputs()
    args = (d["x"], d["U"], d["V"], d["b1"], d["W"], d["b2"])
    with pytest.raises(ValueError, match=r"unknown activation 'swish'.*relu, sigmoid, tanh, gelu"):
        mf.bottleneck_mlp(*args, activation="swish")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*reference, cpu, triton, cuda"):
        mf.bottleneck_mlp(*args, backend="fast")
    with pytest.raises(ValueError, match=r"unknown reduction 'avg'"):
        mf.mimic_loss(*args, torch.randn(4, 5), reduction="avg")


def test_named_backend_that_cannot_serve_lists_reasons():
    d = _inputs()
    args = (d["x"], d["U"], d["V"], d["b1"], d["W"], d["b2"])
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot serve these inputs: .+"):
        mf.bottleneck_mlp(*args, backend="cuda")


def test_teacher_logits_shape_and_dtype():
    d = _inputs()
    args = (d["x"], d["U"], d["V"], d["b1"], d["W"], d["b2"])
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(4, 6\) but .* imply \(4, 5\)"):
        mf.mimic_loss(*args, torch.randn(4, 6))
    with pytest.raises(TypeError, match=r"teacher_logits has dtype torch.int64"):
        mf.mimic_loss(*args, torch.zeros(4, 5, dtype=torch.int64))


def test_loss_argument_errors():
    s = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"student_logits has shape \(3, 4\) but teacher_logits has "
                                         r"shape \(3, 5\)"):
        mf.logit_mse_loss(s, torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"temperature must be a positive number, got 0"):
        mf.kd_loss(s, s, temperature=0)
    with pytest.raises(TypeError, match=r"teacher_logits has dtype torch.int64"):
        mf.kd_loss(s, torch.zeros(3, 4, dtype=torch.int64))


def test_module_argument_errors():
    with pytest.raises(ValueError, match=r"hidden must be an integer >= 1, got 0"):
        mf.nn.WideShallowStudent(10, 3, 0, 2)
    with pytest.raises(ValueError, match=r"unknown activation 'elu'"):
        mf.nn.WideShallowStudent(10, 3, 8, 2, activation="elu")
    with pytest.raises(ValueError, match=r"unknown reduction"):
        mf.nn.LogitRegressionLoss(reduction="batchmean")


def test_a_transposed_u_is_named_as_such():
    """Issue 20: a (D, k) U was answered with "expected (64, 64)", the shape of neither."""
    s = mf.nn.WideShallowStudent(64, 10, hidden=32, bottleneck=16)
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match=r"U has shape \(64, 16\) but x has D=64 features: U must be "
                                         r"\(k, D\) = \(k, 64\).*looks transposed \(pass U\.t\(\), "
                                         r"of shape \(16, 64\)\)"):
        mf.bottleneck_mlp(x, s.U.t(), s.V, s.b1, s.W, s.b2)


def test_unflattened_rows_are_told_to_flatten_not_blamed_on_u():
    """Issue 20: a (B, 8, 8) batch for a 64-feature student blamed U."""
    s = mf.nn.WideShallowStudent(64, 10, hidden=32, bottleneck=16)
    with pytest.raises(ValueError, match=r"x has shape \(4, 8, 8\): its last dimension \(8\) is read as "
                                         r"the features.*flatten each row first: x\.flatten\(1\), of "
                                         r"shape \(4, 64\)") as e:
        s(torch.randn(4, 8, 8))
    assert "U must be" not in str(e.value)


def test_a_1d_x_is_one_row_as_for_nn_linear_and_says_so_when_it_does_not_fit():
    """Issue 20 ("1-D x is accepted silently"): a 1-D x is one unbatched row, nn.Linear's convention
    (design.md: x is (..., D)); it gives (C,) like nn.Linear, and a 1-D x of another length says how
    it was read."""
    s = mf.nn.WideShallowStudent(64, 10, hidden=32, bottleneck=16)
    x = torch.randn(64)
    torch.testing.assert_close(s(x), s(x[None])[0])
    with pytest.raises(ValueError, match=r"x has shape \(128,\): a 1-D x is one row \(as for "
                                         r"nn\.Linear\) of 128 features.*a batch of rows is \(B, 64\)"):
        s(torch.randn(128))


def test_is_int_is_the_one_integer_rule():
    from mimic_fast._checks import INT64_MAX, is_int
    assert is_int(0) and is_int(INT64_MAX) and is_int(5, 5, 5)
    assert not is_int(True) and not is_int(False)  # an int to Python, never a count
    assert not is_int(-1) and not is_int(INT64_MAX + 1) and not is_int(4, 5)
    assert not is_int(1.0) and not is_int("1") and not is_int(None)
