"""CPU backend: the C++ ops of csrc/cpu (torch.ops.mimic_fast.cpu_*), streamed over H in chunks.

Per chunk, ATen GEMMs (MKL / oneDNN) plus one fused elementwise epilogue on torch's intra-op thread
pool; the (B, H) hidden layer never exists. The plan of a call (plan(): chunk width, loop order,
compute path) is made here and passed to the C++ ops as arguments:

- compute path, per dtype (compute_path()): float32 / float64 natively. bfloat16 / float16 natively
  (operands in their dtype, MKL's bf16/fp16 -> float32 GEMMs, float32 epilogues and sums) where the
  CPU has a native matmul for the dtype (AMX-BF16 / AVX512-BF16, AMX-FP16) and torch's MKL has the
  GEMMs, read from the CPU's features (never from a timing, so results never depend on the
  machine's load); elsewhere computed in float32: without the matrix units MKL widens to SGEMM
  anyway, and the float32 path keeps h and da in float32 too.
- chunk width: one operand-dtype tile of B x chunk is half of the core's L2 (so the epilogue and the
  GEMMs reading the tile back hit cache), a multiple of 64 in [64, 4096].
- loop order: "auto" lets the C++ op choose by thread count (chunks order when every thread gets
  at least two chunks), "gemm" or "chunks" force one (csrc/cpu/mimic_cpu.cpp explains both).

Tuning knob (tests and benchmarks): `with mimic_fast.ops.cpu.tuning(chunk_h=512, loop="chunks",
native=False): ...` overrides any of the three for the calls inside the block. Users may set the
chunk width with MIMIC_FAST_CPU_CHUNK_H (read once, at the first call; a positive integer).

If the extension mimic_fast._C is not built, this backend reports why and `auto` falls back to the
reference backend (one warning at import).
"""
import contextlib
import os
import warnings
from typing import NamedTuple

import torch

from .._checks import REDUCTION_CODES, is_int
from ..activations import ACTIVATION_CODES

NAME = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LOW_PRECISION = (torch.bfloat16, torch.float16)
LOOPS = ("auto", "gemm", "chunks")
LOOP_CODES = {name: i for i, name in enumerate(LOOPS)}  # the C++ ops' codes
MIN_CHUNK, MAX_CHUNK, CHUNK_STEP = 64, 4096, 64
DEFAULT_L2_BYTES = 2 << 20  # when torch cannot tell the L2 size
CHUNK_ENV = "MIMIC_FAST_CPU_CHUNK_H"

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mimic_fast.cpu_*)

    _IMPORT_ERROR = None
except (ImportError, OSError) as e:  # not built, or built against another torch (undefined symbol)
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(f"mimic_fast: the C++ CPU extension mimic_fast._C could not be imported "
                  f"({_IMPORT_ERROR}); the 'reference' backend is used for CPU tensors instead. "
                  f"Build it with `pip install --no-build-isolation -e .`.", RuntimeWarning,
                  stacklevel=2)


# ---- the compute path of bfloat16 / float16: from the CPU's features -------------------------------
# A native low-precision matmul with float32 accumulation, per dtype: the feature flags of
# torch.cpu.get_capabilities() that provide one.
NATIVE_FEATURES = {
    torch.bfloat16: (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16")),
    # AVX512-FP16 has no float32-accumulating fp16 dot product (MKL / oneDNN widen fp16 to fp32
    # there): only AMX-FP16 is a native fp16 matmul.
    torch.float16: (("amx_fp16", "AMX-FP16"),),
}


def _read_capabilities():
    try:
        return dict(torch.cpu.get_capabilities())
    except (AttributeError, RuntimeError):  # an older torch: the flags it has helpers for
        return {"amx_bf16": torch.cpu._is_amx_tile_supported(),
                "avx512_bf16": torch.cpu._is_avx512_bf16_supported(),
                "amx_fp16": torch.cpu._is_amx_fp16_supported()}


def _read_gemms():
    if _IMPORT_ERROR is not None:
        return {torch.bfloat16: False, torch.float16: False}
    bf16, fp16 = torch.ops.mimic_fast.cpu_native_gemms()
    return {torch.bfloat16: bool(bf16), torch.float16: bool(fp16)}


# Read once, at import (cheap: cpuinfo flags), so that torch.compile traces plan() as plain Python.
_CAPABILITIES = _read_capabilities()
_GEMMS = _read_gemms()


def _capabilities():
    """The CPU's feature flags (torch.cpu.get_capabilities())."""
    return _CAPABILITIES


def _gemms():
    """Whether torch's MKL has the bf16 / fp16 -> float32 GEMMs the native path runs on."""
    return _GEMMS


def compute_path(dtype, capabilities=None, gemms=None):
    """("native" | "float32", why) for `dtype` on this CPU, or on one described by `capabilities`
    (torch.cpu.get_capabilities()-style flags) and `gemms` ({dtype: MKL's dtype -> float32 GEMM
    is linked})."""
    if dtype not in LOW_PRECISION:
        return "native", f"{str(dtype).replace('torch.', '')} GEMMs (MKL)"
    caps = _capabilities() if capabilities is None else capabilities
    gemms = _gemms() if gemms is None else gemms
    name = str(dtype).replace("torch.", "")
    have = [label for flag, label in NATIVE_FEATURES[dtype] if caps.get(flag)]
    wanted = " or ".join(label for _, label in NATIVE_FEATURES[dtype])
    if not have:
        return "float32", (f"computed in float32: this CPU has no {wanted}, so {name} GEMMs would "
                           f"be emulated, slower than float32 ones")
    if not gemms.get(dtype):
        return "float32", (f"computed in float32: the CPU has {', '.join(have)} but this torch has no "
                           f"MKL {name} -> float32 GEMM")
    return "native", (f"native {name} GEMMs with float32 accumulation (MKL on {', '.join(have)}), "
                      f"float32 epilogues and sums")


# ---- the tuning knob and the plan ------------------------------------------------------------------
_tuning = {"chunk_h": None, "loop": None, "native": None}


def _check_tuning(chunk_h, loop, native):
    if chunk_h is not None and not is_int(chunk_h, 1):
        raise ValueError(f"chunk_h must be a positive integer (columns of H per chunk), got {chunk_h!r}")
    if loop is not None and loop not in LOOPS:
        raise ValueError(f"loop must be one of {', '.join(LOOPS)}, got {loop!r}")
    if native is not None and not isinstance(native, bool):
        raise ValueError(f"native must be True, False or None (from the CPU's features), got {native!r}")


@contextlib.contextmanager
def tuning(chunk_h=None, loop=None, native=None):
    """Override the plan of the cpu backend's calls inside the block (None keeps the rule).

    chunk_h: columns of H per chunk; loop: "auto" | "gemm" | "chunks"; native: compute bfloat16 /
    float16 in their own dtype (True) or in float32 (False), whatever the CPU's features say.
    Process-wide (not thread-local); blocks nest, the inner one wins for what it sets.
    """
    _check_tuning(chunk_h, loop, native)
    old = dict(_tuning)
    for key, value in (("chunk_h", chunk_h), ("loop", loop), ("native", native)):
        if value is not None:
            _tuning[key] = value
    try:
        yield
    finally:
        _tuning.update(old)


_env = {}  # CHUNK_ENV's value, once read


def env_chunk_h():
    """MIMIC_FAST_CPU_CHUNK_H as an int (None when unset), read once; a bad value is a ValueError
    (at every call until fixed: forget_environment() reads it again)."""
    if "chunk_h" not in _env:
        value = os.environ.get(CHUNK_ENV, "").strip()
        if value and not (value.isdigit() and int(value) > 0):
            raise ValueError(f"environment variable {CHUNK_ENV}={value!r} must be a positive integer "
                             f"(a chunk width); unset it to let mimic_fast choose")
        _env["chunk_h"] = int(value) if value else None
    return _env["chunk_h"]


def forget_environment():
    """Read MIMIC_FAST_CPU_CHUNK_H again at the next call."""
    _env.clear()


def _l2_bytes():
    return int(_capabilities().get("l2_cache_size") or DEFAULT_L2_BYTES)


def default_chunk_h(B, dtype):
    """Columns per chunk such that one (B, chunk) tile in the GEMMs' dtype is half of the L2."""
    chunk = (_l2_bytes() // 2) // (max(B, 1) * dtype.itemsize)
    return max(MIN_CHUNK, min(MAX_CHUNK, chunk // CHUNK_STEP * CHUNK_STEP))


class Plan(NamedTuple):
    chunk_h: int
    loop: str
    native: bool  # bfloat16 / float16 computed in their own dtype


def plan(B, H, dtype):
    """The plan of one call of batch B, hidden width H, dtype (the tuning knob applied)."""
    if _tuning["native"] is not None:
        native = _tuning["native"] and dtype in LOW_PRECISION
    else:
        native = dtype in LOW_PRECISION and compute_path(dtype)[0] == "native"
    gemm_dtype = dtype if native or dtype not in LOW_PRECISION else torch.float32
    chunk = _tuning["chunk_h"] or env_chunk_h() or default_chunk_h(B, gemm_dtype)
    return Plan(max(1, min(chunk, H)), _tuning["loop"] or "auto", native)


def _z_dtype(dtype, native):
    return dtype if native or dtype not in LOW_PRECISION else torch.float32


if _IMPORT_ERROR is None:
    # Shapes/dtypes only, so torch.compile(fullgraph=True) traces the ops without a graph break.
    @torch.library.register_fake("mimic_fast::cpu_mlp_fwd")
    def _mlp_fwd_fake(x, U, V, b1, W, b2, activation, chunk_h, loop, native):
        B, C, k = x.shape[0], W.shape[0], U.shape[0]
        return x.new_empty((B, C)), x.new_empty((B, k), dtype=_z_dtype(x.dtype, native))

    @torch.library.register_fake("mimic_fast::cpu_mlp_bwd")
    def _mlp_bwd_fake(dy, x, z, U, V, b1, W, activation, has_b2, need_dx, chunk_h, loop, native):
        H, C = V.shape[0], W.shape[0]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_dx \
            else x.new_empty((0,))
        return (dx, U.new_empty(U.shape),
                V.new_empty(V.shape), V.new_empty((H if b1 is not None else 0,)), W.new_empty(W.shape),
                W.new_empty((C if has_b2 else 0,)))

    @torch.library.register_fake("mimic_fast::cpu_mimic_fwd")
    def _mimic_fwd_fake(x, U, V, b1, W, b2, teacher, activation, reduction, chunk_h, loop, native):
        B, C, k = x.shape[0], W.shape[0], U.shape[0]
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        loss = x.new_empty((B, C)) if reduction == REDUCTION_CODES["none"] else x.new_empty(())
        return loss, x.new_empty((B, k), dtype=_z_dtype(x.dtype, native)), x.new_empty((B, C), dtype=acc)


def availability():
    if _IMPORT_ERROR is not None:
        return f"the C++ extension mimic_fast._C is not available ({_IMPORT_ERROR})"
    return None


def reasons(problem):
    out = []
    if problem.device.type != "cpu":
        out.append(f"tensors are on {problem.device}; the cpu backend runs on CPU tensors only")
    if problem.dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {problem.dtype} is not supported (float32, float64, bfloat16, float16)")
    return out


def _parallel_backend():
    for line in torch.__config__.parallel_info().splitlines():
        if line.startswith("ATen parallel backend:"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def describe():
    if _IMPORT_ERROR is not None:
        return {}
    paths, chunks = {}, {}
    for dtype in SUPPORTED_DTYPES:
        name = str(dtype).replace("torch.", "")
        paths[name] = compute_path(dtype)[1]
        chunks[name] = plan(256, 1 << 30, dtype).chunk_h
    info = {"parallel_backend": _parallel_backend(), "threads": torch.get_num_threads(),
            "l2_bytes": _l2_bytes(), "paths": paths, "chunk_h_at_B256": chunks}
    overrides = {k: v for k, v in _tuning.items() if v is not None}
    if overrides:
        info["tuning"] = overrides
    return info


def mlp_fwd(x, U, V, b1, W, b2, activation):
    p = plan(x.shape[0], V.shape[0], x.dtype)
    return torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, ACTIVATION_CODES[activation],
                                            p.chunk_h, LOOP_CODES[p.loop], p.native)


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx):
    p = plan(x.shape[0], V.shape[0], x.dtype)
    # The path is the one forward took (z's dtype tells: a tuning block may have ended since).
    native = x.dtype in LOW_PRECISION and z.dtype == x.dtype
    dx, dU, dV, db1, dW, db2 = torch.ops.mimic_fast.cpu_mlp_bwd(
        dy, x, z, U, V, b1, W, ACTIVATION_CODES[activation], has_b2, need_dx, p.chunk_h,
        LOOP_CODES[p.loop], native)
    # The schema cannot return None: absent gradients (dx not needed, no biases) come back empty.
    return ((dx if need_dx else None), dU, dV, (db1 if b1 is not None else None), dW,
            (db2 if has_b2 else None))


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    p = plan(x.shape[0], V.shape[0], x.dtype)
    return torch.ops.mimic_fast.cpu_mimic_fwd(x, U, V, b1, W, b2, t, ACTIVATION_CODES[activation],
                                              REDUCTION_CODES[reduction], p.chunk_h,
                                              LOOP_CODES[p.loop], p.native)
