"""logit_mse_loss and kd_loss against their definitions."""
import pytest
import torch
import torch.nn.functional as F

import mimic_fast as mf
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
