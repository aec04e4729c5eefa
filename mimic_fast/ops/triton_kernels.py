"""Triton kernels of the fused bottleneck MLP (the launch plan and its tiles: ops/triton_plan.py).

  _fused_mlp_fwd_kernel  grid (batch tiles, H splits): y_s = Σ_j act(z V_jᵀ + b1_j) W_jᵀ, fp32 partials
  _fused_mlp_bwd_kernel  grid (H tiles of a workspace chunk, batch chunks), looping over batch tiles:
                         aᵀ = V_j zᵀ + b1_j, hᵀ = act(aᵀ), dW_jᵀ += hᵀ dy, dhᵀ = W_jᵀ dyᵀ,
                         daᵀ = dhᵀ ⊙ act'(aᵀ) -> DA (the chunk's workspace), db1_j += Σ da
  _gemm_kernel           grid (dz tiles + dV tiles of a chunk): dz_s += DA VP and dV = DAᵀ z
  _reduce_splits_kernel  Σ_s P[s] in split order (+ bias; the mimic-loss epilogue)
Operands are zero-padded by the launcher (z, dy, V to KP = 256 / CP = 192 at the paper shape) and
streamed by TMA descriptors whose out-of-bounds reads are zero, so no main loop has a mask.
Offsets that can pass 2³¹ (rows x strides of B, H, C·H, splits) are int64 or pointer increments.
"""
import time

import torch
import triton
import triton.language as tl
from triton.runtime.autotuner import Autotuner
from triton.tools.tensor_descriptor import TensorDescriptor

from . import triton_plan as P

INTERPRET = P.INTERPRET

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


def gpu_configs(kernel):
    return [triton.Config({}, num_warps=w, num_stages=s) for w, s in P.CONFIGS[kernel]]


def _configs(kernel):
    """The autotune configs: the GPU's, or one config under the interpreter (it cannot benchmark)."""
    if INTERPRET:
        return [triton.Config({}, num_warps=1, num_stages=1)]
    return gpu_configs(kernel)


def _device():
    """(max shared memory per block, capability) of the current GPU; (None, None) without one."""
    if INTERPRET or not torch.cuda.is_available():
        return None, None
    dev = torch.cuda.current_device()
    if dev not in _DEVICES:
        major, minor = torch.cuda.get_device_capability(dev)
        props = triton.runtime.driver.active.utils.get_device_properties(dev)
        _DEVICES[dev] = (props["max_shared_mem"], major * 10 + minor)
    return _DEVICES[dev]


_DEVICES = {}


def _element_size(arg):
    return getattr(arg, "base", arg).element_size()


def launch_meta(kernel, args):
    """The tile sizes of a launch (its named arguments) that triton_plan's pruning reads."""
    if kernel == "gemm":
        return {"elem": _element_size(args["DA_Z"]), "KP": args["BLOCK_N"], "CP": 0,
                "BLOCK_M": args["BLOCK_M"], "BLOCK_K": args["BLOCK_K"]}
    return {"elem": _element_size(args["Z"]), "KP": args["KP"], "CP": args["C1"] + args["C2"],
            "C1": args["C1"], "BLOCK_B": args["BLOCK_B"], "BLOCK_H": args["BLOCK_H"]}


def _prune(kernel):
    """Autotune never benchmarks a config that cannot launch or would waste the tensor cores."""
    def prune(configs, named_args, **kwargs):
        limit, capability = _device()
        meta = launch_meta(kernel, {**named_args, **kwargs})
        kept = P.fitting_configs(kernel, configs, meta, limit, capability)
        if not kept:
            raise RuntimeError(f"no {kernel} config of the triton backend fits this GPU's {limit} "
                               f"bytes of shared memory at {meta}")
        return kept
    return prune


# ----------------------------------------------------------------------------------- autotuning
TUNING_LOG = []  # one dict per autotuning run: kernel, key, seconds, config (gpu_check reads it)


def _capturing():
    """Whether this thread is capturing a CUDA graph (benchmarking would break the capture)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


class _Autotuner(Autotuner):
    """triton's Autotuner, keyed as it is, that never benchmarks while a CUDA graph is being
    captured (the cached config, else the first config the pruning keeps, uncached: the next
    call outside a capture tunes), and logs each tuning's wall time in TUNING_LOG."""

    def key_of(self, args, kwargs):
        """The cache key triton's Autotuner.run computes."""
        all_args = {**dict(zip(self.arg_names, args)), **kwargs}
        _args = {k: v for k, v in all_args.items() if k in self.arg_names}
        key = [_args[k] for k in self.keys if k in _args]
        key += [str(v.dtype) for v in _args.values() if hasattr(v, "dtype")]
        return tuple(key)

    def decide(self, args, kwargs, capturing):
        """'single' (one config), 'cached', 'first' (capturing, untuned) or 'tune'."""
        if len(self.configs) <= 1:
            return "single"
        if self.key_of(args, kwargs) in self.cache:
            return "cached"
        return "first" if capturing else "tune"

    def run(self, *args, **kwargs):
        how = self.decide(args, kwargs, _capturing())
        if how == "first":
            self.nargs = dict(zip(self.arg_names, args))
            config = self.prune_configs(kwargs)[0]
            self.nargs = None
            return self.fn.run(*args, **kwargs, **config.all_kwargs())
        t0 = time.perf_counter()
        out = super().run(*args, **kwargs)
        if how == "tune":
            TUNING_LOG.append({"kernel": self.base_fn.__name__,
                               "key": [str(k) for k in self.key_of(args, kwargs)],
                               "seconds": round(time.perf_counter() - t0, 3),
                               "bench_seconds": round(getattr(self, "bench_time", 0.0), 3),
                               "config": str(self.best_config)})
        return out


def autotune(configs, key, prune, restore=(), do_bench=None):
    """triton.autotune with _Autotuner. `restore`: arguments (tensors or descriptors: their base)
    that a launch reads and writes, saved before benchmarking and put back after each run."""
    saved = {}

    def pre_hook(kwargs, reset_only=False):
        if not reset_only:
            saved.update({n: getattr(kwargs[n], "base", kwargs[n]).clone() for n in restore})

    def post_hook(kwargs, exception=None):
        for n in restore:
            getattr(kwargs[n], "base", kwargs[n]).copy_(saved[n])
        saved.clear()

    def decorator(fn):
        return _Autotuner(fn, fn.arg_names, configs, key, [], [],
                          pre_hook=pre_hook if restore else None,
                          post_hook=post_hook if restore else None,
                          prune_configs_by={"early_config_prune": prune}, do_bench=do_bench)
    return decorator


# --------------------------------------------------------------------------------- activations
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


# ------------------------------------------------------------------------------------------ forward
@triton.jit
def _fwd_tile(z, V, B1, W1, W2, h0, y1, y2, C1: tl.constexpr, C2: tl.constexpr,
              HAS_B1: tl.constexpr, ACTIVATION: tl.constexpr, BLOCK_H: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    v = V.load([h0, 0])  # (BLOCK_H, KP); rows past H are V_pad's zeros
    a = tl.dot(z, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_B1:
        a += tl.load(B1 + h0 + tl.arange(0, BLOCK_H)).to(tl.float32)[None, :]
    # Padded H columns give h = act(0) != 0; W's out-of-bounds columns (zeros) cancel them.
    h = _act(a, ACTIVATION).to(v.dtype)
    y1 = tl.dot(h, tl.trans(W1.load([0, h0])), y1, input_precision=DOT_PRECISION)
    if C2 > 0:
        y2 = tl.dot(h, tl.trans(W2.load([C1, h0])), y2, input_precision=DOT_PRECISION)
    return y1, y2


@autotune(configs=_configs("fwd"), key=["H", "KP", "C1", "C2", "ACTIVATION", "HAS_B1", "B_KEY"],
          prune=_prune("fwd"))
@triton.jit
def _fused_mlp_fwd_kernel(
    Z, V, B1, W1, W2, YP1, YP2,
    H, n_splits, per: constexpr, rest, rows, B_KEY,
    KP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, HAS_B1: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """YP[s·rows + b, :] = Σ_{j in split s} act(z_b V_jᵀ + b1_j) W_jᵀ (no b2), fp32.

    Z (rows, KP) pointer, V (H_pad, KP) / W (C, H) / YP (S·rows, C1 + C2) descriptors; b1 (H_pad)
    zero-padded. Each program keeps its z tile on chip and streams its split's V/W tiles. Split s
    runs `per` tiles in one loop; the leftover full tiles go one each to the first splits and the
    ragged last tile to the next one, after the loop, so the loop itself has no branch.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_b = pid_b.to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    z = tl.load(Z + offs_b[:, None] * KP + tl.arange(0, KP)[None, :])
    y1 = tl.zeros((BLOCK_B, C1), dtype=tl.float32)
    y2 = tl.zeros((BLOCK_B, C2 if C2 > 0 else 16), dtype=tl.float32)
    n_full = per * n_splits + rest  # full tiles: H // BLOCK_H
    h_begin = pid_s * per * BLOCK_H
    for i in range(0, per):
        y1, y2 = _fwd_tile(z, V, B1, W1, W2, h_begin + i * BLOCK_H, y1, y2, C1, C2, HAS_B1,
                           ACTIVATION, BLOCK_H, DOT_PRECISION)
    if pid_s < rest:
        y1, y2 = _fwd_tile(z, V, B1, W1, W2, (per * n_splits + pid_s) * BLOCK_H, y1, y2, C1, C2,
                           HAS_B1, ACTIVATION, BLOCK_H, DOT_PRECISION)
    if (n_full * BLOCK_H < H) & (pid_s == rest):
        y1, y2 = _fwd_tile(z, V, B1, W1, W2, n_full * BLOCK_H, y1, y2, C1, C2, HAS_B1,
                           ACTIVATION, BLOCK_H, DOT_PRECISION)
    row = pid_s * rows + pid_b * BLOCK_B
    YP1.store([row, 0], y1)
    if C2 > 0:
        YP2.store([row, C1], y2)


# ------------------------------------------------------------------------------------------- reduce
@triton.jit
def _reduce_splits_kernel(
    P, BIAS, SCALE, OUT, T, DY, LOSS,
    n_splits: constexpr, M, N, dy_scale,
    stride_ps, stride_pm, stride_bias, stride_om, stride_on, stride_tm, stride_tn, stride_dym,
    HAS_BIAS: tl.constexpr, SCALED: tl.constexpr, STORE_OUT: tl.constexpr, MIMIC: tl.constexpr,
    LOSS_ELEMENTWISE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """y = Σ_s P[s, :M, :N] + bias over fp32 partials P (rows of stride_pm, unit column stride),
    summed in split order (deterministic), times SCALE[0] when SCALED. The split offset advances
    the 64-bit pointer by stride_ps per split (never an int32 product s · stride_ps).

    STORE_OUT: OUT = y (cast to OUT's dtype). MIMIC (the mimic-loss epilogue): r = y − T,
    DY[:, :N] = dy_scale · r (fp32), and LOSS = r² elementwise (LOSS_ELEMENTWISE) or, per program,
    LOSS[pid] = Σ r² (fp32; summed by the launcher in a fixed order).
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    ptrs = P + offs_m[:, None] * stride_pm + offs_n[None, :]
    for _ in range(0, n_splits):
        y += tl.load(ptrs, mask=mask, other=0.0)
        ptrs += stride_ps
    if HAS_BIAS:
        y += tl.load(BIAS + offs_n * stride_bias, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    if SCALED:
        y *= tl.load(SCALE)
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


# ---------------------------------------------------------------------------------- backward pass 1
@autotune(configs=_configs("bwd"), key=["KP", "C1", "C2", "ACTIVATION", "HAS_B1", "BLOCK_H", "B_KEY"],
          prune=_prune("bwd"))
@triton.jit
def _fused_mlp_bwd_kernel(
    Z, DY1, DY2, DA, W1, W2, V, B1, DYS, VP, DW, DB1,
    H, C, k, h_begin, n_btiles: constexpr, stride_vh, stride_vk, stride_b1, stride_dwc, chunk_dw,
    chunk_db1, B_KEY,
    KP: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, HAS_B1: tl.constexpr,
    ACTIVATION: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_B: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """Pass 1 of H tile j = h_begin + pid_h·BLOCK_H over batch chunk c = pid_c.

    FlashAttention-2's dK/dV kernel with z as Q, V as K and Wᵀ as the values, minus the dQ (dz)
    reduction: V_j, W_j stay on chip, batch tiles of Z (rows, KP) and DY (rows, C1 + C2) stream
    through (TMA; zero-padded rows add nothing), `a` is recomputed once per (batch tile, H tile).
    Every GEMM is hidden-major (aᵀ = V_j zᵀ, dW_jᵀ += hᵀ dy, dhᵀ = W_jᵀ dyᵀ), so its M is BLOCK_H
    (16 rows per warp: no warpgroup repeats another's MMA) and the batch tile is the small N of the
    transients. daᵀ goes to DA (the chunk's workspace, hidden-major, operand dtype), V_j once to VP
    (its padded copy for the dz GEMM). DY holds dy / s (s = DYS[0], a power of two >= max|dy|, so
    fp16 keeps dy's bits where dy itself is subnormal); da stays in those units in DA (pass 2 and
    the launcher apply s), dW and db1 are scaled back by s in fp32 here. Outputs dW (C, H), db1 (H)
    in their dtype or, with several batch chunks, fp32 partials per chunk at DW/DB1 + c · chunk_*.
    """
    pid_h = tl.program_id(0)
    pid_c = tl.program_id(1)
    r0 = pid_h * BLOCK_H  # this tile's first row in the chunk's workspace
    h0 = h_begin + r0
    n_h = H - h0  # valid rows of this tile
    rows_h = tl.arange(0, BLOCK_H)
    in_h = rows_h < n_h
    offs_k = tl.arange(0, KP)
    # V_j from the user's V (k = 250 rows are not 16-byte aligned: no TMA), read once per program.
    # Rows past H are clamped to the last one rather than masked (fewer live registers): their a
    # and h are garbage, but W_j's zero columns make dh and da 0 there, and the stores are masked.
    v_rows = (tl.minimum(rows_h, n_h - 1) * stride_vh)[:, None]
    v = tl.load(V + h0.to(tl.int64) * stride_vh + v_rows + offs_k[None, :] * stride_vk,
                mask=(offs_k < k)[None, :], other=0.0)  # (BLOCK_H, KP)
    if pid_c == 0:
        tl.store(VP + (r0 + rows_h)[:, None] * KP + offs_k[None, :], v)
    if HAS_B1:
        b1 = tl.load(B1 + (h0 + rows_h).to(tl.int64) * stride_b1, mask=in_h, other=0.0)
        b1 = b1.to(tl.float32)
    w1 = W1.load([0, h0])  # (C1, BLOCK_H); rows past C and columns past H read 0
    if C2 > 0:
        w2 = W2.load([C1, h0])
    s = tl.load(DYS)
    dw1t = tl.zeros((BLOCK_H, C1), dtype=tl.float32)
    dw2t = tl.zeros((BLOCK_H, C2 if C2 > 0 else 16), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_H,), dtype=tl.float32)
    b_begin = pid_c * n_btiles * BLOCK_B
    for i in range(0, n_btiles):
        row = b_begin + i * BLOCK_B
        z = Z.load([row, 0])  # (BLOCK_B, KP)
        dy1 = DY1.load([row, 0])  # (BLOCK_B, C1)
        at = tl.dot(v, tl.trans(z), input_precision=DOT_PRECISION)  # (BLOCK_H, BLOCK_B)
        if HAS_B1:
            at += b1[:, None]
        ht = _act(at, ACTIVATION).to(v.dtype)
        dw1t = tl.dot(ht, dy1, dw1t, input_precision=DOT_PRECISION)
        dht = tl.dot(tl.trans(w1), tl.trans(dy1), input_precision=DOT_PRECISION)
        if C2 > 0:
            dy2 = DY2.load([row, C1])
            dw2t = tl.dot(ht, dy2, dw2t, input_precision=DOT_PRECISION)
            dht = tl.dot(tl.trans(w2), tl.trans(dy2), dht, input_precision=DOT_PRECISION)
        # Padded batch rows have dy = 0 and padded H rows W = 0, so da is 0 there.
        dat = dht * _act_grad(at, ACTIVATION)
        db1 += tl.sum(dat, 1)
        DA.store([r0, row], dat.to(v.dtype))
    # With several batch chunks the launcher points DW/DB1 at fp32 per-chunk buffers.
    c = pid_c.to(tl.int64)
    dw_tile = DW + c * chunk_dw + h0.to(tl.int64)
    offs_c1 = tl.arange(0, C1)
    tl.store(dw_tile + offs_c1[None, :].to(tl.int64) * stride_dwc + rows_h[:, None],
             (dw1t * s).to(DW.dtype.element_ty), mask=(offs_c1 < C)[None, :] & in_h[:, None])
    if C2 > 0:
        offs_c2 = C1 + tl.arange(0, C2)
        tl.store(dw_tile + offs_c2[None, :].to(tl.int64) * stride_dwc + rows_h[:, None],
                 (dw2t * s).to(DW.dtype.element_ty),
                 mask=(offs_c2 < C)[None, :] & in_h[:, None])
    if HAS_B1:
        tl.store(DB1 + c * chunk_db1 + h0.to(tl.int64) + rows_h, (db1 * s).to(DB1.dtype.element_ty),
                 mask=in_h)


# ---------------------------------------------------------------------------------- backward pass 2
@triton.jit
def _gemm_tile(A, B_LO, B_HI, m0, k0, n_k: constexpr, A_T: tl.constexpr,
               DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """Σ over n_k K blocks from k0 of A[m0:m0 + BLOCK_M, kk] B[kk, :], as two fp32 column halves.
    A by descriptor (A_T: stored K-major rows, read transposed), B as two column halves (B_LO,
    B_HI: two BLOCK_N / 2 accumulators keep the epilogue to half a tile of registers); blocks
    past the descriptors' shapes read as zero."""
    NH: tl.constexpr = BLOCK_N // 2
    acc_lo = tl.zeros((BLOCK_M, NH), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_M, NH), dtype=tl.float32)
    for i in range(0, n_k):
        kk = k0 + i * BLOCK_K
        if A_T:
            a = tl.trans(A.load([kk, m0]))
        else:
            a = A.load([m0, kk])
        acc_lo = tl.dot(a, B_LO.load([kk, 0]), acc_lo, input_precision=DOT_PRECISION)
        acc_hi = tl.dot(a, B_HI.load([kk, NH]), acc_hi, input_precision=DOT_PRECISION)
    return acc_lo, acc_hi


@triton.jit
def _store_tile(OUT, row, acc_lo, acc_hi, n_rows, N, stride_om, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """OUT[row + m, n] = acc (in OUT's dtype) for m < n_rows, n < N, by pointers."""
    NH: tl.constexpr = BLOCK_N // 2
    base = OUT + row.to(tl.int64) * stride_om
    loc = tl.arange(0, BLOCK_M)[:, None] * stride_om + tl.arange(0, NH)[None, :]
    row_ok = (tl.arange(0, BLOCK_M) < n_rows)[:, None]
    tl.store(base + loc, acc_lo.to(OUT.dtype.element_ty),
             mask=row_ok & (tl.arange(0, NH) < N)[None, :])
    tl.store(base + NH + loc, acc_hi.to(OUT.dtype.element_ty),
             mask=row_ok & (NH + tl.arange(0, NH) < N)[None, :])


@autotune(configs=_configs("gemm"),
          key=["n_dz", "dz_n_k", "dv_tiles", "dv_n_k", "dv_part_rows", "DZ_ACCUMULATE", "BLOCK_M",
               "BLOCK_N", "BLOCK_K", "B_KEY"],
          prune=_prune("gemm"), restore=["DZP_LO"])
@triton.jit
def _gemm_kernel(
    DA_Z, VP_LO, VP_HI, DZP, DZP_LO, DZP_HI, DA_V, Z_LO, Z_HI, DV, SCALE,
    n_dz, dz_tiles, dz_n_k: constexpr, rows, dv_tiles, dv_n_k: constexpr, dv_M, dv_N, dv_row0,
    dv_part_rows, stride_dv, B_KEY,
    DZ_ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Both GEMMs of backward pass 2 over one workspace chunk, in one launch: each gets part of
    the GPU, so each is split less (fewer fp32 partials) than it would be alone. DA is the chunk's
    da as a (rows x n) matrix, stored hidden-major (DA_Z reads it transposed, DA_V as stored).

    programs [0, n_dz)   dz_s += DA VP: batch tile pid % dz_tiles, split s = pid // dz_tiles over
        the chunk's hidden units (dz_n_k K blocks each). fp32 partial rows s · rows + m0 of DZP:
        stored by the first chunk, added to by the later ones in chunk order (DZ_ACCUMULATE:
        through the descriptors DZP_LO / DZP_HI, TMA, no address registers, which the
        load-add-store by pointers spilled).
    programs after them  dV[chunk] = DAᵀ z: hidden tile q % dv_tiles, split s = q // dv_tiles over
        the batch (dv_n_k K blocks each), scaled by SCALE[0] (the backward's dy scale) in fp32,
        written to rows s · dv_part_rows + dv_row0 + m0 of DV (fp32 partials per split, or the
        user-layout dV when unsplit: dv_part_rows = 0), rows m < dv_M, columns < dv_N.
    Every output element has one owner: no reduce-adds.
    """
    pid = tl.program_id(0)
    NH: tl.constexpr = BLOCK_N // 2
    if pid < n_dz:
        m0 = (pid % dz_tiles) * BLOCK_M
        s = pid // dz_tiles
        acc_lo, acc_hi = _gemm_tile(DA_Z, VP_LO, VP_HI, m0, s * dz_n_k * BLOCK_K, dz_n_k, True,
                                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        r = s * rows + m0
        if DZ_ACCUMULATE:
            acc_lo += DZP_LO.load([r, 0])
            acc_hi += DZP_HI.load([r, NH])
            DZP_LO.store([r, 0], acc_lo)
            DZP_HI.store([r, NH], acc_hi)
        else:
            _store_tile(DZP, r, acc_lo, acc_hi, BLOCK_M, BLOCK_N, BLOCK_N, BLOCK_M, BLOCK_N)
    else:
        q = pid - n_dz
        m0 = (q % dv_tiles) * BLOCK_M
        s = q // dv_tiles
        acc_lo, acc_hi = _gemm_tile(DA_V, Z_LO, Z_HI, m0, s * dv_n_k * BLOCK_K, dv_n_k, False,
                                    DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
        sc = tl.load(SCALE)
        row = s * dv_part_rows + dv_row0 + m0
        _store_tile(DV, row, acc_lo * sc, acc_hi * sc, dv_M - m0, dv_N, stride_dv, BLOCK_M,
                    BLOCK_N)


# ------------------------------------------------------------------------------------------ binding
def kernel(name):
    """The kernel object of a plan's kernel key ('fwd', 'bwd', 'gemm', 'reduce')."""
    return globals()[P.KERNELS[name]]


def resolve(value, tensors):
    """A plan argument (Buf / Desc / Stride / number) as the kernel takes it, from `tensors`."""
    if isinstance(value, P.Buf):
        t = tensors[value.name]
        return t[value.row0:] if value.row0 else t
    if isinstance(value, P.Stride):
        return tensors[value.name].stride(value.dim)
    if isinstance(value, P.Desc):
        stride = resolve(value.stride, tensors)
        return TensorDescriptor(tensors[value.name], list(value.shape), [stride, 1],
                                list(value.block))
    return value


def bind(launch, tensors):
    """(kernel, grid, kwargs) of a planned launch on these tensors (names as in the plan)."""
    return kernel(launch.kernel), launch.grid, {k: resolve(v, tensors) for k, v in launch.args.items()}


def run(launch, tensors):
    fn, grid, kwargs = bind(launch, tensors)
    fn[grid](**kwargs)
