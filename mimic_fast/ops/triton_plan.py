"""The launch plan of the triton backend: every tile, split, padded size, workspace and launch of one
call, as plain data (no triton import, no kernel launch; torch only to ask for the GPU's SMs). The launchers (ops/triton_fused.py) run
these launches; the cost model (ops/triton_cost.py) counts them; the offline compile gate
(ops/triton_offline.py) compiles them.

The passes (design.md, "Fused kernel math"; benchmarks/NOTES.md, "triton backend v3"):
  forward   fwd (grid: batch tiles x H splits) -> fp32 partial y per split -> reduce (+ b2, loss, dy)
  backward  per workspace chunk of H (ws_rows hidden units, at most WORKSPACE_BYTES and 1/4 of H):
              bwd   one program per H tile (x batch chunks when H tiles alone cannot fill the GPU):
                    recompute a, h; dW_j, db1_j in registers; da -> the chunk's workspace DA
                    (operand dtype, (ws_rows, rows), hidden-major) and V_j -> VP (padded copy)
              gemm  one launch of both pass-2 GEMMs, each on part of the GPU:
                    dz_s += DA VP[chunk]       (split over the chunk's H; fp32 partials per split,
                                                accumulated chunk after chunk in a fixed order)
                    dV[chunk] = DAᵀ z          (split over the batch when the chunk has few row
                                                tiles: fp32 partials, summed after the chunk)
            dy enters as dy / s (s: a power of two >= max|dy|) and da, dz's partials stay in those
            units in the low-precision buffers (fp16's normal range); s is applied in fp32 to dW,
            db1, dV and to dz in its reduction (fp16: to dx, dU after their GEMMs instead).
            then reduce: dz (Σ splits), dV / dW / db1 when they were split.
No reduce-adds anywhere: every output element has one owner per launch, so results are
bit-identical run to run.
"""
import contextlib
import heapq
import math
import os
from typing import Any, Dict, NamedTuple, Tuple

import torch

# The interpreter (TRITON_INTERPRET=1, CPU tests) runs every program in Python: small tiles there.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

K_MAX = 256  # one k block: z, dz and V_j tiles are one on-chip block of KP
C_MAX = 256  # C1 + C2: y and dW_j are one on-chip block of CP
H_ALIGN = 128  # V, b1 and the per-H partial buffers are padded to this: >= every hidden tile
# The backward's bounded (rows x ws_rows) workspace of da: at most this many bytes and at most a
# quarter of the hidden units, so it is never a (B, H) matrix (design.md; the allocation tests
# assert it). 256 MiB at B = 4096 in bf16 is 32768 hidden units: 13 chunks at H = 400k.
WORKSPACE_BYTES = 256 * 2**20
WORKSPACE_FRACTION = 4
SMEM_LIMIT = 227 * 1024  # shared memory per block on Hopper (the backend serves sm_90 only)

# Autotune configs as (num_warps, num_stages). Every tile shape is the plan's (the grids and the TMA
# descriptors' blocks depend on them); autotuning only picks warps and pipeline depth, among the
# configs `fitting_configs` keeps for the GPU at hand. All keep >= 3 stages: loads run >= 2 loop
# iterations ahead of the MMAs that use them (the gate checks it in the compiled loop).
CONFIGS = {
    "fwd": [(8, 4), (8, 3), (4, 4), (4, 3)],
    "bwd": [(8, 3), (4, 3)],
    "gemm": [(8, 4), (8, 3), (4, 4), (4, 3)],
}
KERNELS = {"fwd": "_fused_mlp_fwd_kernel", "bwd": "_fused_mlp_bwd_kernel", "gemm": "_gemm_kernel",
           "reduce": "_reduce_splits_kernel"}


# ------------------------------------------------------------------------------------------- sizes
def _next_pow2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def pad_k(k):
    """The bottleneck's on-chip width: one power of two >= 32 (tl.dot needs >= 16 per half)."""
    return max(32, _next_pow2(k))


def split_c(C):
    """(C1, C2): C padded to at most two power-of-two blocks (>= 16 each, C2 = 0 for one block),
    the smallest such cover: 183 -> (128, 64) = 192 rather than 256."""
    c1 = max(16, _next_pow2(C))
    if c1 == 16 or c1 == C:
        return c1, 0
    lo = c1 // 2
    c2 = max(16, _next_pow2(C - lo))
    return (lo, c2) if lo + c2 < c1 else (c1, 0)


def _round_up(n, m):
    return -(-n // m) * m


def _cdiv(a, b):
    return -(-a // b)


def busy(programs, sms):
    """Fraction of the GPU's SMs busy over the waves of a grid of equal programs."""
    if programs <= 0:
        return 1.0
    return programs / (math.ceil(programs / sms) * sms)


def _efficiency(rows, work, split, sms):
    """Busy fraction when `work` equal units are cut into `split` pieces per row of programs, each
    wave lasting as long as its largest piece."""
    return busy(rows * split, sms) * (work / split) / math.ceil(work / split)


def makespan(groups, sms):
    """When the last program ends if the GPU starts programs in launch order, each on the SM that
    frees first, one per SM at a time (every tile here takes most of an SM's shared memory).
    groups: [(programs, duration)] in launch order. SMs free at the same time move as one bucket,
    so the cost grows with the rounds, not the programs."""
    free = [(0, sms)]  # (time, SMs free from then on)
    end = 0
    for count, d in groups:
        while count > 0:
            t, n = heapq.heappop(free)
            take = min(n, count)
            count -= take
            heapq.heappush(free, (t + d, take))
            end = max(end, t + d)
            if n > take:
                heapq.heappush(free, (t, n - take))
    return end


def pass2_programs(p, n):
    """[(programs, K blocks each)] of the pass-2 launch over a chunk of n hidden units, in launch
    order: the dz tiles, then the dV tiles."""
    kb_dz, kb_dv = _cdiv(n, p.gemm_block_k), p.rows // p.gemm_block_k
    return [(p.rows // p.gemm_block_m * p.dz_splits, _cdiv(kb_dz, p.dz_splits)),
            (_cdiv(n, p.gemm_block_m) * p.dv_splits, _cdiv(kb_dv, p.dv_splits))]


def pass2_busy(p, n, useful=False):
    """Busy fraction of the SMs over the pass-2 launch of a chunk of n hidden units (programs of
    two lengths, scheduled as `makespan` says): executed K blocks (useful=True: without the
    zero-filled blocks past the last split's end) over SMs x makespan."""
    progs = pass2_programs(p, n)
    end = makespan(progs, p.sms)
    if useful:
        work = (p.rows // p.gemm_block_m) * _cdiv(n, p.gemm_block_k) \
            + _cdiv(n, p.gemm_block_m) * (p.rows // p.gemm_block_k)
    else:
        work = sum(count * d for count, d in progs)
    return work / (p.sms * end) if end else 1.0


def _pass2_splits(p):
    """(dv_splits, dz_splits) of the pass-2 launch: the fewest fp32 partial bytes (dz's are read
    and written per chunk; dV's written, then read by their reduction) among the splits whose
    full chunk keeps the SMs >= 90% busy (useful work); the busiest when none does. >= 4 K blocks
    per split keep a pipelined loop."""
    kb_dz, kb_dv = _cdiv(p.ws_rows, p.gemm_block_k), p.rows // p.gemm_block_k
    options = sorted((2 * s_dz * p.rows + (2 * s_dv * p.ws_rows if s_dv > 1 else 0), s_dv, s_dz)
                     for s_dz in range(1, min(32, max(1, kb_dz // 4)) + 1)
                     for s_dv in range(1, min(16, max(1, kb_dv // 4)) + 1))
    busiest = None
    for _, s_dv, s_dz in options:  # fewest partial bytes first
        eff = pass2_busy(p._replace(dv_splits=s_dv, dz_splits=s_dz), p.ws_rows, useful=True)
        if eff >= 0.9:
            return s_dv, s_dz
        if busiest is None or eff > busiest[0]:
            busiest = (eff, s_dv, s_dz)
    return busiest[1:]


def _fill(rows, work, sms, max_split, min_eff=0.9, min_waves=2):
    """The fewest pieces `work` is split into so that rows x pieces programs make >= min_waves
    waves at >= min_eff busy (fewer pieces: fewer partial sums); the most efficient split when
    none does."""
    best = (-1.0, 1)
    for s in range(1, max(1, max_split) + 1):
        eff = _efficiency(rows, work, s, sms)
        if rows * s >= min_waves * sms * min_eff and eff >= min_eff:
            return s
        best = max(best, (eff, -s))
    return -best[1]


# ------------------------------------------------------------------------- shared memory, pruning
def smem_bytes(kernel, meta, num_stages):
    """Shared memory of a config in bytes (what Triton allocates; tests/test_triton_compile.py checks
    it is never below the compiler's figure): resident tiles + stages x pipelined tiles + staging."""
    e, KP, CP = meta["elem"], meta["KP"], meta["CP"]
    if kernel == "fwd":  # z resident; V_j, W_j pipelined
        total = e * (meta["BLOCK_B"] * KP + num_stages * meta["BLOCK_H"] * (KP + CP))
    elif kernel == "bwd":  # V_j, W_j resident; z, dy pipelined; da staged for its TMA store
        bb, bh = meta["BLOCK_B"], meta["BLOCK_H"]
        if e == 2:
            total = e * (bh * (KP + CP) + num_stages * bb * (KP + CP) + bh * bb)
        else:  # TF32 reads K-major operands only: W_jᵀ and dy are re-staged transposed in the loop
            # (the largest W_j block at a time), and dy is pipelined one stage shallower
            total = e * (bh * (KP + CP) + num_stages * bb * KP + (num_stages - 1) * bb * CP
                         + bh * bb + max(meta["C1"], meta["CP"] - meta["C1"]) * bh)
    elif kernel == "gemm":  # A and B tiles pipelined
        total = e * num_stages * meta["BLOCK_K"] * (meta["BLOCK_M"] + KP)
    else:
        raise ValueError(f"unknown kernel {kernel!r}: expected 'fwd', 'bwd' or 'gemm'")
    return total + 1024  # barriers


def chained_rows(kernel, meta):
    """The M of the kernel's wgmmas whose result feeds another dot (Triton gives those dots
    warpsPerCTA = [num_warps, 1]): each warp needs 16 of its rows, or warpgroups repeat the same MMA."""
    return {"fwd": meta.get("BLOCK_B"), "bwd": meta.get("BLOCK_H"),
            "gemm": meta.get("BLOCK_M")}[kernel]


def accumulator_regs(kernel, meta, num_warps):
    """fp32 accumulator registers per thread that stay live across the main loop."""
    threads = 32 * num_warps
    if kernel == "fwd":
        n = meta["BLOCK_B"] * meta["CP"]
    elif kernel == "bwd":
        n = meta["BLOCK_H"] * meta["CP"]
    else:
        n = meta["BLOCK_M"] * meta["KP"]
    return n // threads


def fitting_configs(kernel, configs, meta, limit, capability):
    """The configs autotuning may try for a launch with these tiles on a GPU with `limit` bytes of
    shared memory per block and compute `capability` (major*10 + minor); all when limit is None.
    Kept: shared memory fits; on Hopper, no warpgroup repeats another's MMAs (16 rows per warp of
    every chained dot, >= 64 rows for wgmma) and the loop-carried accumulators leave registers for
    the rest (<= 128 per thread: more spills, tests/test_triton_compile.py)."""
    if limit is None:
        return list(configs)

    def warps(c):
        return c.num_warps if hasattr(c, "num_warps") else c[0]

    def stages(c):
        return c.num_stages if hasattr(c, "num_stages") else c[1]

    def ok(c):
        if smem_bytes(kernel, meta, stages(c)) > limit:
            return False
        if capability >= 90:
            rows = chained_rows(kernel, meta)
            if rows < 64 or rows < 16 * warps(c):
                return False
            if accumulator_regs(kernel, meta, warps(c)) > 128:
                return False
        return True

    return [c for c in configs if ok(c)]


# -------------------------------------------------------------------------------------- the plan
class Device(NamedTuple):
    """What a plan needs of the GPU."""

    sms: int


OFFLINE_DEVICE = Device(132)  # an H100 SXM / H200, for plans made without a GPU
INTERPRETER_DEVICE = Device(4)  # a few programs per launch: the interpreter runs each in Python
_device_override = []


@contextlib.contextmanager
def device_override(device):
    """Plans made inside are for `device` (tests; the gate and the cost model pass it explicitly)."""
    _device_override.append(device)
    try:
        yield
    finally:
        _device_override.pop()


def current_device(interpret=INTERPRET):
    if _device_override:
        return _device_override[-1]
    if interpret:
        return INTERPRETER_DEVICE
    if not torch.cuda.is_available():
        return OFFLINE_DEVICE
    idx = torch.cuda.current_device()
    if idx not in _DEVICES:
        _DEVICES[idx] = Device(torch.cuda.get_device_properties(idx).multi_processor_count)
    return _DEVICES[idx]


_DEVICES = {}


class Plan(NamedTuple):
    """Tiles, padded sizes, grids and workspace of one call."""

    B: int
    k: int
    H: int
    C: int
    elem: int  # operand bytes: 2 (bf16, fp16) or 4 (fp32 through TF32)
    interpret: bool
    sms: int
    KP: int
    C1: int
    C2: int
    H_pad: int
    rows: int  # padded batch rows of every kernel (a multiple of every batch tile)
    # forward
    fwd_block_b: int
    fwd_block_h: int
    fwd_splits: int
    # backward pass 1
    bwd_block_b: int
    bwd_block_h: int
    bwd_bchunks: int  # batch chunks (> 1 only when a chunk's H tiles cannot fill the GPU alone)
    bwd_btiles: int  # batch tiles per batch chunk
    # workspace chunks of H
    ws_rows: int  # hidden units per chunk (a multiple of bwd_block_h)
    n_chunks: int
    # pass-2 GEMMs
    gemm_block_m: int
    gemm_block_k: int
    dv_splits: int  # split of dV's batch reduction (fp32 partials when > 1)
    dz_splits: int  # split of dz's H reduction (fp32 partials, always reduced at the end)

    @property
    def CP(self):
        return self.C1 + self.C2

    @property
    def workspace_bytes(self):
        """The da workspace: (ws_rows, rows) in the operand dtype."""
        return self.ws_rows * self.rows * self.elem

    def chunk(self, c):
        """(first hidden unit, hidden units) of workspace chunk c: whole H tiles, the last may pass H."""
        h0 = c * self.ws_rows
        n_tiles = min(self.ws_rows, _round_up(self.H, self.bwd_block_h) - h0) // self.bwd_block_h
        return h0, n_tiles * self.bwd_block_h

    def split_tiles(self):
        """(full H tiles per forward split, leftover full tiles)."""
        n_full = self.H // self.fwd_block_h
        return n_full // self.fwd_splits, n_full % self.fwd_splits

    def meta(self, kernel):
        """The tile sizes `smem_bytes` / `fitting_configs` read for a kernel of this plan."""
        m = {"elem": self.elem, "KP": self.KP, "CP": self.CP}
        if kernel == "fwd":
            m.update(BLOCK_B=self.fwd_block_b, BLOCK_H=self.fwd_block_h)
        elif kernel == "bwd":
            m.update(BLOCK_B=self.bwd_block_b, BLOCK_H=self.bwd_block_h, C1=self.C1)
        elif kernel == "gemm":
            m.update(BLOCK_M=self.gemm_block_m, BLOCK_K=self.gemm_block_k)
        return m


def plan(B, k, H, C, elem=2, device=None, interpret=None):
    """The launch plan for (B, k, H, C) with `elem`-byte operands on `device` (default: this GPU,
    the interpreter's, or OFFLINE_DEVICE). Grids fill the GPU: >= 2 waves where the tiles allow,
    >= 90% busy counting wave quantisation, with the fewest splits (fewer partial sums)."""
    interpret = INTERPRET if interpret is None else interpret
    dev = device or current_device(interpret)
    sms = dev.sms
    KP = pad_k(k)
    C1, C2 = split_c(C)
    if interpret:  # tl.dot needs >= 16 per dim; one small tile everywhere
        fwd_bb = fwd_bh = bwd_bb = gemm_bm = gemm_bk = 16
        rows = _round_up(B, 16)
    else:
        # The forward keeps z (128 x KP) resident and streams V_j, W_j: 32 hidden units per stage
        # leaves room for 4 stages (64 would fit 2 only: 232 KB > 227 KB at 3). fp32: 16.
        fwd_bb, fwd_bh = 128, (32 if elem <= 2 else 16)
        # Pass 1 is hidden-major (its M is BLOCK_H, the batch tile is the N of the transients): 32
        # batch rows per stage leave room for 3 stages beside the resident V_j, W_j tiles.
        bwd_bb = 32 if elem <= 2 else 16
        gemm_bm, gemm_bk = 128, (64 if elem <= 2 else 32)
        rows = _round_up(B, 128)
    # forward: batch tiles x H splits (each program loops over its split's H tiles, so one wave
    # at >= 90% busy is enough; every further split adds a (rows, CP) fp32 partial of y)
    max_split = min(64, max(1, H // fwd_bh))
    fwd_splits = _fill(rows // fwd_bb, _cdiv(H, fwd_bh), sms, max_split, min_waves=1)
    # backward pass 1: 128 hidden units per program (two warpgroups: half the z/dy re-reads through
    # L2 of 64) where its tiles fit Hopper's shared memory (not at KP = CP = 256, nor for fp32's
    # twice-as-large tiles): else 64 (one warpgroup).
    bwd_bh = 16
    if not interpret:
        wide = {"elem": elem, "KP": KP, "CP": C1 + C2, "C1": C1, "BLOCK_B": bwd_bb, "BLOCK_H": 128}
        bwd_bh = 128 if elem <= 2 and fitting_configs("bwd", CONFIGS["bwd"], wide, SMEM_LIMIT, 90) \
            else 64
    # Chunks are whole GEMM row tiles (gemm_bm, a multiple of bwd_bh), so a dV tile never reaches
    # into the next split's partial rows.
    unit = max(bwd_bh, gemm_bm)
    units = _cdiv(H, unit)
    max_ws_rows = min(WORKSPACE_BYTES // (rows * elem), H // WORKSPACE_FRACTION)
    max_units = max(1, max_ws_rows // unit)
    n_chunks = _cdiv(units, max_units)
    ws_rows = _cdiv(units, n_chunks) * unit
    chunk_tiles = ws_rows // bwd_bh
    n_btiles = rows // bwd_bb
    # (batch chunks cost fp32 partials of dW: one wave at >= 90% busy is enough)
    bchunks = _fill(chunk_tiles, n_btiles, sms, min(n_btiles, 64), min_waves=1)
    btiles = _cdiv(n_btiles, bchunks)
    bchunks = _cdiv(n_btiles, btiles)  # no empty chunk
    p = Plan(B, k, H, C, elem, interpret, sms, KP, C1, C2, _round_up(H, H_ALIGN), rows,
             fwd_bb, fwd_bh, fwd_splits, bwd_bb, bwd_bh, bchunks, btiles, ws_rows, n_chunks,
             gemm_bm, gemm_bk, 1, 1)
    # pass 2: dz (M = batch, K = the chunk's units) and dV (M = the chunk's units, K = batch) in one
    # launch; its programs run long loops: one wave at >= 90% busy is enough
    dv_splits, dz_splits = _pass2_splits(p)
    return p._replace(dv_splits=dv_splits, dz_splits=dz_splits)


# ----------------------------------------------------------------------------------- the launches
class Buf(NamedTuple):
    """A tensor argument: a named buffer of the call (see `buffers`), from row `row0` on."""

    name: str
    row0: int = 0


class Desc(NamedTuple):
    """A TMA tensor descriptor over buffer `name` viewed as 2-D `shape` with row stride `stride`
    (elements), loading / storing `block` tiles; out-of-bounds elements read as zero."""

    name: str
    shape: Tuple[int, int]
    stride: int
    block: Tuple[int, int]


class Stride(NamedTuple):
    """A stride of a user tensor, read when the launch is bound to real tensors."""

    name: str
    dim: int


class Launch(NamedTuple):
    kernel: str  # key of KERNELS
    grid: Tuple[int, ...]
    args: Dict[str, Any]  # kernel parameter -> Buf / Desc / Stride / number / constexpr
    autotuned: bool = True


class BufSpec(NamedTuple):
    shape: Tuple[int, ...]
    dtype: str  # "op" (the operands' dtype), "f32", "out" (the output's dtype: y / loss)
    role: str  # "input" (made by the launcher from the user's tensors) or "scratch" or "output"


def _consts(p, has_b1, activation_code, dot_precision):
    return dict(KP=p.KP, C1=p.C1, C2=p.C2, HAS_B1=has_b1, ACTIVATION=activation_code,
                DOT_PRECISION=dot_precision)


def b_key(B):
    """Autotune key of the batch size: its power-of-two bucket (tiles per program change with it)."""
    return _next_pow2(max(1, B))


def forward_buffers(p):
    return {
        "z_pad": BufSpec((p.rows, p.KP), "op", "input"),
        "V_pad": BufSpec((p.H_pad, p.KP), "op", "input"),
        "b1_pad": BufSpec((p.H_pad,), "op", "input"),
        "W_tma": BufSpec((p.C, p.H_pad), "op", "input"),  # W, or W with rows padded to 16 bytes
        "yp": BufSpec((p.fwd_splits * p.rows, p.CP), "f32", "scratch"),
    }


def forward_launches(p, has_b1, activation_code, dot_precision):
    """The forward's fwd launch (the reduce that follows is `reduce_launch`)."""
    per, rest = p.split_tiles()
    args = {
        "Z": Buf("z_pad"),
        "V": Desc("V_pad", (p.H_pad, p.KP), p.KP, (p.fwd_block_h, p.KP)),
        "B1": Buf("b1_pad"),
        "W1": Desc("W_tma", (p.C, p.H), Stride("W_tma", 0), (p.C1, p.fwd_block_h)),
        "W2": Desc("W_tma", (p.C, p.H), Stride("W_tma", 0), (max(p.C2, 16), p.fwd_block_h)),
        "YP1": Desc("yp", (p.fwd_splits * p.rows, p.CP), p.CP, (p.fwd_block_b, p.C1)),
        "YP2": Desc("yp", (p.fwd_splits * p.rows, p.CP), p.CP, (p.fwd_block_b, max(p.C2, 16))),
        "H": p.H, "n_splits": p.fwd_splits, "per": per, "rest": rest, "rows": p.rows,
        "B_KEY": b_key(p.B),
        **_consts(p, has_b1, activation_code, dot_precision),
        "BLOCK_B": p.fwd_block_b, "BLOCK_H": p.fwd_block_h,
    }
    return [Launch("fwd", (p.rows // p.fwd_block_b, p.fwd_splits), args)]


def backward_buffers(p):
    bufs = {
        "z_pad": BufSpec((p.rows, p.KP), "op", "input"),
        "dy_pad": BufSpec((p.rows, p.CP), "op", "input"),
        "dy_scale": BufSpec((1,), "f32", "input"),
        "V": BufSpec((p.H, p.k), "op", "input"),
        "b1": BufSpec((p.H,), "op", "input"),
        "W_tma": BufSpec((p.C, p.H_pad), "op", "input"),
        "da": BufSpec((p.ws_rows, p.rows), "op", "scratch"),
        "vp": BufSpec((p.ws_rows, p.KP), "op", "scratch"),
        "dzp": BufSpec((p.dz_splits, p.rows, p.KP), "f32", "scratch"),
        "dz": BufSpec((p.B, p.k), "op", "output"),  # fp16: in dy / s units (`dz_scaled`)
    }
    if p.bwd_bchunks > 1:
        bufs["dwp"] = BufSpec((p.bwd_bchunks, p.CP, p.H_pad), "f32", "scratch")
        bufs["db1p"] = BufSpec((p.bwd_bchunks, p.H_pad), "f32", "scratch")
    if p.dv_splits > 1:  # one chunk's dV partials, summed after each chunk
        bufs["dvp"] = BufSpec((p.dv_splits, p.ws_rows, p.KP), "f32", "scratch")
    bufs.update(dV=BufSpec((p.H, p.k), "op", "output"), dW=BufSpec((p.C, p.H), "op", "output"),
                db1=BufSpec((p.H,), "op", "output"))
    return bufs


def dz_scaled(dtype):
    """Whether the dz reduction applies the dy scale s (dz in real units): for every dtype but
    fp16, whose dz stays in dy / s units (dz itself can be subnormal there) and whose dx, dU take
    s after their GEMMs. s is a power of two, so either way gives the same bits elsewhere."""
    return dtype != torch.float16


def backward_launches(p, has_b1, activation_code, dot_precision, scale_dz=True):
    """Every launch of the backward, in order: per chunk pass 1 and the pass-2 launch (and dV's
    split reduction), then the reductions (dz times the dy scale when scale_dz)."""
    out = []
    consts = _consts(p, has_b1, activation_code, dot_precision)
    bk, bm, KH = p.gemm_block_k, p.gemm_block_m, p.KP // 2
    split_dw = p.bwd_bchunks > 1
    for c in range(p.n_chunks):
        h0, n = p.chunk(c)
        da = ("da", (n, p.rows), p.rows)
        out.append(Launch("bwd", (n // p.bwd_block_h, p.bwd_bchunks), {
            "Z": Desc("z_pad", (p.rows, p.KP), p.KP, (p.bwd_block_b, p.KP)),
            "DY1": Desc("dy_pad", (p.rows, p.CP), p.CP, (p.bwd_block_b, p.C1)),
            "DY2": Desc("dy_pad", (p.rows, p.CP), p.CP, (p.bwd_block_b, max(p.C2, 16))),
            "DA": Desc(*da, (p.bwd_block_h, p.bwd_block_b)),
            "W1": Desc("W_tma", (p.C, p.H), Stride("W_tma", 0), (p.C1, p.bwd_block_h)),
            "W2": Desc("W_tma", (p.C, p.H), Stride("W_tma", 0), (max(p.C2, 16), p.bwd_block_h)),
            "V": Buf("V"), "B1": Buf("b1"), "DYS": Buf("dy_scale"), "VP": Buf("vp"),
            "DW": Buf("dwp" if split_dw else "dW"), "DB1": Buf("db1p" if split_dw else "db1"),
            "H": p.H, "C": p.C, "k": p.k, "h_begin": h0, "n_btiles": p.bwd_btiles,
            "stride_vh": Stride("V", 0), "stride_vk": Stride("V", 1), "stride_b1": Stride("b1", 0),
            "stride_dwc": p.H_pad if split_dw else Stride("dW", 0),
            "chunk_dw": p.CP * p.H_pad if split_dw else 0, "chunk_db1": p.H_pad if split_dw else 0,
            "B_KEY": b_key(p.B), **consts, "BLOCK_B": p.bwd_block_b, "BLOCK_H": p.bwd_block_h}))
        # pass 2: dz_s += DA (rows x n) @ VP (n x KP), split over the chunk's hidden units, and
        # dV rows h0 .. h0 + n = DAᵀ (n x rows) @ z (rows x KP), split over the batch
        split_dv = p.dv_splits > 1
        (n_dz, dz_n_k), (n_dv, dv_n_k) = pass2_programs(p, n)
        out.append(Launch("gemm", (n_dz + n_dv,), {
            "DA_Z": Desc(*da, (bk, bm)),
            "VP_LO": Desc("vp", (n, p.KP), p.KP, (bk, KH)),
            "VP_HI": Desc("vp", (n, p.KP), p.KP, (bk, KH)),
            "DZP": Buf("dzp"),
            "DZP_LO": Desc("dzp", (p.dz_splits * p.rows, p.KP), p.KP, (bm, KH)),
            "DZP_HI": Desc("dzp", (p.dz_splits * p.rows, p.KP), p.KP, (bm, KH)),
            "DA_V": Desc(*da, (bm, bk)),
            "Z_LO": Desc("z_pad", (p.rows, p.KP), p.KP, (bk, KH)),
            "Z_HI": Desc("z_pad", (p.rows, p.KP), p.KP, (bk, KH)),
            "DV": Buf("dvp" if split_dv else "dV"), "SCALE": Buf("dy_scale"),
            "n_dz": n_dz, "dz_tiles": p.rows // bm, "dz_n_k": dz_n_k, "rows": p.rows,
            "dv_tiles": _cdiv(n, bm), "dv_n_k": dv_n_k,
            "dv_M": n if split_dv else min(n, p.H - h0), "dv_N": p.KP if split_dv else p.k,
            "dv_row0": 0 if split_dv else h0, "dv_part_rows": p.ws_rows if split_dv else 0,
            "stride_dv": p.KP if split_dv else Stride("dV", 0), "B_KEY": b_key(p.B),
            "DZ_ACCUMULATE": c > 0, "DOT_PRECISION": dot_precision,
            "BLOCK_M": bm, "BLOCK_N": p.KP, "BLOCK_K": bk}))
        if split_dv:
            out.append(reduce_launch(p, "dvp", p.dv_splits, min(n, p.H - h0), p.k, p.KP,
                                     out=Buf("dV", h0)))
    out.append(reduce_launch(p, "dzp", p.dz_splits, p.B, p.k, p.KP, out="dz",
                             scale="dy_scale" if scale_dz else None))
    if split_dw:
        out.append(reduce_launch(p, "dwp", p.bwd_bchunks, p.C, p.H, p.H_pad, out="dW"))
        if has_b1:
            out.append(reduce_launch(p, "db1p", p.bwd_bchunks, 1, p.H, p.H_pad, out="db1_row"))
    return out


REDUCE_BLOCKS = {False: (32, 128), True: (16, 16)}  # (BLOCK_M, BLOCK_N): GPU, interpreter
# 16 elements per thread: at 4 warps (32) ptxas spilled 8 bytes of the TF32 dW reduction
REDUCE_WARPS = {False: 8, True: 1}


def reduce_launch(p, parts, n_splits, M, N, row_stride, out=None, bias=None, mimic=None,
                  scale=None):
    """Σ over the split axis of fp32 parts (S, *, row_stride)[:, :M, :N] (+ bias, x the (1,)
    buffer `scale`) into `out`, or with mimic=(teacher, reduction) the loss epilogue writing
    dy_unit and the loss."""
    bm, bn = REDUCE_BLOCKS[p.interpret]
    grid = (_cdiv(M, bm), _cdiv(N, bn))
    reduction = mimic[1] if mimic else None
    out = Buf(out) if isinstance(out, str) else out
    args = {
        "P": Buf(parts), "BIAS": Buf(bias or "_dummy"), "SCALE": Buf(scale or "_dummy"),
        "OUT": out or Buf("_dummy"),
        "T": Buf(mimic[0] if mimic else "_dummy"), "DY": Buf("dy_unit" if mimic else "_dummy"),
        "LOSS": Buf("loss" if mimic else "_dummy"),
        "n_splits": n_splits, "M": M, "N": N,
        "dy_scale": {"mean": 2.0 / (M * N), "sum": 2.0, "none": 2.0}.get(reduction, 0.0),
        "stride_ps": _split_stride(parts, p, row_stride), "stride_pm": row_stride,
        "stride_bias": Stride(bias, 0) if bias else 0,
        "stride_om": Stride(out.name, 0) if out else 0,
        "stride_on": Stride(out.name, 1) if out else 0,
        "stride_tm": Stride(mimic[0], 0) if mimic else 0,
        "stride_tn": Stride(mimic[0], 1) if mimic else 0,
        "stride_dym": N if mimic else 0,
        "HAS_BIAS": bias is not None, "SCALED": scale is not None, "STORE_OUT": out is not None,
        "MIMIC": mimic is not None,
        "LOSS_ELEMENTWISE": reduction == "none", "BLOCK_M": bm, "BLOCK_N": bn,
        "num_warps": REDUCE_WARPS[p.interpret],
    }
    return Launch("reduce", grid, args, autotuned=False)


def _split_stride(parts, p, row_stride):
    """Elements between two splits of a partial buffer of this plan."""
    return {"yp": p.rows * row_stride, "dzp": p.rows * row_stride,
            "dvp": p.ws_rows * row_stride, "dwp": p.CP * row_stride,
            "db1p": row_stride}[parts]


def reduce_grid(p, M, N):
    bm, bn = REDUCE_BLOCKS[p.interpret]
    return _cdiv(M, bm) * _cdiv(N, bn)


def pass_launches(p, op, has_b1=True, has_b2=True, activation_code=0, dot_precision=None,
                  reduction="mean", scale_dz=True):
    """Every Triton launch of a pass, in order: op 'forward' (bottleneck_mlp), 'mimic' (mimic_loss
    forward) or 'backward' (scale_dz: `dz_scaled` of the dtype)."""
    if op in ("forward", "mimic"):
        out = forward_launches(p, has_b1, activation_code, dot_precision)
        mimic = ("t", reduction) if op == "mimic" else None
        out.append(reduce_launch(p, "yp", p.fwd_splits, p.B, p.C, p.CP,
                                 bias="b2" if has_b2 else None, out=None if mimic else "y",
                                 mimic=mimic))
        return out
    if op == "backward":
        return backward_launches(p, has_b1, activation_code, dot_precision, scale_dz)
    raise ValueError(f"unknown op {op!r}: expected 'forward', 'mimic' or 'backward'")


def tile_macs(kernel, args):
    """Multiply-adds one program's main-loop iteration does on its tile (what its wgmmas must
    issue, padding included): the replication check's denominator."""
    if kernel == "fwd":
        return args["BLOCK_B"] * args["BLOCK_H"] * (args["KP"] + args["C1"] + args["C2"])
    if kernel == "bwd":  # aᵀ (k), dW_jᵀ (C), dhᵀ (C)
        return args["BLOCK_H"] * args["BLOCK_B"] * (args["KP"] + 2 * (args["C1"] + args["C2"]))
    if kernel == "gemm":
        return args["BLOCK_M"] * args["BLOCK_N"] * args["BLOCK_K"]
    return 0
