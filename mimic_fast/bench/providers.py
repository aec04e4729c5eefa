"""Benchmark cases, their inputs, and the providers that compute each op (fused or baseline).

A provider is a name: "eager" (unfused nn.Linear-style chain + F.mse_loss), "compile" (torch.compile
of eager), "reference" | "cpu" | "triton" | "cuda" (mf backends through the public API), "onnx" (the
student exported by mimic_fast.export and run in onnxruntime: bottleneck_mlp inference, float32, CPU),
and for the logit losses "mf" (mf.logit_mse_loss / mf.kd_loss) and "cuda" (mimic_fast.ops.cuda's
loss kernels). Passes: forward, backward (timed alone, its forward untimed), full (forward +
backward: for mimic_loss the training step), inference (forward under torch.no_grad). Every
provider is checked against the float64 reference before it is timed.
"""
import contextlib
import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .. import dispatch
from .. import functional as mf
from ..export import export_student
from ..nn import WideShallowStudent
from ..ops import cpu as cpu_ops
from ..ops import flops
from ..testing import ATOL_2X, TOLERANCES, assert_close, assert_within_2x
from ..testing import eager_mlp as _eager_mlp

MLP_OPS = ("bottleneck_mlp", "mimic_loss")
LOSS_OPS = ("logit_mse_loss", "kd_loss")
OPS = MLP_OPS + LOSS_OPS
MLP_PROVIDERS = ("eager", "compile", "reference", "cpu", "triton", "cuda", "onnx")
LOSS_PROVIDERS = ("eager", "compile", "mf", "cuda")
PASSES = ("forward", "backward", "full", "inference")
KD_TEMPERATURE = 4.0


@dataclass(frozen=True)
class Case:
    """One op at one shape, dtype and device (D, k, H are 0 for the logit losses)."""

    op: str
    B: int
    C: int
    D: int = 0
    k: int = 0
    H: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    activation: str = "relu"
    input_grad: bool = False  # count dx in the backward's FLOPs (issue 17's training-step count)

    @property
    def torch_dtype(self):
        return getattr(torch, self.dtype)

    @property
    def is_mlp(self):
        return self.op in MLP_OPS

    def shape(self):
        if self.is_mlp:
            return {"B": self.B, "D": self.D, "k": self.k, "H": self.H, "C": self.C}
        return {"B": self.B, "C": self.C}

    def label(self):
        return "-".join(f"{k}{v}" for k, v in self.shape().items())

    def flops(self, pass_):
        pass_ = "forward" if pass_ == "inference" else pass_
        if self.is_mlp:
            return flops.mlp_flops(self.B, self.D, self.k, self.H, self.C, pass_,
                                   input_grad=self.input_grad)
        return flops.loss_flops(self.B, self.C, pass_)

    def bytes(self, pass_):
        """Bytes of the unavoidable traffic: the logits for the losses; weights + x + y for the MLP."""
        es = flops.element_size(self.dtype)
        pass_ = "forward" if pass_ == "inference" else pass_
        if not self.is_mlp:
            return flops.loss_bytes(self.B, self.C, self.dtype, pass_)
        weights = (self.k * self.D + self.H * self.k + self.C * self.H + self.H + self.C) * es
        io = (self.B * self.D + 2 * self.B * self.C) * es
        return {"forward": weights + io, "backward": 2 * weights + io, "full": 3 * weights + 2 * io}[pass_]

    def small(self, B=64, H=1000):
        """The same case at a size where the float64 reference is cheap (correctness checks)."""
        if self.is_mlp:
            return Case(self.op, min(self.B, B), self.C, self.D, self.k, min(self.H, H), self.dtype,
                        self.device, self.activation, self.input_grad)
        return Case(self.op, min(self.B, 4 * B), self.C, dtype=self.dtype, device=self.device)

    def as_dict(self):
        return asdict(self)


def make_inputs(case, seed=0):
    """Inputs of `case` with O(1)-scale outputs; parameters (and student logits) require grad.

    Returns a dict: MLP ops x, U, V, b1, W, b2, t (teacher logits), dy (upstream grad of y); loss ops
    s, t. x needs no grad: a student's input is data.
    """
    dtype = case.torch_dtype
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=1.0, grad=False):
        t = (torch.randn(*shape, generator=g) * std).to(case.device, dtype)
        return t.requires_grad_(grad)

    if case.is_mlp:
        B, D, k, H, C = case.B, case.D, case.k, case.H, case.C
        return {"x": rnd(B, D), "U": rnd(k, D, std=D ** -0.5, grad=True),
                "V": rnd(H, k, std=k ** -0.5, grad=True), "b1": rnd(H, std=0.5, grad=True),
                "W": rnd(C, H, std=H ** -0.5, grad=True), "b2": rnd(C, std=0.5, grad=True),
                "t": rnd(B, C), "dy": rnd(B, C)}
    return {"s": rnd(case.B, case.C, std=2.0, grad=True), "t": rnd(case.B, case.C, std=2.0)}


def grad_inputs(case, inputs):
    """The tensors a gradient is taken for, in a fixed order."""
    if case.is_mlp:
        return [inputs[n] for n in ("U", "V", "b1", "W", "b2")]
    return [inputs["s"]]


def _eager_mimic(x, U, V, b1, W, b2, t, activation="relu"):
    return F.mse_loss(_eager_mlp(x, U, V, b1, W, b2, activation), t)


def _acc(t):
    # float32 accumulation for half precision, float64 stays float64 (the reference)
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _eager_mse(s, t):
    return F.mse_loss(_acc(s), _acc(t)).to(s.dtype)


def _eager_kd(s, t):
    T = KD_TEMPERATURE
    s32, t32 = _acc(s) / T, _acc(t) / T
    p = F.softmax(t32, dim=-1)
    kl = (p * (F.log_softmax(t32, dim=-1) - F.log_softmax(s32, dim=-1))).sum(-1).mean()
    return (kl * T * T).to(s.dtype)


def cuda_loss_module():
    """mimic_fast.ops.cuda when it imports and is usable here, else None."""
    mod = dispatch._load("cuda")  # None when it could not be imported (dispatch keeps why)
    if mod is None:
        return None
    try:
        if mod.availability() is not None:
            return None
    except Exception:  # noqa: BLE001
        return None
    return mod


def unavailable(provider, case):
    """Why `provider` cannot run `case` here (None: it can)."""
    dev = torch.device(case.device)
    if case.is_mlp:
        if provider.startswith("cpu:"):
            if len(provider.split(":")) != 3 or not provider.split(":")[2].isdigit():
                return f"a cpu variant is cpu:LOOP:CHUNK (e.g. cpu:gemm:512), got {provider!r}"
            provider = "cpu"
        if provider not in MLP_PROVIDERS:
            return f"unknown provider {provider!r} for {case.op}"
        if provider in ("eager", "compile"):
            return None
        if provider == "onnx":
            return onnx_unavailable(case)
        if provider == "triton" and dev.type != "cuda":
            return "triton runs on CPU only under the interpreter (a correctness tool, never timed)"
        problem = dispatch.Problem("mimic" if case.op == "mimic_loss" else "mlp", dev, case.torch_dtype,
                                   case.B, case.D, case.k, case.H, case.C, case.activation,
                                   case.torch_dtype if case.op == "mimic_loss" else None)
        reasons = dispatch.why_not(provider, problem)
        return "; ".join(reasons) if reasons else None
    if provider not in LOSS_PROVIDERS:
        return f"unknown provider {provider!r} for {case.op}"
    if provider == "cuda":
        if dev.type != "cuda":
            return "the CUDA loss kernels need a CUDA device"
        mod = cuda_loss_module()
        if mod is None:
            return "mimic_fast.ops.cuda is not available (not built or no CUDA)"
        if not hasattr(mod, case.op):
            return f"mimic_fast.ops.cuda has no {case.op}"
    return None


def onnx_unavailable(case):
    """Why the exported student cannot run `case` in onnxruntime here (None: it can)."""
    if case.op != "bottleneck_mlp":
        return "the exported ONNX student is an inference model (bottleneck_mlp forward only)"
    if torch.device(case.device).type != "cpu" or case.dtype != "float32":
        return "the ONNX student is timed on CPU in float32 only"
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        return f"onnxruntime/onnxscript are not installed ({e}): pip install 'mimic_fast[export]'"
    return None


def export_onnx(case, inputs, folder, seed=0):
    """Write the student with `inputs`' weights (make_inputs(case, seed)) to onnx_file(folder, case,
    seed) with mimic_fast.export."""
    m = WideShallowStudent(case.D, case.C, case.H, case.k, activation=case.activation)
    with torch.no_grad():
        for name in ("U", "V", "b1", "W", "b2"):
            getattr(m, name).copy_(inputs[name])
    path = onnx_file(folder, case, seed)
    if not os.path.exists(path):  # the same case and seed give the same weights: export once
        export_student(m.eval(), path, "onnx", check=False)
    return path


def onnx_file(folder, case, seed=0):
    return os.path.join(folder, f"{case.label()}-seed{seed}.onnx")


def onnx_forward(path):
    """f(inputs) -> y running `path` in onnxruntime on torch's current thread count (one intra-op
    thread pool of that size, no spinning: idle pool threads would steal the core from the provider
    timed next in the rotation)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda i: torch.from_numpy(session.run(None, {name: i["x"].detach().numpy()})[0])


@contextlib.contextmanager
def cpu_variant(provider):
    """Run the cpu backend as the variant `provider` names ("cpu:LOOP:CHUNK", e.g. "cpu:gemm:512";
    plain "cpu" = its own plan) through the cpu backend's one tuning knob."""
    parts = provider.split(":")
    if len(parts) == 1:
        yield
        return
    with cpu_ops.tuning(chunk_h=int(parts[2]), loop=parts[1]):
        yield


def base_provider(provider):
    """'cpu' for a cpu variant 'cpu:LOOP:CHUNK', else the name itself."""
    return provider.split(":")[0]


def make_forward(provider, case, compile_mode=None, onnx_path=None):
    """f(inputs) -> output (y for bottleneck_mlp, a scalar loss otherwise) for `provider`.

    "onnx" runs the file `onnx_path` (export_onnx), which must hold the inputs' weights.
    """
    act = case.activation
    provider = base_provider(provider)
    if provider == "onnx":
        if case.op != "bottleneck_mlp" or onnx_path is None:
            raise ValueError("the onnx provider runs bottleneck_mlp from an exported file (onnx_path)")
        return onnx_forward(onnx_path)
    if case.op == "bottleneck_mlp":
        if provider in ("eager", "compile"):
            fn = _eager_mlp
            if provider == "compile":
                fn = torch.compile(_eager_mlp, mode=compile_mode, dynamic=False)
            return lambda i: fn(i["x"], i["U"], i["V"], i["b1"], i["W"], i["b2"], act)
        return lambda i: mf.bottleneck_mlp(i["x"], i["U"], i["V"], i["b1"], i["W"], i["b2"], act,
                                           backend=provider)
    if case.op == "mimic_loss":
        if provider in ("eager", "compile"):
            fn = _eager_mimic
            if provider == "compile":
                fn = torch.compile(_eager_mimic, mode=compile_mode, dynamic=False)
            return lambda i: fn(i["x"], i["U"], i["V"], i["b1"], i["W"], i["b2"], i["t"], act)
        return lambda i: mf.mimic_loss(i["x"], i["U"], i["V"], i["b1"], i["W"], i["b2"], i["t"], act,
                                       backend=provider)
    eager = _eager_mse if case.op == "logit_mse_loss" else _eager_kd
    if provider == "eager":
        return lambda i: eager(i["s"], i["t"])
    if provider == "compile":
        fn = torch.compile(eager, mode=compile_mode, dynamic=False)
        return lambda i: fn(i["s"], i["t"])
    if provider == "mf":
        if case.op == "logit_mse_loss":
            return lambda i: mf.logit_mse_loss(i["s"], i["t"])
        return lambda i: mf.kd_loss(i["s"], i["t"], KD_TEMPERATURE)
    if provider == "cuda":
        mod = cuda_loss_module()
        fn = getattr(mod, case.op)
        if case.op == "logit_mse_loss":
            return lambda i: fn(i["s"], i["t"])
        return lambda i: fn(i["s"], i["t"], KD_TEMPERATURE)
    raise ValueError(f"unknown provider {provider!r} for {case.op}")


class Runner:
    """forward / backward / full / inference callables of one provider on one case's inputs."""

    def __init__(self, provider, case, inputs, compile_mode=None, onnx_path=None):
        self.provider, self.case, self.inputs = provider, case, inputs
        self.f = make_forward(provider, case, compile_mode, onnx_path)
        self.wrt = grad_inputs(case, inputs)
        self.grad_out = inputs["dy"] if case.op == "bottleneck_mlp" else None

    def forward(self):
        with cpu_variant(self.provider):
            return self.f(self.inputs)

    def inference(self):
        with torch.no_grad(), cpu_variant(self.provider):
            return self.f(self.inputs)

    def backward(self, out):
        with cpu_variant(self.provider):
            return torch.autograd.grad(out, self.wrt, self.grad_out)

    def full(self):
        return self.backward(self.forward())

    def timed(self, pass_):
        """(fn, setup) for timing.time_fn: backward is timed alone, its forward in the untimed setup."""
        if pass_ == "forward":
            return self.forward, None
        if pass_ == "backward":
            return self.backward, lambda: (self.forward(),)
        if pass_ == "full":
            return self.full, None
        if pass_ == "inference":
            return self.inference, None
        raise ValueError(f"unknown pass {pass_!r}: expected one of {', '.join(PASSES)}")


def _assert(actual, expected, name, dtype, baseline=None):
    """The dtype's tolerance table (atol relative to the tensor's scale: gradients of a mean loss are
    tiny); with an eager baseline in the same dtype, the 2x rule instead for half precision, and as
    the alternative for float32/64, whose error at full size can outgrow the table on long sums."""
    def two_x():
        # A lone low-precision scalar (the loss) may round to the neighbour of eager's value: one
        # ulp of slack, or the 2x rule would fail a correct kernel by chance.
        atol = ATOL_2X[dtype] + (torch.finfo(dtype).eps * float(expected.abs().max())
                                 if expected.numel() == 1 else 0.0)
        assert_within_2x(actual, expected, baseline, name=name, atol=atol)

    if baseline is not None and dtype in (torch.float16, torch.bfloat16):
        two_x()
        return
    rtol, atol = TOLERANCES[dtype]
    scale = max(float(expected.detach().abs().max()), 1e-30) if expected.numel() else 1.0
    try:
        assert_close(actual, expected, name=name, dtype=dtype, rtol=rtol, atol=atol * min(scale, 1.0))
    except AssertionError as table_error:
        if baseline is None:
            raise
        try:
            two_x()
        except AssertionError as e:
            raise AssertionError(f"{table_error}; and {e}") from None


def check_provider(provider, case, compile_mode=None, small=True, seed=0, grads=True, onnx_dir=None):
    """Raise AssertionError unless `provider`'s output (and with grads, every gradient) matches the
    float64 reference; grads=False checks the output under torch.no_grad (the inference pass).

    small=True checks at case.small() (cheap) with the dtype's tolerance table; half precision, and
    any dtype at full size (where float32's own rounding outgrows the table), use the 2x rule against
    eager in the same dtype. "onnx" exports the checked student into `onnx_dir` first.
    """
    c = case.small() if small else case
    dtype = c.torch_dtype
    inputs = make_inputs(c, seed)
    # the reference sees the very inputs the provider gets (rounded to its dtype), in float64: the
    # 2x rule compares errors of the computation, not of the inputs' rounding
    ref_inputs = {n: t.detach().to(torch.float64).requires_grad_(t.requires_grad)
                  for n, t in inputs.items()}
    path = None
    if provider == "onnx":
        if onnx_dir is None:
            raise ValueError("checking the onnx provider needs onnx_dir (where to export it)")
        path = export_onnx(c, inputs, onnx_dir, seed)
    runners = [Runner("reference" if c.is_mlp else "eager", c, ref_inputs),
               Runner(provider, c, inputs, compile_mode, path)]
    if dtype in (torch.float16, torch.bfloat16) or not small:
        runners.append(Runner("eager", c, inputs))
    results = []
    for r in runners:
        if grads:
            out = r.forward()
            results.append([out] + list(r.backward(out)))
        else:
            results.append([r.inference()])
    ref, got = results[0], results[1]
    base = results[2] if len(results) > 2 else [None] * len(got)
    names = ["y" if c.op == "bottleneck_mlp" else "loss"] + \
        (["dU", "dV", "db1", "dW", "db2"] if c.is_mlp else ["ds"])
    for name, a, e, b in zip(names, got, ref, base):
        _assert(a.detach(), e.detach(), f"{provider} {c.op} {name}", dtype,
                None if b is None else b.detach())


def oom_estimate_bytes(provider, case):
    """Rough peak bytes of one full step: eager/compile keep ~4 (B, H) tensors alive; fused ~0."""
    es = flops.element_size(case.dtype)
    weights = flops.mlp_params(case.D, case.k, case.H, case.C) * es if case.is_mlp else 0
    hidden = case.B * case.H * es if case.is_mlp else 0
    factor = 4 if provider in ("eager", "compile") else 0
    return 3 * weights + factor * hidden + math.prod((case.B, max(case.D, case.C))) * es * 4
