"""Backend selection: the one place that decides which implementation serves a call.

A backend is a module under mimic_fast/ops exposing

    NAME: str
    availability() -> str | None          # None when usable here, else why not (built? driver?)
    reasons(p: Problem) -> list[str]      # why it cannot serve these inputs (empty: it can)
    describe() -> dict                    # versions / build facts for mf.info()
    mlp_fwd(x, U, V, b1, W, b2, activation) -> (y, z)
    mlp_bwd(dy, x, z, U, V, b1, W, activation, has_b2, need_dx) -> (dx, dU, dV, db1, dW, db2)
    mimic_fwd(x, U, V, b1, W, b2, t, activation, reduction) -> (loss, z, dy_unit)
    logit_mse_loss(s, t, reduction, zero_mean) -> loss   # optional: the loss ops (LOSS_OPS), with
    kd_loss(s, t, temperature) -> loss                   # autograd; loss in float32 or s's dtype
    auto_reasons(p: Problem) -> list[str]  # optional: why `auto` should pass over it (it still
                                          # serves the inputs when named)

x is (B, D) (any strides), b1/b2 may be None; z is whatever the backend wants saved for backward
(x Uᵀ, (B, k)); y and loss are in x's dtype; dy may be x's dtype or float32; dy_unit is
∂loss/∂y for a unit upstream gradient (float32, (B, C)), scaled by the real one in backward.
need_dx (positional, required, the argument after has_b2 in every backend's mlp_bwd and custom op)
is autograd's ctx.needs_input_grad for x: when False the backend neither computes dx = dz U (2BDk
FLOPs) nor allocates it, and returns dx = None (a student's x is data, and eager PyTorch skips it).
`auto` picks the first backend in AUTO_ORDER for the device that can serve the inputs, and never
catches a failure of the chosen one. A backend without a function for an op (the loss ops are
optional) cannot serve it, and says so among its reasons.
"""
import importlib
import platform
from typing import NamedTuple

import torch

BACKENDS = ("reference", "cpu", "triton", "cuda")
AUTO_ORDER = {"cuda": ("triton", "cuda", "reference"), "cpu": ("cpu", "reference")}
# Why AUTO_ORDER is what it is (mf.info() shows it). CUDA: no GPU figure has been measured yet, so
# the fused Triton kernels (no (B, H) traffic at all) come before the chunked cuBLAS backend by
# design, not by measurement; scripts/gpu_check.sh measures both side by side to replace this rule.
# CPU: the cpu backend in every dtype: the only other CPU backend, reference, runs the same chunked
# algorithm as PyTorch ops and is slower everywhere; an unfused eager path is not offered because
# no backend may hold the (B, H) hidden layer. Where the cpu backend is not faster than plain
# PyTorch, the reason says so (figures: benchmarks/NOTES.md, cpu backend).
AUTO_REASON = ("on CUDA a fixed order, not measured: no GPU benchmark has been committed yet, so the "
               "fused triton kernels come first by design, then cuda, then reference. On CPU the cpu "
               "backend in every dtype (its compute path per dtype is in its entry): reference runs "
               "the same chunked algorithm in PyTorch ops and is slower, and no backend holds the "
               "(B, H) hidden layer, so there is no unfused alternative. Against plain PyTorch "
               "(measured on a 2-core AVX2 EPYC, B=256, D=1845, k=250, C=183): inference 1.1-1.5x; "
               "fp32 training 1.2-1.3x at H=32768 and 1.0-1.1x at H=8000 with x needing no grad "
               "(0.95x at 2 threads under load: the backward's recompute of the hidden layer is ~15% "
               "more FLOPs and eager's (B, H) tensors are cheap there); "
               "bf16 6-55x where the CPU lacks bf16 matrix units (plain PyTorch emulates bf16 GEMMs, "
               "the cpu backend computes in float32); steps under ~1 ms (tiny B and H) are slower "
               "than plain PyTorch by a fixed ~0.2 ms per call; the native bf16/fp16 path on "
               "AMX / AVX512-BF16 CPUs is not measured yet")
LOSS_AUTO_REASON = ("logit_mse_loss / kd_loss: the first backend in the same order that has the op "
                    "and can serve the inputs (cuda's one-pass kernels on CUDA; elsewhere the "
                    "reference's PyTorch ops, as the cpu and triton backends have no loss ops)")
_MODULES = {
    "reference": "mimic_fast.ops.reference",
    "cpu": "mimic_fast.ops.cpu",
    "triton": "mimic_fast.ops.triton_fused",
    "cuda": "mimic_fast.ops.cuda",
}
_loaded = {}
_import_errors = {}


# Problem.op -> the backend function that serves it, and the public op it serves.
OP_FUNCTIONS = {"mlp": "mlp_fwd", "mimic": "mimic_fwd", "logit_mse": "logit_mse_loss", "kd": "kd_loss"}
PUBLIC_OPS = {"mlp": "bottleneck_mlp", "mimic": "mimic_loss", "logit_mse": "logit_mse_loss",
              "kd": "kd_loss"}
LOSS_OPS = ("logit_mse", "kd")


class Problem(NamedTuple):
    """What a backend needs to know to say whether it can serve a call.

    For the loss ops (LOSS_OPS) dtype is the student logits', teacher_dtype the teacher's, B the
    number of rows and C the logits per row; D, k, H are 0 and activation is None.
    """

    op: str  # "mlp", "mimic", "logit_mse" or "kd"
    device: torch.device
    dtype: torch.dtype
    B: int
    D: int
    k: int
    H: int
    C: int
    activation: str
    teacher_dtype: object = None  # torch.dtype for "mimic"


def loss_problem(op, student_logits, teacher_logits):
    """The Problem of a loss op on (..., C) logits (already validated)."""
    C = student_logits.shape[-1]
    rows = student_logits.numel() // C if C else 0
    return Problem(op, student_logits.device, student_logits.dtype, rows, 0, 0, 0, C, None,
                   teacher_logits.dtype)


def implements(name, op):
    """Whether backend `name` has a function for `op` (a key of OP_FUNCTIONS)."""
    module = _load(name)
    return module is not None and hasattr(module, OP_FUNCTIONS[op])


def _import_all():
    # Imported eagerly, once: torch.compile cannot trace importlib, and every backend module is
    # light (kernels compile on first use). An ImportError is kept and reported, never raised here.
    for name, path in _MODULES.items():
        try:
            _loaded[name] = importlib.import_module(path)
        except ImportError as e:
            _import_errors[name] = f"{type(e).__name__}: {e}"
            _loaded[name] = None


def _load(name):
    """The backend module, or None when it could not be imported (the error is kept for info)."""
    return _loaded[name]


def get(name):
    module = _load(name)
    if module is None:
        raise RuntimeError(f"backend {name!r} could not be imported: {_import_errors[name]}")
    return module


def why_not(name, problem):
    """Every reason backend `name` cannot serve `problem` (empty list: it can)."""
    module = _load(name)
    if module is None:
        return [f"it could not be imported ({_import_errors[name]})"]
    unavailable = module.availability()
    if unavailable is not None:
        return [unavailable]
    if not implements(name, problem.op):
        return [f"it has no {PUBLIC_OPS[problem.op]} op"]
    return list(module.reasons(problem))


def _auto_why_not(name, problem):
    reasons = why_not(name, problem)
    module = _load(name)
    if not reasons and hasattr(module, "auto_reasons"):
        reasons = list(module.auto_reasons(problem))
    return reasons


def select(backend, problem):
    """Name of the backend that serves `problem`; ValueError listing every reason if none can."""
    if backend == "auto":
        order = AUTO_ORDER.get(problem.device.type, ("reference",))
        for name in order:
            if not _auto_why_not(name, problem):
                return name
        tried = "; ".join(f"{n}: {', '.join(_auto_why_not(n, problem))}" for n in order)
        raise ValueError(f"no backend can serve these inputs ({tried})")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected 'auto' or one of {', '.join(BACKENDS)}")
    reasons = why_not(backend, problem)
    if reasons:
        raise ValueError(f"backend {backend!r} cannot serve these inputs: " + "; ".join(reasons))
    return backend


def info():
    """What is available here: each backend, whether it can be used, why not, and versions."""
    report = {
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_cuda": torch.version.cuda},
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "backends": {},
        "auto": {"order": {dev: list(order) for dev, order in AUTO_ORDER.items()}, "why": AUTO_REASON,
                 "losses": LOSS_AUTO_REASON},
    }
    try:
        import triton

        report["versions"]["triton"] = triton.__version__
    except ImportError:
        report["versions"]["triton"] = None
    for name in BACKENDS:
        module = _load(name)
        if module is None:
            entry = {"available": False, "reason": f"could not be imported ({_import_errors[name]})"}
        else:
            reason = module.availability()
            entry = {"available": reason is None, "reason": reason,
                     "ops": [PUBLIC_OPS[op] for op in OP_FUNCTIONS if implements(name, op)]}
            entry.update(module.describe())
        report["backends"][name] = entry
    return report


def format_info(report=None):
    """mf.info() as a short human-readable table."""
    report = report or info()
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
             f"cuda device: {report['cuda_device']}", "backend    available  why not / details"]
    for name, entry in report["backends"].items():
        details = entry["reason"] or ", ".join(
            f"{k}={'/'.join(v) if k == 'ops' else v}" for k, v in entry.items()
            if k not in ("available", "reason"))
        lines.append(f"{name:<10} {'yes' if entry['available'] else 'no':<10} {details}")
    auto = report.get("auto")
    if auto:
        lines.append("auto: " + "; ".join(f"{dev}: {' > '.join(o)}" for dev, o in auto["order"].items())
                     + f" ({auto['why']})")
        if auto.get("losses"):
            lines.append(f"auto for the losses: {auto['losses']}")
    return "\n".join(lines)


_import_all()
