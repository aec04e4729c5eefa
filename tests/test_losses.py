"""logit_mse_loss and kd_loss against their definitions."""
import pytest
import torch
import torch.nn.functional as F

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.testing import assert_close, assert_within_2x


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_mse_equals_mse_loss_values_and_grads(reduction):
    s = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 5, 7, dtype=torch.float64, requires_grad=True)
    ours = mf.logit_mse_loss(s, t, reduction)
    want = F.mse_loss(s, t, reduction=reduction)
    assert_close(ours, want, "loss")
    g = torch.randn_like(want)
    for name, a, b in zip("st", torch.autograd.grad(ours, (s, t), g), torch.autograd.grad(want, (s, t), g)):
        assert_close(a, b, f"d{name}")


def test_zero_mean_subtracts_row_means():
    s = torch.randn(4, 6, dtype=torch.float64)
    t = torch.randn(4, 6, dtype=torch.float64)
    ours = mf.logit_mse_loss(s + 3.0, t - 2.0, zero_mean=True)
    want = F.mse_loss(s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True))
    assert_close(ours, want, "loss")
    assert ours.item() < mf.logit_mse_loss(s + 3.0, t - 2.0).item()
    assert torch.autograd.gradcheck(lambda a: mf.logit_mse_loss(a, t, zero_mean=True),
                                    (s.clone().requires_grad_(),))


def test_logit_mse_bf16_2x_rule_and_fp16_teacher():
    s = torch.randn(64, 183) * 4
    t = torch.randn(64, 183) * 4
    ref = F.mse_loss(s.double(), t.double())
    ours = mf.logit_mse_loss(s.bfloat16(), t.half())
    assert ours.dtype == torch.bfloat16
    assert_within_2x(ours, ref, F.mse_loss(s.bfloat16(), t.bfloat16()), "loss")


def test_kd_loss_matches_definition_and_scales_with_t2():
    s = torch.randn(3, 4, 10, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, 10, dtype=torch.float64)
    T = 3.0
    p = torch.softmax(t / T, -1)
    want = (p * (torch.log(p) - torch.log_softmax(s / T, -1))).sum(-1).mean() * T * T
    assert_close(mf.kd_loss(s, t, T), want, "kd")
    assert torch.autograd.gradcheck(lambda a: mf.kd_loss(a, t, T), (s,))
    assert mf.kd_loss(t, t, T).abs().item() < 1e-12


def test_high_temperature_kd_approaches_zero_mean_logit_mse():
    """Hinton 2015: with zero-mean logits, KD·T² → (1/(2C))·Σ(s−t)² per row as T grows."""
    s = torch.randn(8, 5, dtype=torch.float64)
    t = torch.randn(8, 5, dtype=torch.float64)
    s, t = s - s.mean(1, keepdim=True), t - t.mean(1, keepdim=True)
    C = s.shape[1]
    limit = mf.logit_mse_loss(s, t, zero_mean=True) * C / (2 * C)
    kd = mf.kd_loss(s, t, temperature=1000.0)
    assert_close(kd, limit, "kd at T=1000", rtol=1e-3, atol=1e-9)


def test_loss_module():
    m = mf.nn.LogitRegressionLoss(reduction="sum", zero_mean=True)
    s, t = torch.randn(3, 4), torch.randn(3, 4)
    assert_close(m(s, t), mf.logit_mse_loss(s, t, "sum", True), "module")
    assert "reduction='sum', zero_mean=True" in repr(m)


# ---- dispatch: backend=, reasons, mf.info() -------------------------------------------------------

LOSSES = {"logit_mse_loss": lambda s, t, **kw: mf.logit_mse_loss(s, t, "sum", True, **kw),
          "kd_loss": lambda s, t, **kw: mf.kd_loss(s, t, 2.0, **kw)}


@pytest.mark.parametrize("op", LOSSES)
def test_losses_go_through_dispatch(op):
    s = torch.randn(5, 9, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 9, dtype=torch.float64)
    ours = LOSSES[op](s, t)
    named = LOSSES[op](s, t, backend="reference")
    assert_close(ours, named, op)
    problem = dispatch.loss_problem("logit_mse" if op == "logit_mse_loss" else "kd", s, t)
    assert (problem.B, problem.C, problem.dtype) == (5, 9, torch.float64)
    assert dispatch.select("auto", problem) == "reference"  # no CPU backend has loss kernels
    # A backend without the op is refused with the reason, never silently replaced.
    with pytest.raises(ValueError, match=rf"backend 'cpu' cannot serve these inputs: .*no {op} op"):
        LOSSES[op](s, t, backend="cpu")
    with pytest.raises(ValueError, match=r"backend 'cuda' cannot serve these inputs: .+"):
        LOSSES[op](s, t, backend="cuda")
    with pytest.raises(ValueError, match=r"unknown backend 'fast'"):
        LOSSES[op](s, t, backend="fast")


def test_cuda_loss_reasons_name_device_and_dtypes():
    cuda = dispatch.get("cuda")
    p = dispatch.loss_problem("kd", torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3))
    why = cuda.reasons(p)
    assert any("CUDA tensors only" in r for r in why) and any("float64" in r for r in why)
    p = p._replace(device=torch.device("cuda", 0), dtype=torch.bfloat16, teacher_dtype=torch.float64)
    assert any("teacher_logits dtype torch.float64" in r for r in cuda.reasons(p))


def test_info_lists_the_loss_ops_per_backend():
    report = mf.info()
    ops = {name: entry.get("ops") for name, entry in report["backends"].items()}
    assert {"logit_mse_loss", "kd_loss"} <= set(ops["reference"])
    if ops["cpu"] is not None:  # the C++ extension may be missing; then its entry has no ops
        assert "bottleneck_mlp" in ops["cpu"] and "logit_mse_loss" not in ops["cpu"]
    assert "reference's PyTorch ops" in report["auto"]["losses"]
    assert "auto for the losses:" in dispatch.format_info(report)


def test_losses_under_autocast_are_float32_and_exact():
    s, t = torch.randn(6, 11), torch.randn(6, 11)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mse = mf.logit_mse_loss(s.bfloat16(), t)
        kd = mf.kd_loss(s.bfloat16(), t.bfloat16(), 3.0)
    assert mse.dtype == kd.dtype == torch.float32
    assert_close(mse, F.mse_loss(s.bfloat16().double(), t.double()), "mse", dtype=torch.float32)
    assert_close(mf.logit_mse_loss(s.bfloat16(), t.bfloat16()).float(), mse, "bf16 mse",
                 dtype=torch.bfloat16)
