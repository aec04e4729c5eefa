"""Reference backend: pure PyTorch, any device and float dtype, chunked over H.

It never creates a (B, H) tensor: the hidden layer is formed CHUNK_H columns at a time and
recomputed chunk by chunk in backward (z = x Uᵀ is kept from forward, not recomputed). Half
precision is computed in float32 (upcast), so this is also the oracle kernels are checked against.
The logit losses are plain PyTorch ops accumulated in float32 (autograd through them as usual).
"""
import torch
import torch.nn.functional as F

from ..activations import act, act_grad

NAME = "reference"
CHUNK_H = 1024


def availability():
    return None


def reasons(problem):
    return []


def describe():
    return {"chunk_h": CHUNK_H}


def compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _chunks(H):
    for h0 in range(0, H, CHUNK_H):
        yield h0, min(h0 + CHUNK_H, H)


def _hidden_pre(z, V, b1, h0, h1, cd):
    a = z @ V[h0:h1].to(cd).t()
    if b1 is not None:
        a = a + b1[h0:h1].to(cd)
    return a


def _forward(x, U, V, b1, W, b2, activation):
    """y and z in the compute dtype."""
    cd = compute_dtype(x.dtype)
    z = x.to(cd) @ U.to(cd).t()
    y = torch.zeros(x.shape[0], W.shape[0], dtype=cd, device=x.device)
    for h0, h1 in _chunks(V.shape[0]):
        h = act(_hidden_pre(z, V, b1, h0, h1, cd), activation)
        # out of place: FlopCounterMode (and any dispatch-mode tool) does not see addmm_
        y = torch.addmm(y, h, W[:, h0:h1].to(cd).t())
    if b2 is not None:
        y += b2.to(cd)
    return y, z


def mlp_fwd(x, U, V, b1, W, b2, activation):
    y, z = _forward(x, U, V, b1, W, b2, activation)
    return y.to(x.dtype), z


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx):
    cd = z.dtype
    dy = dy.to(cd)
    H, k = V.shape
    dz = torch.zeros_like(z)
    dV = torch.empty(H, k, dtype=cd, device=z.device)
    dW = torch.empty(W.shape, dtype=cd, device=z.device)
    db1 = None if b1 is None else torch.empty(H, dtype=cd, device=z.device)
    for h0, h1 in _chunks(H):
        Vj = V[h0:h1].to(cd)
        a = _hidden_pre(z, V, b1, h0, h1, cd)
        dW[:, h0:h1] = dy.t() @ act(a, activation)
        da = (dy @ W[:, h0:h1].to(cd)) * act_grad(a, activation)
        dV[h0:h1] = da.t() @ z
        if db1 is not None:
            db1[h0:h1] = da.sum(0)
        dz = torch.addmm(dz, da, Vj)
    dU = dz.t() @ x.to(cd)
    dx = dz @ U.to(cd) if need_dx else None
    db2 = dy.sum(0) if has_b2 else None
    dt = x.dtype
    return (None if dx is None else dx.to(dt), dU.to(dt), dV.to(dt), None if db1 is None else db1.to(dt), dW.to(dt),
            None if db2 is None else db2.to(dt))


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    y, z = _forward(x, U, V, b1, W, b2, activation)
    r = y - t.to(y.dtype)
    sq = r * r
    if reduction == "mean":
        loss, dy_unit = sq.mean(), r * (2.0 / max(r.numel(), 1))
    elif reduction == "sum":
        loss, dy_unit = sq.sum(), 2.0 * r
    else:
        loss, dy_unit = sq, 2.0 * r
    return loss.to(x.dtype), z, dy_unit.to(torch.promote_types(dy_unit.dtype, torch.float32))


def _accumulation_dtype(*dtypes):
    acc = torch.float32
    for d in dtypes:
        acc = torch.promote_types(acc, d)
    return acc


def logit_mse_loss(s, t, reduction, zero_mean):
    """F.mse_loss in float32 (or wider), optionally on row-centred logits; loss in that dtype."""
    acc = _accumulation_dtype(s.dtype, t.dtype)
    s32, t32 = s.to(acc), t.to(acc)
    if zero_mean:
        s32 = s32 - s32.mean(dim=-1, keepdim=True)
        t32 = t32 - t32.mean(dim=-1, keepdim=True)
    return F.mse_loss(s32, t32, reduction=reduction)


def kd_loss(s, t, temperature):
    """KL(softmax(t/T) ‖ softmax(s/T)) · T², batch-mean over the rows of (..., C), in float32+."""
    C = s.shape[-1]
    acc = _accumulation_dtype(s.dtype)
    ls = F.log_softmax(s.reshape(-1, C).to(acc) / temperature, dim=-1)
    lt = F.log_softmax(t.reshape(-1, C).to(acc) / temperature, dim=-1)
    kl = F.kl_div(ls, lt, reduction="batchmean", log_target=True)
    return kl * (temperature * temperature)
