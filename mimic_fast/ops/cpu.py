"""CPU backend: the C++ ops of csrc/cpu (torch.ops.mimic_fast.cpu_*), streamed over H in chunks.

Per chunk, ATen GEMMs (MKL/oneDNN) plus one fused elementwise epilogue on torch's intra-op thread
pool; the (B, H) hidden layer never exists. float32/float64 natively, bfloat16/float16 computed in
float32. If the extension mimic_fast._C is not built, this backend reports why and `auto` falls back
to the reference backend (one warning at import).
"""
import warnings

import torch

from .._checks import REDUCTION_CODES
from ..activations import ACTIVATION_CODES
from .reference import compute_dtype as _compute_dtype  # same upcast rule as the oracle

NAME = "cpu"
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

try:
    from .. import _C  # noqa: F401  (loading it registers torch.ops.mimic_fast.cpu_*)

    _IMPORT_ERROR = None
except (ImportError, OSError) as e:  # not built, or built against another torch (undefined symbol)
    _IMPORT_ERROR = f"{type(e).__name__}: {e}"
    warnings.warn(f"mimic_fast: the C++ CPU extension mimic_fast._C could not be imported "
                  f"({_IMPORT_ERROR}); the 'reference' backend is used for CPU tensors instead. "
                  f"Build it with `pip install --no-build-isolation -e .`.", RuntimeWarning,
                  stacklevel=2)


if _IMPORT_ERROR is None:
    # Shapes/dtypes only, so torch.compile(fullgraph=True) traces the ops without a graph break.
    @torch.library.register_fake("mimic_fast::cpu_mlp_fwd")
    def _mlp_fwd_fake(x, U, V, b1, W, b2, activation):
        B, C, k = x.shape[0], W.shape[0], U.shape[0]
        return x.new_empty((B, C)), x.new_empty((B, k), dtype=_compute_dtype(x.dtype))

    @torch.library.register_fake("mimic_fast::cpu_mlp_bwd")
    def _mlp_bwd_fake(dy, x, z, U, V, b1, W, activation, has_b2):
        H, C = V.shape[0], W.shape[0]
        return (torch.empty_like(x, memory_format=torch.contiguous_format), U.new_empty(U.shape),
                V.new_empty(V.shape), V.new_empty((H if b1 is not None else 0,)), W.new_empty(W.shape),
                W.new_empty((C if has_b2 else 0,)))

    @torch.library.register_fake("mimic_fast::cpu_mimic_fwd")
    def _mimic_fwd_fake(x, U, V, b1, W, b2, teacher, activation, reduction):
        B, C, k = x.shape[0], W.shape[0], U.shape[0]
        cd = _compute_dtype(x.dtype)
        loss = x.new_empty((B, C)) if reduction == REDUCTION_CODES["none"] else x.new_empty(())
        return loss, x.new_empty((B, k), dtype=cd), x.new_empty((B, C), dtype=cd)


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
    return {"parallel_backend": _parallel_backend(), "threads": torch.get_num_threads(),
            "chunk_h_at_B256": int(torch.ops.mimic_fast.cpu_chunk_h(256, 1 << 30))}


def mlp_fwd(x, U, V, b1, W, b2, activation):
    return torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, ACTIVATION_CODES[activation])


def mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2):
    dx, dU, dV, db1, dW, db2 = torch.ops.mimic_fast.cpu_mlp_bwd(
        dy, x, z, U, V, b1, W, ACTIVATION_CODES[activation], has_b2)
    # The schema cannot return None: absent bias gradients come back empty.
    return dx, dU, dV, (db1 if b1 is not None else None), dW, (db2 if has_b2 else None)


def mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction):
    return torch.ops.mimic_fast.cpu_mimic_fwd(x, U, V, b1, W, b2, t, ACTIVATION_CODES[activation],
                                              REDUCTION_CODES[reduction])
