"""Triton kernels of the fused bottleneck MLP: forward, dz, and one recompute backward per H tile.

Limits: the bottleneck is one power-of-two block KP <= 256 (k = 250 -> 256) and the outputs at most
two power-of-two blocks C1 + C2 <= 256 (C = 183 -> 128 + 64 = 192), so every hidden tile is computed
once per pass and never leaves the chip. The launcher pads z and dy (small) and V (H x k) into
aligned, zero-padded buffers, so the loads of the main loops are unmasked 16-byte vectors that the
compiler pipelines (cp.async / wgmma); only W's rows past C and the last ragged H tile are masked.

  _fused_mlp_fwd_kernel   grid (batch tiles, H splits)  y_s = Σ_j act(z V_jᵀ + b1_j) W_jᵀ (fp32 partials)
  _fused_mlp_bwd_kernel   grid (H tiles, batch chunks)  per H tile, looping over batch tiles:
                          a = z V_jᵀ + b1_j, h = act(a), dW_j += dyᵀ h, dh = dy W_j, da = dh ⊙ act'(a),
                          dV_j += daᵀ z, db1_j += Σ da and, with DZ_ATOMIC, dz += da V_j (fp32 atomics)
  _fused_mlp_dz_kernel    grid (batch tiles, H splits)  dz_s = Σ_j da_j V_j (deterministic mode only:
                          recomputes a and dh, +k+C MACs per (sample, hidden))
  _reduce_splits_kernel   Σ_s P[s] in split order (+ bias; the mimic-loss epilogue)
Offsets that can pass 2³¹ (rows x strides of B, H, C·H) are int64.
"""
import os

import triton
import triton.language as tl

# The interpreter (TRITON_INTERPRET=1, CPU tests) runs every program in Python and cannot benchmark:
# one small config each (tl.dot needs dims >= 16), read once when the kernels are defined.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# numpy >= 2.4 refuses int() of the 1-element arrays in which the Triton 3.6 interpreter wraps runtime
# ints, so `range(0, n)` with a runtime n fails there. Under the interpreter the sizes that bound
# loops are therefore constexpr (free: nothing is compiled); on a GPU they stay runtime values (no
# recompile per batch size): `n: constexpr` below is tl.constexpr only when interpreting. The
# interpreter re-reads annotations as source text, so the alias is spelled exactly `constexpr`; the
# compiler looks the annotation up as a global, so on a GPU it is a falsy constexpr instance, which
# Triton reads as "no annotation". Loop bounds never come from program_id, for the same reason: each
# program runs the same trip count, and the leftover tiles are peeled after the loop.
constexpr = tl.constexpr if INTERPRET else tl.constexpr(None)

ACT_RELU, ACT_SIGMOID, ACT_TANH, ACT_GELU = 0, 1, 2, 3  # == mimic_fast.activations.ACTIVATION_CODES
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # globals used in kernels must be constexpr
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


# The GPU configs as (meta-parameters, warps, stages). The forward and dz kernels take BLOCK_H from
# the launcher's plan (their split loops need its tile counts, and the interpreter cannot divide
# runtime values); the backward takes BLOCK_B from it (it shapes the batch chunks and the TMA
# descriptors). Every config compiles with 0 spills for sm_90a at KP = 256, C1 + C2 = 192 in bf16,
# fp16 and TF32 (tests/test_triton_compile.py). `_prune` keeps, for the GPU at hand, the configs
# whose shared memory fits, no sub-64-row wgmma tile on Hopper and no unpipelined (1-stage) config
# when a pipelined one fits. benchmarks/NOTES.md ("triton backend v2") says why each exists.
GPU_CONFIGS = {
    "fwd": [({"BLOCK_B": 128}, 8, 2), ({"BLOCK_B": 64}, 8, 2), ({"BLOCK_B": 64}, 4, 2),
            ({"BLOCK_B": 32}, 4, 2)],
    # 64 hidden units per program (32 would double the z/dy reloads and dz reduce-adds through L2);
    # 4 warps spill at 64, 128 cannot hold dV_j + dW_j in registers, and 3 stages spill 8 bytes
    # with batch chunks (H=8000). 1 stage: the fallback where 2 do not fit.
    "bwd": [({"BLOCK_H": 64}, 8, 2), ({"BLOCK_H": 64}, 8, 1)],
    # 1 stage: the fallback where no pipelined config fits (fp32 at KP = CP = 256).
    "dz": [({"BLOCK_B": 128}, 8, 2), ({"BLOCK_B": 64}, 8, 2), ({"BLOCK_B": 32}, 4, 2),
           ({"BLOCK_B": 64}, 8, 1)],
}


def gpu_configs(kernel):
    return [triton.Config(kw, num_warps=w, num_stages=s) for kw, w, s in GPU_CONFIGS[kernel]]


def _configs(kernel, interp):
    """The autotune configs: the GPU's, or one small config under the interpreter (tl.dot >= 16)."""
    if INTERPRET:
        return [triton.Config(interp, num_warps=1, num_stages=1)]
    return gpu_configs(kernel)


FWD_CONFIGS = _configs("fwd", {"BLOCK_B": 16})
BWD_CONFIGS = _configs("bwd", {"BLOCK_H": 16})
DZ_CONFIGS = _configs("dz", {"BLOCK_B": 16})


def smem_bytes(kernel, meta, num_stages, KP, CP, elem, dz_atomic=True):
    """Shared memory of a config in bytes (what Triton allocates, checked against the compiler in
    tests/test_triton_compile.py): resident tiles + stages x pipelined tiles + staged operands."""
    bb, bh = meta["BLOCK_B"], meta["BLOCK_H"]
    if kernel == "fwd":  # z resident; V_j, W_j pipelined; h is a register operand
        total = elem * (bb * KP + num_stages * bh * (KP + CP))
    elif kernel == "bwd":  # V_j, W_j resident; z, dy pipelined; h, da staged; dzᵀ staged for TMA
        total = elem * (bh * (KP + CP) + num_stages * bb * (KP + CP) + 2 * bb * bh)
        total += 4 * bb * KP if dz_atomic else 0
    elif kernel == "dz":  # z, dy resident; V_j, W_j pipelined
        total = elem * (bb * (KP + CP) + num_stages * bh * (KP + CP))
    else:
        raise ValueError(f"unknown kernel {kernel!r}: expected 'fwd', 'bwd' or 'dz'")
    return total + 1024  # barriers and reduction scratch


def fitting_configs(kernel, configs, args, limit, capability):
    """The configs `_prune` keeps for a launch with these arguments on a GPU with `limit` bytes of
    shared memory per block and compute `capability` (major * 10 + minor); all when limit is None."""
    if limit is None:
        return list(configs)
    z = args["Z"]
    elem = getattr(z, "base", z).element_size()
    KP, CP = args["KP"], args["C1"] + args["C2"]

    def fits(c):
        meta = {**args, **c.kwargs}
        atomic = args.get("DZ_ATOMIC", True)
        return smem_bytes(kernel, meta, c.num_stages, KP, CP, elem, atomic) <= limit

    def wgmma_rows(c):
        # wgmma's M is >= 64: the batch tile of the forward and dz kernels, the hidden tile of the
        # backward (written hidden-major).
        if capability < 90:
            return True
        meta = {**args, **c.kwargs}
        return meta["BLOCK_H" if kernel == "bwd" else "BLOCK_B"] >= 64

    kept = [c for c in configs if fits(c) and wgmma_rows(c)]
    if any(c.num_stages > 1 for c in kept):
        kept = [c for c in kept if c.num_stages > 1]
    return kept


def _device():
    """(max shared memory per block, capability) of the current GPU; (None, None) without one."""
    import torch

    if INTERPRET or not torch.cuda.is_available():
        return None, None
    dev = torch.cuda.current_device()
    if dev not in _DEVICES:
        major, minor = torch.cuda.get_device_capability(dev)
        props = triton.runtime.driver.active.utils.get_device_properties(dev)
        _DEVICES[dev] = (props["max_shared_mem"], major * 10 + minor)
    return _DEVICES[dev]


_DEVICES = {}


def _prune(kernel):
    """Autotune never benchmarks a config that cannot launch (or cannot use the tensor cores well)."""
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        limit, capability = _device()
        kept = fitting_configs(kernel, configs, args, limit, capability)
        if not kept:
            raise RuntimeError(f"no {kernel} config of the triton backend fits this GPU's "
                               f"{limit} bytes of shared memory at k_pad={args['KP']}, "
                               f"C_pad={args['C1'] + args['C2']}")
        return kept
    return prune


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
def _load_w(W, offs_c, offs_h, H, C, stride_wc, MASK_C: tl.constexpr, MASK_H: tl.constexpr):
    """W[offs_c, offs_h] as a (len(offs_c), len(offs_h)) tile; W rows are contiguous along H."""
    ptrs = W + offs_c[:, None].to(tl.int64) * stride_wc + offs_h[None, :]
    if MASK_C and MASK_H:
        w = tl.load(ptrs, mask=(offs_c < C)[:, None] & (offs_h < H)[None, :], other=0.0)
    elif MASK_C:
        w = tl.load(ptrs, mask=(offs_c < C)[:, None], other=0.0)
    elif MASK_H:
        w = tl.load(ptrs, mask=(offs_h < H)[None, :], other=0.0)
    else:
        w = tl.load(ptrs)
    return w


@triton.jit
def _hidden_pre(z, V, B1, offs_h, KP: tl.constexpr, HAS_B1: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """(a, v): a = z V[offs_h]ᵀ + b1[offs_h] (fp32) and the V tile; V, b1 are zero-padded to H_pad."""
    v = tl.load(V + offs_h[:, None] * KP + tl.arange(0, KP)[None, :])
    a = tl.dot(z, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_B1:
        a += tl.load(B1 + offs_h).to(tl.float32)[None, :]
    return a, v


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tile(z, V, B1, W, h0, H, C, stride_wc, y1, y2, KP: tl.constexpr, C1: tl.constexpr,
              C2: tl.constexpr, MASK_C1: tl.constexpr, MASK_C2: tl.constexpr, MASK_H: tl.constexpr,
              HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_H: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    a, v = _hidden_pre(z, V, B1, offs_h, KP, HAS_B1, DOT_PRECISION)
    # Padded H columns give h = act(0 or b1) != 0; the masked W columns (0) cancel them.
    h = _act(a, ACTIVATION).to(v.dtype)
    w1 = _load_w(W, tl.arange(0, C1), offs_h, H, C, stride_wc, MASK_C1, MASK_H)
    y1 = tl.dot(h, tl.trans(w1), y1, input_precision=DOT_PRECISION)
    if C2 > 0:
        w2 = _load_w(W, C1 + tl.arange(0, C2), offs_h, H, C, stride_wc, MASK_C2, MASK_H)
        y2 = tl.dot(h, tl.trans(w2), y2, input_precision=DOT_PRECISION)
    return y1, y2


@triton.autotune(configs=FWD_CONFIGS, key=["H", "C", "KP", "ACTIVATION", "HAS_B1"],
                 prune_configs_by={"early_config_prune": _prune("fwd")})
@triton.jit
def _fused_mlp_fwd_kernel(
    Z, V, B1, W, YP,
    H, C, n_splits, per: constexpr, rest, stride_wc,
    KP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, MASK_C1: tl.constexpr,
    MASK_C2: tl.constexpr, HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """YP[s, b, :] = Σ_{j in split s} act(z_b V_jᵀ + b1_j) W_jᵀ (no b2): YP (S, B_pad, C1 + C2) fp32.

    Z (B_pad, KP) and V (H_pad, KP), b1 (H_pad) are zero-padded; each program keeps its z tile on
    chip and streams its split's V/W tiles (design.md "Fused kernel math"). Split s runs `per` full
    tiles in one loop; the leftover full tiles go one each to the first splits and the ragged last
    tile to the next one, after the loop, so the loop itself has no branch.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    z = tl.load(Z + offs_b[:, None] * KP + tl.arange(0, KP)[None, :])
    y1 = tl.zeros((BLOCK_B, C1), dtype=tl.float32)
    y2 = tl.zeros((BLOCK_B, C2 if C2 > 0 else 16), dtype=tl.float32)
    # Equal loops per split (the bound is no function of program_id), leftovers peeled below.
    n_full = per * n_splits + rest  # full tiles: H // BLOCK_H
    h_begin = pid_s.to(tl.int64) * per * BLOCK_H
    for i in range(0, per):
        y1, y2 = _fwd_tile(z, V, B1, W, h_begin + i * BLOCK_H, H, C, stride_wc, y1, y2, KP, C1, C2,
                           MASK_C1, MASK_C2, False, HAS_B1, ACTIVATION, BLOCK_H, DOT_PRECISION)
    if pid_s < rest:
        y1, y2 = _fwd_tile(z, V, B1, W, (per * n_splits + pid_s) * BLOCK_H, H, C,
                           stride_wc, y1, y2, KP, C1, C2, MASK_C1, MASK_C2, False, HAS_B1,
                           ACTIVATION, BLOCK_H, DOT_PRECISION)
    if (n_full * BLOCK_H < H) & (pid_s == rest):
        y1, y2 = _fwd_tile(z, V, B1, W, n_full * BLOCK_H, H, C, stride_wc, y1, y2,
                           KP, C1, C2, MASK_C1, MASK_C2, True, HAS_B1, ACTIVATION, BLOCK_H,
                           DOT_PRECISION)
    CP: tl.constexpr = C1 + C2
    n_rows = tl.num_programs(0) * BLOCK_B
    out = YP + (pid_s.to(tl.int64) * n_rows + offs_b)[:, None] * CP
    tl.store(out + tl.arange(0, C1)[None, :], y1)
    if C2 > 0:
        tl.store(out + C1 + tl.arange(0, C2)[None, :], y2)


# ------------------------------------------------------------------------------------------- reduce
@triton.jit
def _reduce_splits_kernel(
    P, BIAS, OUT, T, DY, LOSS,
    n_splits: constexpr, M, N, dy_scale,
    stride_ps, stride_pm, stride_bias, stride_om, stride_on, stride_tm, stride_tn, stride_dym,
    HAS_BIAS: tl.constexpr, STORE_OUT: tl.constexpr, MIMIC: tl.constexpr,
    LOSS_ELEMENTWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = Σ_s P[s, :M, :N] + bias over fp32 partials P (rows of stride_pm, unit column stride),
    summed in split order (deterministic).

    STORE_OUT: OUT = y (cast to OUT's dtype). MIMIC (the mimic-loss epilogue): r = y − T,
    DY[:, :N] = dy_scale · r (DY's padding columns are the launcher's), and LOSS = r² elementwise
    (LOSS_ELEMENTWISE) or, per program, LOSS[pid] = Σ r² (fp32; summed by the launcher in a fixed order).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for s in range(0, n_splits):
        y += tl.load(P + s * stride_ps + offs_m[:, None] * stride_pm + offs_n[None, :], mask=mask,
                     other=0.0)
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if STORE_OUT:
        tl.store(OUT + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
                 y.to(OUT.dtype.element_ty), mask=mask)
    if MIMIC:
        t = tl.load(T + offs_m[:, None] * stride_tm + offs_n[None, :] * stride_tn, mask=mask,
                    other=0.0).to(tl.float32)
        r = tl.where(mask, y - t, 0.0)
        tl.store(DY + offs_m[:, None] * stride_dym + offs_n[None, :], r * dy_scale, mask=mask)
        if LOSS_ELEMENTWISE:
            tl.store(LOSS + offs_m[:, None] * N + offs_n[None, :], (r * r).to(LOSS.dtype.element_ty),
                     mask=mask)
        else:
            tl.store(LOSS + pid_m * tl.num_programs(1) + pid_n, tl.sum(tl.sum(r * r, 1), 0))


# ----------------------------------------------------------------------------------------- backward
@triton.autotune(configs=BWD_CONFIGS, key=["H", "C", "KP", "ACTIVATION", "HAS_B1", "DZ_ATOMIC"],
                 reset_to_zero=["DZT"], prune_configs_by={"early_config_prune": _prune("bwd")})
@triton.jit
def _fused_mlp_bwd_kernel(
    Z, DY1, DY2, V, B1, W, DV, DB1, DW, DZT, DZT_DESC,
    H, C, k, tiles_per_chunk: constexpr, stride_vh, stride_vk, stride_b1, stride_wc, stride_dvh,
    stride_dwc, stride_dzt, chunk_dv, chunk_dw, chunk_db1,
    KP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, MASK_C1: tl.constexpr,
    MASK_C2: tl.constexpr, HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr,
    DZ_ATOMIC: tl.constexpr, DZ_TMA: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """dW_j, dV_j, db1_j (and dz) of H tile j over batch chunk c; grid (H tiles, batch chunks).

    FlashAttention-2's dK/dV kernel with z as Q, V as K and Wᵀ as the values: V_j, W_j stay on chip,
    batch tiles of Z (B_pad, KP) and DY (B_pad, C1 + C2) (TMA descriptors; zero-padded rows add
    nothing) stream through, and `a` is recomputed once per (batch tile, H tile). Every GEMM is
    written hidden-major (aᵀ = V_j zᵀ, dhᵀ = W_jᵀ dyᵀ, dV_j += daᵀ z, dW_jᵀ += hᵀ dy, dzᵀ = V_jᵀ daᵀ)
    so that its M is BLOCK_H, KP or CP (>= 64, as wgmma needs) while the batch tile, the N of the
    per-tile transients, stays small: that is what keeps dV_j, dW_j (fp32) and the transients in
    registers at BLOCK_H = 64. DZ_ATOMIC: dzᵀ goes into DZT (KP, B_pad) fp32 by reduce-adds (TMA
    with DZ_TMA; it stays in L2). Outputs dV (H, k), dW (C, H), db1 (H) in their dtype or, with
    several batch chunks (small H), fp32 partials per chunk at DV/DW/DB1 + c · chunk_*.
    """
    pid_h = tl.program_id(0)
    pid_c = tl.program_id(1)
    KH: tl.constexpr = KP // 2  # V_jᵀ, dV_j and dzᵀ travel as two k halves: fewer live registers
    offs_ka = tl.arange(0, KH)
    offs_kb = KH + tl.arange(0, KH)
    # Every address of the H tile is a scalar int64 base (h0) plus int32 in-tile offsets, and its
    # masks compare against the scalar n_h: 64-bit offset vectors kept live across the loop for the
    # epilogue spilled registers (ptxas). V_j, b1_j and W_j are read once per program, straight from
    # the user's tensors (masked: V's k = 250 rows are not 16-byte aligned; no padded copy in
    # backward); the streamed z and dy tiles are the aligned ones.
    h0 = pid_h.to(tl.int64) * BLOCK_H
    n_h = H - pid_h * BLOCK_H  # valid rows of this tile
    rows_h = tl.arange(0, BLOCK_H)
    in_h = rows_h < n_h
    # Rows past H are clamped to the last one rather than masked (fewer live registers): their
    # a and h are garbage, but W_j's masked columns make dh, da and every dV/dz term 0 there, and
    # the stores of dW, dV, db1 are masked.
    v_rows = (tl.minimum(rows_h, n_h - 1) * stride_vh)[:, None]
    v_tile = V + h0 * stride_vh
    va = tl.load(v_tile + v_rows + offs_ka[None, :] * stride_vk, mask=(offs_ka < k)[None, :],
                 other=0.0)  # (BLOCK_H, KH)
    vb = tl.load(v_tile + v_rows + offs_kb[None, :] * stride_vk, mask=(offs_kb < k)[None, :],
                 other=0.0)
    if HAS_B1:
        b1 = tl.load(B1 + h0 * stride_b1 + rows_h * stride_b1, mask=in_h, other=0.0).to(tl.float32)
    # W_j: the ragged H tile is masked here rather than peeled from the loop.
    w1 = _load_w(W + h0, tl.arange(0, C1), rows_h, n_h, C, stride_wc, MASK_C1, True)  # (C1, BH)
    if C2 > 0:
        w2 = _load_w(W + h0, C1 + tl.arange(0, C2), rows_h, n_h, C, stride_wc, MASK_C2, True)
    dva = tl.zeros((BLOCK_H, KH), dtype=tl.float32)
    dvb = tl.zeros((BLOCK_H, KH), dtype=tl.float32)
    dw1t = tl.zeros((BLOCK_H, C1), dtype=tl.float32)
    dw2t = tl.zeros((BLOCK_H, C2 if C2 > 0 else 16), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    b_begin = pid_c.to(tl.int64) * tiles_per_chunk * BLOCK_B
    # Each program starts at its own batch tile (and wraps around): concurrent programs then
    # reduce-add into different dzᵀ columns instead of all into the same ones at once.
    start = pid_h % tiles_per_chunk
    for i in range(0, tiles_per_chunk):
        t = i + start
        t = tl.where(t >= tiles_per_chunk, t - tiles_per_chunk, t)
        row = (b_begin + t * BLOCK_B).to(tl.int32)
        za = Z.load([row, 0])  # (BLOCK_B, KH)
        zb = Z.load([row, KH])
        dy1 = DY1.load([row, 0])  # (BLOCK_B, C1)
        at = tl.dot(va, tl.trans(za), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_B)
        at = tl.dot(vb, tl.trans(zb), at, input_precision=DOT_PRECISION)
        if HAS_B1:
            at += b1[:, None]
        ht = _act(at, ACTIVATION).to(za.dtype)
        dw1t = tl.dot(ht, dy1, dw1t, input_precision=DOT_PRECISION)
        dht = tl.dot(tl.trans(w1), tl.trans(dy1), input_precision=DOT_PRECISION)
        if C2 > 0:
            dy2 = DY2.load([row, C1])
            dw2t = tl.dot(ht, dy2, dw2t, input_precision=DOT_PRECISION)
            dht = tl.dot(tl.trans(w2), tl.trans(dy2), dht, input_precision=DOT_PRECISION)
        # Padded batch rows have dy = 0 and padded H rows W = 0, so da is 0 there.
        dat = dht * _act_grad(at, ACTIVATION)
        db1 += tl.sum(dat, 1)
        dat_op = dat.to(za.dtype)
        dva = tl.dot(dat_op, za, dva, input_precision=DOT_PRECISION)
        dvb = tl.dot(dat_op, zb, dvb, input_precision=DOT_PRECISION)
        if DZ_ATOMIC:
            dzta = tl.dot(tl.trans(va), dat_op, input_precision=DOT_PRECISION)  # (KH, BLOCK_B)
            dztb = tl.dot(tl.trans(vb), dat_op, input_precision=DOT_PRECISION)
            if DZ_TMA:
                DZT_DESC.atomic_add([0, row], dzta)
                DZT_DESC.atomic_add([KH, row], dztb)
            else:
                offs_b = row + tl.arange(0, BLOCK_B)
                tl.atomic_add(DZT + offs_ka[:, None] * stride_dzt + offs_b[None, :], dzta,
                              sem="relaxed")
                tl.atomic_add(DZT + offs_kb[:, None] * stride_dzt + offs_b[None, :], dztb,
                              sem="relaxed")
    # With several batch chunks the launcher points DV/DW/DB1 at fp32 per-chunk buffers.
    c = pid_c.to(tl.int64)
    out_h = tl.arange(0, BLOCK_H)
    mask_h = out_h < H - pid_h * BLOCK_H
    dv_ptrs = DV + c * chunk_dv + h0 * stride_dvh + out_h[:, None] * stride_dvh
    tl.store(dv_ptrs + offs_ka[None, :], dva.to(DV.dtype.element_ty),
             mask=mask_h[:, None] & (offs_ka < k)[None, :])
    tl.store(dv_ptrs + offs_kb[None, :], dvb.to(DV.dtype.element_ty),
             mask=mask_h[:, None] & (offs_kb < k)[None, :])
    dw_tile = DW + c * chunk_dw + h0
    offs_c1 = tl.arange(0, C1)
    tl.store(dw_tile + offs_c1[None, :].to(tl.int64) * stride_dwc + out_h[:, None],
             dw1t.to(DW.dtype.element_ty), mask=(offs_c1 < C)[None, :] & mask_h[:, None])
    if C2 > 0:
        offs_c2 = C1 + tl.arange(0, C2)
        tl.store(dw_tile + offs_c2[None, :].to(tl.int64) * stride_dwc + out_h[:, None],
                 dw2t.to(DW.dtype.element_ty), mask=(offs_c2 < C)[None, :] & mask_h[:, None])
    if HAS_B1:
        tl.store(DB1 + c * chunk_db1 + h0 + out_h, db1.to(DB1.dtype.element_ty), mask=mask_h)


@triton.jit
def _dz_tile(z, dy1, dy2, V, B1, W, h0, H, C, stride_wc, dz, KP: tl.constexpr, C1: tl.constexpr,
             C2: tl.constexpr, MASK_C1: tl.constexpr, MASK_C2: tl.constexpr,
             MASK_H: tl.constexpr, HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr,
             BLOCK_H: tl.constexpr, DOT_PRECISION: tl.constexpr):
    offs_h = (h0 + tl.arange(0, BLOCK_H)).to(tl.int64)
    a, v = _hidden_pre(z, V, B1, offs_h, KP, HAS_B1, DOT_PRECISION)
    w1 = _load_w(W, tl.arange(0, C1), offs_h, H, C, stride_wc, MASK_C1, MASK_H)
    dh = tl.dot(dy1, w1, input_precision=DOT_PRECISION)
    if C2 > 0:
        w2 = _load_w(W, C1 + tl.arange(0, C2), offs_h, H, C, stride_wc, MASK_C2, MASK_H)
        dh = tl.dot(dy2, w2, dh, input_precision=DOT_PRECISION)
    da = (dh * _act_grad(a, ACTIVATION)).to(v.dtype)
    return tl.dot(da, v, dz, input_precision=DOT_PRECISION)


@triton.autotune(configs=DZ_CONFIGS, key=["H", "C", "KP", "ACTIVATION", "HAS_B1"],
                 prune_configs_by={"early_config_prune": _prune("dz")})
@triton.jit
def _fused_mlp_dz_kernel(
    Z, DY, V, B1, W, DZP,
    H, C, n_splits, per: constexpr, rest, stride_wc,
    KP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, MASK_C1: tl.constexpr,
    MASK_C2: tl.constexpr, HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """DZP[s, b, :] = Σ_{j in split s} (dy_b W_j ⊙ act'(z_b V_jᵀ + b1_j)) V_j: (S, B_pad, KP) fp32.

    The deterministic replacement of the backward kernel's atomic dz (FlashAttention's separate dQ
    kernel): the forward's split layout, with z and dy tiles resident instead of y.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    CP: tl.constexpr = C1 + C2
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    offs_k = tl.arange(0, KP)
    z = tl.load(Z + offs_b[:, None] * KP + offs_k[None, :])
    dy1 = tl.load(DY + offs_b[:, None] * CP + tl.arange(0, C1)[None, :])
    if C2 > 0:
        dy2 = tl.load(DY + offs_b[:, None] * CP + C1 + tl.arange(0, C2)[None, :])
    else:
        dy2 = dy1
    dz = tl.zeros((BLOCK_B, KP), dtype=tl.float32)
    # Equal loops per split (the bound is no function of program_id), leftovers peeled below.
    n_full = per * n_splits + rest  # full tiles: H // BLOCK_H
    h_begin = pid_s.to(tl.int64) * per * BLOCK_H
    for i in range(0, per):
        dz = _dz_tile(z, dy1, dy2, V, B1, W, h_begin + i * BLOCK_H, H, C, stride_wc, dz, KP, C1,
                      C2, MASK_C1, MASK_C2, False, HAS_B1, ACTIVATION, BLOCK_H, DOT_PRECISION)
    if pid_s < rest:
        dz = _dz_tile(z, dy1, dy2, V, B1, W, (per * n_splits + pid_s) * BLOCK_H, H,
                      C, stride_wc, dz, KP, C1, C2, MASK_C1, MASK_C2, False, HAS_B1, ACTIVATION,
                      BLOCK_H, DOT_PRECISION)
    if (n_full * BLOCK_H < H) & (pid_s == rest):
        dz = _dz_tile(z, dy1, dy2, V, B1, W, n_full * BLOCK_H, H, C, stride_wc, dz,
                      KP, C1, C2, MASK_C1, MASK_C2, True, HAS_B1, ACTIVATION, BLOCK_H,
                      DOT_PRECISION)
    n_rows = tl.num_programs(0) * BLOCK_B
    tl.store(DZP + (pid_s.to(tl.int64) * n_rows + offs_b)[:, None] * KP + offs_k[None, :], dz)
