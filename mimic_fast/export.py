"""Ship the student: write a trained model as plain PyTorch/ONNX ops, with no mimic_fast inside.

The fused layers are first turned back into nn.Linear + activation (convert.unfuse, on a copy), so
the artefact runs anywhere torch.export or ONNX runs — the fused kernels are a training-time and
large-H win; at inference a plain GEMM chain is what runtimes optimise. Formats:
  - "torch-export": torch.export.export + torch.export.save (.pt2; load with torch.export.load),
  - "onnx": torch.onnx.export(dynamo=True) (needs onnx + onnxscript: pip install mimic_fast[export]).
The batch dimension stays dynamic; each file is checked against the model after it is written
(the .pt2 with torch.export.load, the ONNX file with onnxruntime when installed, else onnx.checker).
"""
import contextlib
import copy
import logging
import statistics
import time

import torch
from torch import nn

from .convert import unfuse
from .nn import BottleneckLinear, WideShallowStudent

__all__ = ["export_student", "load_exported", "latency", "FORMATS"]

FORMATS = ("onnx", "torch-export")
_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _example(model, input_shape):
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None:
        for m in model.modules():
            if isinstance(m, (nn.Linear, BottleneckLinear, WideShallowStudent)):
                input_shape = (m.in_features,)
                break
            if isinstance(m, nn.modules.conv._ConvNd):
                break
    if input_shape is None:
        raise ValueError(f"cannot tell the input shape of a {type(model).__name__}: pass "
                         "input_shape (one row's shape, e.g. (3, 32, 32)) / --input-shape")
    # batch 2: torch.export specialises a size-1 dimension, which would fix the batch to 1
    return torch.randn(2, *tuple(input_shape), dtype=dtype,
                       device=p.device if p is not None else "cpu")


def plain_model(model):
    """A copy of `model` in eval mode with every fused layer as plain nn.Linear + activation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return unfuse(copy.deepcopy(model)).eval()


def export_student(model, path, format="onnx", input_shape=None, check=True):
    """Write `model` (any module; fused layers are unfused on a copy) to `path` as plain ops.

    format: "onnx" or "torch-export"; input_shape: one row's shape (default: the model's
    `input_shape` or its first Linear's in_features). The batch dimension is dynamic. With check,
    the written file is run on a random batch and compared with `model` (ValueError if it differs).
    Returns `path`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    plain = plain_model(model)
    example = _example(plain, input_shape)
    batch = {0: torch.export.Dim("batch")}
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
        except ImportError:
            raise ValueError("ONNX export needs onnx and onnxscript: pip install "
                             "'mimic_fast[export]'") from None
    try:
        with torch.no_grad(), _quiet_onnx():
            if format == "torch-export":
                program = torch.export.export(plain, (example,), dynamic_shapes=(batch,))
                torch.export.save(program, path)
            else:
                torch.onnx.export(plain, (example,), path, dynamo=True, dynamic_shapes=(batch,),
                                  input_names=["x"], output_names=["logits"], verbose=False)
    except Exception as e:  # torch.export / dynamo raise many kinds; keep the cause chained
        raise ValueError(f"could not export the {type(model).__name__} as {format}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if check:
        _check(model, path, format, example)
    return path


@contextlib.contextmanager
def _quiet_onnx():
    # torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent.
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def load_exported(path, format):
    """A callable x (torch.Tensor) -> logits (torch.Tensor) running the exported file."""
    if format == "torch-export":
        return torch.export.load(path).module()
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # same threads as torch: a fair race
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x):
        return torch.from_numpy(session.run(None, {name: x.detach().cpu().numpy()})[0])

    run.session = session
    return run


def _check(model, path, format, example):
    if format == "onnx":
        import onnx

        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
        foreign = sorted({n.domain for n in proto.graph.node if n.domain not in ("", "ai.onnx")})
        if foreign:
            raise ValueError(f"{path} uses custom ONNX op domains {foreign}: not plain ops")
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            return  # checked structurally only
    else:
        graph = torch.export.load(path).graph
        custom = [str(n.target) for n in graph.nodes if "mimic_fast" in str(n.target)]
        if custom:
            raise ValueError(f"{path} still calls mimic_fast ops {custom}")
    x = torch.randn(3, *example.shape[1:], dtype=example.dtype, device=example.device)
    run = load_exported(path, format)
    was = model.training
    model.eval()
    with torch.no_grad():
        want = model(x).float().cpu()
        got = run(x).float().cpu()
    model.train(was)
    err = (got - want).abs().max().item()
    tol = _TOL.get(example.dtype, 1e-4) * max(1.0, want.abs().max().item())
    if not err <= tol:
        raise ValueError(f"{path} ({format}) differs from the model by {err:.3g} (> {tol:.3g})")


def _median_seconds(fns, x, min_time=0.5):
    """Median seconds per call of each function, calls interleaved (a busy machine slows all alike)."""
    for fn in fns:
        fn(x)  # warm-up
    times, start = [[] for _ in fns], time.perf_counter()
    while time.perf_counter() - start < min_time or len(times[0]) < 10:
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn(x)
            ts.append(time.perf_counter() - t0)
    return [statistics.median(ts) for ts in times]


def latency(model, path, format, batch_sizes=(1, 256), input_shape=None):
    """Median CPU seconds per batch of the fused `model` and of the exported file, per batch size:
    [{"batch": b, "fused_s": ..., "exported_s": ...}, ...], both on torch's current thread count."""
    run = load_exported(path, format)
    example = _example(model, input_shape)
    rows = []
    model = model.eval()
    with torch.no_grad():
        for b in batch_sizes:
            x = torch.randn(b, *example.shape[1:], dtype=example.dtype)
            fused_s, exported_s = _median_seconds((model, run), x)
            rows.append({"batch": b, "fused_s": fused_s, "exported_s": exported_s})
    return rows
