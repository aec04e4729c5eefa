"""Triton kernels of the fused bottleneck MLP (forward, loss epilogue, recompute backward).

Limits: the hidden tile (BLOCK_B x BLOCK_H) lives only in registers; k and C are looped in
BLOCK_K / BLOCK_C blocks, and a kernel that must hold a k- or C-wide accumulator is gridded over
those blocks instead, recomputing a = z V_jᵀ per block (extra k MACs per (sample, hidden) per block).

Backward, as three launches (chosen over one kernel holding dW_j (C x BLOCK_H) and dV_j
(BLOCK_H x k) fp32 at once: at k = 512, C = 1024 that is 1.5M fp32 per program, far past any
register file, and a dW tile in global memory would be read and written once per batch tile):
  _fused_mlp_bwd_dv_kernel   grid (H splits, k blocks): dV, db1 and partial dz
                             MACs per (sample, hidden): n_kb·(k + C) + 2k  (recompute a, dh, dV, dz)
  _fused_mlp_bwd_dw_kernel   grid (H tiles, C blocks): dW
                             MACs per (sample, hidden): n_cb·k + C          (recompute a, dW)
  _reduce_splits_kernel      dz = Σ_splits partial dz, in a fixed order (deterministic)
The minimum is 3k + 2C; at the paper's k = 250, C = 183 with BLOCK_K = 256, BLOCK_C = 256 these
kernels do 4k + 2C (22 % more), at k = 512, C = 1024 with 256-blocks 2x the minimum.
Offsets of rows (batch, H) are int64: B·C, H·k and n_splits·B·k may pass 2³¹.
"""
import os

import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU tests) runs every program in Python and cannot benchmark:
# one small config each (tl.dot needs dims >= 16), read once when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# numpy >= 2.4 refuses int() of the 1-element arrays in which the Triton 3.6 interpreter wraps runtime
# ints, so `range(0, B, ...)` with a runtime B fails there. Under the interpreter the sizes that bound
# loops are therefore constexpr (free: nothing is compiled); on a GPU they stay runtime values (no
# recompile per batch size): `B: constexpr` below is tl.constexpr only when interpreting. The
# interpreter re-reads annotations as source text, so the alias is spelled exactly `constexpr`; the
# compiler looks the annotation up as a global, so on a GPU it is a falsy constexpr instance, which
# Triton reads as "no annotation". Loop bounds never come from program_id, for the same reason.
constexpr = tl.constexpr if INTERPRET else tl.constexpr(None)

ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_GELU = 0, 1, 2, 3  # == mimic_fast.activations.ACTIVATION_CODES
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # globals used in kernels must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


def _configs(gpu, interp):
    return [triton.Config(*interp)] if INTERPRET else [triton.Config(*c) for c in gpu]


# GPU configs: untested (no GPU was available when these were written). Each entry says why it exists.
_FWD_CONFIGS = _configs(
    [
        # Wide batch tile: V/W tiles reused by 128 rows; y accumulator 128 x 256 fp32 needs 8 warps.
        ({"BLOCK_B": 128, "BLOCK_H": 64, "BLOCK_K": 64}, 8, 3),
        # Same with a deeper k step: fewer loop trips at k = 250 (4 -> 2), more registers per stage.
        ({"BLOCK_B": 128, "BLOCK_H": 64, "BLOCK_K": 128}, 8, 2),
        # Small batches (B <= 64) or large C: a 64-row tile halves the y accumulator.
        ({"BLOCK_B": 64, "BLOCK_H": 64, "BLOCK_K": 64}, 4, 3),
        # Narrow H tile for C = 1024-class outputs (BLOCK_C 256): keeps h + y under the register budget.
        ({"BLOCK_B": 64, "BLOCK_H": 32, "BLOCK_K": 128}, 4, 3),
    ],
    ({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, 1, 1),
)

_BWD_DV_CONFIGS = _configs(
    [
        # FlashAttention-2-like: dV_j (64 x 128) fp32 in registers, 64-row batch tiles streamed.
        ({"BLOCK_B": 64, "BLOCK_H": 64, "BLOCK_C": 64}, 8, 2),
        # Larger batch tile: fewer dz read-modify-writes per H tile (dz traffic / 2).
        ({"BLOCK_B": 128, "BLOCK_H": 64, "BLOCK_C": 64}, 8, 2),
        # Narrow H tile: halves the dV accumulator when BLOCK_K is 256 (k = 250 in one block).
        ({"BLOCK_B": 64, "BLOCK_H": 32, "BLOCK_C": 64}, 4, 2),
        # ptxas -v (sm_90a, bf16, offline): 16 warps halve the spills of the first entry at
        # BLOCK_K 256 (2378 -> 1344 bytes stored), 32-row batch tiles at 8 warps too (1272).
        ({"BLOCK_B": 64, "BLOCK_H": 64, "BLOCK_C": 64}, 16, 2),
        ({"BLOCK_B": 32, "BLOCK_H": 64, "BLOCK_C": 64}, 8, 2),
    ],
    ({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_C": 16}, 1, 1),
)

_BWD_DW_CONFIGS = _configs(
    [
        # dW_j (BLOCK_C x 64) fp32 accumulator; 64-row batch tiles.
        ({"BLOCK_B": 64, "BLOCK_H": 64, "BLOCK_K": 64}, 8, 3),
        # Deeper k step for k >= 128 (fewer trips recomputing a).
        ({"BLOCK_B": 64, "BLOCK_H": 64, "BLOCK_K": 128}, 8, 2),
        # Wider H tile: more dW columns per recompute of the z tile loads.
        ({"BLOCK_B": 32, "BLOCK_H": 128, "BLOCK_K": 64}, 8, 3),
    ],
    ({"BLOCK_B": 16, "BLOCK_H": 16, "BLOCK_K": 16}, 1, 1),
)


@triton.jit
def _act(a, ACTIVATION: tl.constexpr):
    """h = act(a) in fp32; tanh via sigmoid (tl has no portable tanh), gelu is the exact erf form."""
    if ACTIVATION == 0:
        h = tl.maximum(a, 0.0)
    elif ACTIVATION == 1:
        h = tl.sigmoid(a)
    elif ACTIVATION == 2:
        h = 2.0 * tl.sigmoid(2.0 * a) - 1.0
    else:
        h = 0.5 * a * (1.0 + tl.math.erf(a * _INV_SQRT2))
    return h


@triton.jit
def _act_grad(a, ACTIVATION: tl.constexpr):
    """act'(a) in fp32 (relu'(0) = 0, as autograd)."""
    if ACTIVATION == 0:
        g = tl.where(a > 0.0, 1.0, 0.0)
    elif ACTIVATION == 1:
        s = tl.sigmoid(a)
        g = s * (1.0 - s)
    elif ACTIVATION == 2:
        t = 2.0 * tl.sigmoid(2.0 * a) - 1.0
        g = 1.0 - t * t
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _INV_SQRT2))
        g = cdf + a * tl.exp(-0.5 * a * a) * _INV_SQRT_2PI
    return g


@triton.jit
def _hidden_pre(Z, V, B1, offs_b, offs_h, mask_b, mask_h, k, stride_zb, stride_zk, stride_vh,
                stride_vk, stride_b1, HAS_B1: tl.constexpr, BLOCK_B: tl.constexpr,
                BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """a = z[offs_b] V[offs_h]ᵀ + b1[offs_h]: (BLOCK_B, BLOCK_H) fp32, k looped in BLOCK_K steps."""
    acc = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, k, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k
        zt = tl.load(Z + offs_b[:, None] * stride_zb + offs_k[None, :] * stride_zk,
                     mask=mask_b[:, None] & mask_k[None, :], other=0.0)
        vt = tl.load(V + offs_k[:, None] * stride_vk + offs_h[None, :] * stride_vh,
                     mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        acc = tl.dot(zt, vt, acc, input_precision=DOT_PRECISION)
    if HAS_B1:
        acc += tl.load(B1 + offs_h * stride_b1, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.autotune(configs=_FWD_CONFIGS, key=["k", "C", "h_per_split"])
@triton.jit
def _fused_mlp_fwd_kernel(
    Z, V, B1, W, YP,
    B: constexpr, k: constexpr, H, C: constexpr, h_per_split: constexpr,
    stride_zb, stride_zk, stride_vh, stride_vk, stride_b1, stride_wc, stride_wh,
    HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Partial outputs YP[s] = act(z V_sᵀ + b1_s) W_sᵀ over H split s (no b2): YP (S, B, C) fp32.

    Grid (batch tiles, C blocks, H splits); each program streams its split's H tiles through
    registers: a = z V_jᵀ + b1_j, h = act(a), y += h W_jᵀ (design.md "Fused kernel math").
    """
    pid_b = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_b = offs_b < B
    mask_c = offs_c < C
    h_begin = pid_s * h_per_split
    h_end = tl.minimum(h_begin + h_per_split, H)
    y = tl.zeros((BLOCK_B, BLOCK_C), dtype=tl.float32)
    for h_rel in range(0, h_per_split, BLOCK_H):
        h0 = h_begin + h_rel
        if h0 < h_end:  # the last split may be shorter
            offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            mask_h = offs_h < h_end
            a = _hidden_pre(Z, V, B1, offs_b, offs_h, mask_b, mask_h, k, stride_zb, stride_zk,
                            stride_vh, stride_vk, stride_b1, HAS_B1, BLOCK_B, BLOCK_H, BLOCK_K,
                            DOT_PRECISION)
            h = _act(a, ACTIVATION)
            # Padded H columns give h = act(b1 or 0) != 0; the masked W rows (0) cancel them.
            wt = tl.load(W + offs_h[:, None] * stride_wh + offs_c[None, :] * stride_wc,
                         mask=mask_h[:, None] & mask_c[None, :], other=0.0)
            y = tl.dot(h.to(wt.dtype), wt, y, input_precision=DOT_PRECISION)
    out = YP + (pid_s.to(tl.int64) * B + offs_b)[:, None] * C + offs_c[None, :]
    tl.store(out, y, mask=mask_b[:, None] & mask_c[None, :])


@triton.jit
def _reduce_splits_kernel(
    P, BIAS, OUT, T, DY, LOSS,
    n_splits: constexpr, M, N, dy_scale,
    stride_bias, stride_om, stride_on, stride_tm, stride_tn, stride_dym, stride_dyn,
    HAS_BIAS: tl.constexpr, STORE_OUT: tl.constexpr, MIMIC: tl.constexpr,
    LOSS_ELEMENTWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = Σ_s P[s] + bias over P (S, M, N) fp32, summed in split order (deterministic).

    STORE_OUT: OUT = y (cast to OUT's dtype). MIMIC (the mimic-loss epilogue): r = y − T,
    DY = dy_scale · r (fp32), and LOSS = r² elementwise (LOSS_ELEMENTWISE) or, per program,
    LOSS[pid] = Σ r² (fp32; the launcher sums the per-program partials in a fixed order).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, n_splits):
        y += tl.load(P + (s * M + offs_m)[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if STORE_OUT:
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 y.to(OUT.dtype.element_ty), mask=mask)
    if MIMIC:
        t = tl.load(T + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn, mask=mask,
                    other=0.0).to(tl.float32)
        r = tl.where(mask, y - t, 0.0)
        tl.store(DY + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, r * dy_scale,
                 mask=mask)
        if LOSS_ELEMENTWISE:
            tl.store(LOSS + offs_m[:, None] * N + offs_n[None, :], (r * r).to(LOSS.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(LOSS + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(r * r, 1), 0))


@triton.autotune(configs=_BWD_DV_CONFIGS, key=["k", "C", "h_per_split", "BLOCK_K"],
                 reset_to_zero=["DZ"])
@triton.jit
def _fused_mlp_bwd_dv_kernel(
    DY, Z, V, B1, W, DV, DB1, DZ,
    B: constexpr, k: constexpr, H, C: constexpr, h_per_split: constexpr,
    stride_dyb, stride_dyc, stride_zb, stride_zk, stride_vh, stride_vk, stride_b1,
    stride_wc, stride_wh, stride_dvh, stride_dvk,
    HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, ATOMIC_DZ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """dV, db1 and dz for H split s and k block kb; grid (H splits, k blocks).

    Per H tile j of the split, looping over batch tiles with recompute (FlashAttention-2 style):
    a = z V_jᵀ + b1_j, dh = dy W_j, da = dh ⊙ act'(a); dV_j += daᵀ z, db1_j += Σ_b da;
    dz += da V_j. dV_j[:, kb] stays in registers (fp32). dz goes to DZ[s] (S, B, k) fp32,
    owned by this program (first tile stores, later tiles add: deterministic), or with
    ATOMIC_DZ to DZ (B, k) fp32 by atomic adds (order-dependent rounding).
    """
    pid_s = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_kb = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_kb = offs_kb < k
    h_begin = pid_s * h_per_split
    h_end = tl.minimum(h_begin + h_per_split, H)
    if ATOMIC_DZ:
        dz_base = DZ
    else:
        dz_base = DZ + pid_s.to(tl.int64) * B * k
    for h_rel in range(0, h_per_split, BLOCK_H):
        h0 = h_begin + h_rel
        if h0 < h_end:  # the last split may be shorter
            offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
            mask_h = offs_h < h_end
            v_kb = tl.load(V + offs_h[:, None] * stride_vh + offs_kb[None, :] * stride_vk,
                           mask=mask_h[:, None] & mask_kb[None, :], other=0.0)
            dv = tl.zeros((BLOCK_H, BLOCK_K), dtype=tl.float32)
            db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
                mask_b = offs_b < B
                a = _hidden_pre(Z, V, B1, offs_b, offs_h, mask_b, mask_h, k, stride_zb, stride_zk,
                                stride_vh, stride_vk, stride_b1, HAS_B1, BLOCK_B, BLOCK_H, BLOCK_K,
                                DOT_PRECISION)
                dh = tl.zeros((BLOCK_B, BLOCK_H), dtype=tl.float32)
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    mask_c = offs_c < C
                    dyt = tl.load(DY + offs_b[:, None] * stride_dyb
                                  + offs_c[None, :] * stride_dyc,
                                  mask=mask_b[:, None] & mask_c[None, :], other=0.0)
                    wt = tl.load(W + offs_c[:, None] * stride_wc + offs_h[None, :] * stride_wh,
                                 mask=mask_c[:, None] & mask_h[None, :], other=0.0)
                    dh = tl.dot(dyt, wt, dh, input_precision=DOT_PRECISION)
                # Padded batch rows have dy = 0 and padded H columns W = 0, so da is 0 there.
                da = dh * _act_grad(a, ACTIVATION)
                db1 += tl.sum(da, 0)
                z_kb = tl.load(Z + offs_b[:, None] * stride_zb + offs_kb[None, :] * stride_zk,
                               mask=mask_b[:, None] & mask_kb[None, :], other=0.0)
                da_op = da.to(z_kb.dtype)
                dv = tl.dot(tl.trans(da_op), z_kb, dv, input_precision=DOT_PRECISION)
                dz = tl.dot(da_op, v_kb, input_precision=DOT_PRECISION)
                dz_ptrs = dz_base + offs_b[:, None] * k + offs_kb[None, :]
                dz_mask = mask_b[:, None] & mask_kb[None, :]
                if ATOMIC_DZ:
                    tl.atomic_add(dz_ptrs, dz, mask=dz_mask)
                else:
                    # The split's first tile initialises its slice: no zero-fill needed.
                    prev = tl.load(dz_ptrs, mask=dz_mask & (h_rel > 0), other=0.0)
                    tl.store(dz_ptrs, prev + dz, mask=dz_mask)
            tl.store(DV + offs_h[:, None] * stride_dvh + offs_kb[None, :] * stride_dvk,
                     dv.to(DV.dtype.element_ty), mask=mask_h[:, None] & mask_kb[None, :])
            if HAS_B1:
                if pid_k == 0:
                    tl.store(DB1 + offs_h, db1.to(DB1.dtype.element_ty), mask=mask_h)


@triton.autotune(configs=_BWD_DW_CONFIGS, key=["k", "C", "BLOCK_C"])
@triton.jit
def _fused_mlp_bwd_dw_kernel(
    DY, Z, V, B1, DW,
    B: constexpr, k: constexpr, H, C: constexpr,
    stride_dyb, stride_dyc, stride_zb, stride_zk, stride_vh, stride_vk, stride_b1,
    stride_dwc, stride_dwh,
    HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dW[cb, j] = Σ_b dy[b, cb]ᵀ act(z_b V_jᵀ + b1_j); grid (H tiles, C blocks), fp32 accumulator."""
    pid_h = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_h = pid_h.to(tl.int64) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    dw = tl.zeros((BLOCK_C, BLOCK_H), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        mask_b = offs_b < B
        a = _hidden_pre(Z, V, B1, offs_b, offs_h, mask_b, mask_h, k, stride_zb, stride_zk,
                        stride_vh, stride_vk, stride_b1, HAS_B1, BLOCK_B, BLOCK_H, BLOCK_K,
                        DOT_PRECISION)
        # Padded batch rows: h = act(b1) != 0, but their dy rows load as 0.
        dyt = tl.load(DY + offs_b[:, None] * stride_dyb + offs_c[None, :] * stride_dyc,
                      mask=mask_b[:, None] & mask_c[None, :], other=0.0)
        h = _act(a, ACTIVATION).to(dyt.dtype)
        dw = tl.dot(tl.trans(dyt), h, dw, input_precision=DOT_PRECISION)
    tl.store(DW + offs_c[:, None] * stride_dwc + offs_h[None, :] * stride_dwh,
             dw.to(DW.dtype.element_ty), mask=mask_c[:, None] & mask_h[None, :])
