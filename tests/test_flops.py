"""The one FLOP module (mimic_fast.ops.flops) against torch's FlopCounterMode on the eager chain."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from mimic_fast.ops import flops


def _eager_flops(B, D, k, H, C, backward, x_grad):
    x = torch.randn(B, D, requires_grad=x_grad)
    U, V, W = (torch.randn(*s, requires_grad=True) for s in ((k, D), (H, k), (C, H)))
    b1, b2 = torch.zeros(H, requires_grad=True), torch.zeros(C, requires_grad=True)
    counter = FlopCounterMode(display=False)
    if backward:
        y = F.linear(torch.relu(F.linear(F.linear(x, U), V, b1)), W, b2)
        with counter:
            y.backward(torch.ones_like(y))
    else:
        with counter:
            F.linear(torch.relu(F.linear(F.linear(x, U), V, b1)), W, b2)
    return counter.get_total_flops()


@pytest.mark.parametrize("B,D,k,H,C", [(8, 12, 3, 40, 5), (1, 7, 1, 9, 1)])
@pytest.mark.parametrize("x_grad", [False, True])
def test_mlp_flops_match_torch_flop_counter(B, D, k, H, C, x_grad):
    assert flops.mlp_flops(B, D, k, H, C, "forward") == _eager_flops(B, D, k, H, C, False, x_grad)
    bwd = flops.mlp_flops(B, D, k, H, C, "backward", input_grad=x_grad)
    assert bwd == _eager_flops(B, D, k, H, C, True, x_grad)
    full = flops.mlp_flops(B, D, k, H, C, "full", input_grad=x_grad)
    assert full == flops.mlp_flops(B, D, k, H, C, "forward") + bwd
    # the fused backward's recompute of a = z Vᵀ is one (B, k) x (k, H) GEMM more
    assert flops.mlp_flops(B, D, k, H, C, "backward", input_grad=x_grad, recompute=True) == \
        bwd + 2 * B * k * H


def test_paper_size_counts():
    # design.md: the fused step at B=4096, H=400k is ~6.4 ms at ~800 TFLOP/s with one recompute.
    executed = flops.mlp_flops(4096, 1845, 250, 400000, 183, "full", input_grad=True, recompute=True)
    assert 6.3e-3 < executed / 800e12 < 6.5e-3
    assert flops.mlp_params(1845, 250, 400000, 183, bias=False) == 173_661_250
    assert flops.loss_bytes(4096, 183, "bfloat16", "forward") == 2 * 4096 * 183 * 2
    assert flops.loss_bytes(10, 3, torch.float32, "full") == 5 * 10 * 3 * 4
    with pytest.raises(ValueError, match="unknown pass"):
        flops.mlp_flops(1, 1, 1, 1, 1, "sideways")
