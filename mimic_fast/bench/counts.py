"""Explicit FLOP and byte counts for the benchmarked ops (what TFLOP/s and GB/s are computed from).

FLOPs are *model* FLOPs, 2 per multiply-add of the GEMMs the math needs; the hidden layer's
recomputation in the fused backward and elementwise work are not counted, so a fused and an unfused
provider are scored on the same work. x gets no gradient (a student's input is data).
"""

ELEMENT_SIZE = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


def dtype_name(dtype):
    """'float32' for torch.float32 or 'float32'."""
    return str(dtype).replace("torch.", "")


def element_size(dtype):
    return ELEMENT_SIZE[dtype_name(dtype)]


def mlp_flops(B, D, k, H, C, pass_="full"):
    """FLOPs of the bottleneck MLP y = act((x Uᵀ) Vᵀ + b1) Wᵀ + b2 for one pass.

    forward:  z = x Uᵀ (2BDk), a = z Vᵀ (2BkH), y = h Wᵀ (2BHC)
    backward: dW = dyᵀ h, dh = dy W (2·2BHC), dV = daᵀ z, dz = da V (2·2BkH), dU = dzᵀ x (2BDk)
    full = forward + backward (= 3 × forward when D·k is small next to H·(k + C)).
    """
    fwd = 2 * B * (D * k + k * H + H * C)
    bwd = 2 * B * (D * k + 2 * k * H + 2 * H * C)
    if pass_ == "forward":
        return fwd
    if pass_ == "backward":
        return bwd
    if pass_ == "full":
        return fwd + bwd
    raise ValueError(f"unknown pass {pass_!r}: expected 'forward', 'backward' or 'full'")


def mlp_params(D, k, H, C, bias=True):
    """Parameter count of the factored student U (k, D), V (H, k), b1 (H,), W (C, H), b2 (C,)."""
    return k * D + H * k + H * C + ((H + C) if bias else 0)


def loss_bytes(B, C, dtype, pass_="forward"):
    """Minimum DRAM traffic of a logit loss over (B, C) student/teacher logits.

    forward reads both (2·B·C elements) and writes a scalar; backward reads both again and writes
    the gradient (3·B·C); full = forward + backward.
    """
    n = B * C * element_size(dtype)
    per = {"forward": 2 * n, "backward": 3 * n, "full": 5 * n}
    if pass_ not in per:
        raise ValueError(f"unknown pass {pass_!r}: expected one of {', '.join(per)}")
    return per[pass_]


def loss_flops(B, C, pass_="forward"):
    # Elementwise work only; bandwidth is what these ops are scored on.
    return {"forward": 3 * B * C, "backward": 3 * B * C, "full": 6 * B * C}[pass_]


def mm_flops(M, N, K):
    return 2 * M * N * K


def throughput(flops=None, nbytes=None, seconds=None):
    """(TFLOP/s, GB/s) for a run of `seconds`; None where a count or the time is missing."""
    if not seconds or seconds <= 0:
        return None, None
    tflops = flops / seconds / 1e12 if flops else None
    gbps = nbytes / seconds / 1e9 if nbytes else None
    return tflops, gbps


def model_flops_per_sample(model, in_shape, train=False):
    """Model FLOPs per sample of `model` (2 per MAC of every Linear/Conv), counted with a dry run.

    Uses torch.utils.flop_counter so conv and linear layers of any model count alike. train=True
    counts forward + backward (FlopCounterMode counts the weight and input gradients it sees).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    p = next(model.parameters())
    x = torch.zeros(2, *in_shape, device=p.device, dtype=p.dtype)
    counter = FlopCounterMode(display=False)
    with counter:
        if train:
            model(x).float().sum().backward()
        else:
            with torch.no_grad():
                model(x)
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() // 2
