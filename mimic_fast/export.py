"""Ship the student: write a trained model as plain PyTorch/ONNX ops, with no mimic_fast inside.

The fused layers are first turned back into nn.Linear + activation (convert.unfuse, on a copy), so
the artefact runs anywhere torch.export or ONNX runs — the fused kernels are a training-time and
large-H win; at inference a plain GEMM chain is what runtimes optimise. Formats:
  - "torch-export": torch.export.export + torch.export.save (.pt2; load with torch.export.load),
  - "onnx": torch.onnx.export(dynamo=True) (needs onnx + onnxscript: pip install
    mimic_fast[export]), one self-contained .onnx file; only weights over protobuf's 2 GB limit
    go to a PATH.data file beside it (a warning names it: ship both).
The batch dimension stays dynamic; each file is checked against the model after it is written
(the .pt2 with torch.export.load, the ONNX file with onnxruntime when installed, else onnx.checker).
Files are written in a temp folder beside the target under their final names (an .onnx keeps its
reference to its .data), checked there, then renamed into place: a failed check or a kill leaves
the old file intact, and a target that is a symbolic link is refused (mimic_fast._io).
"""
import contextlib
import copy
import io
import logging
import math
import os
import shutil
import statistics
import tempfile
import warnings

import torch
from torch import nn

from ._io import atomic_write_files
from ._timing import interleave
from ._wording import one_line
from .convert import unfuse
from .nn import BottleneckLinear, WideShallowStudent

__all__ = ["export_student", "load_exported", "latency", "FORMATS"]

FORMATS = ("onnx", "torch-export")
_TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}
# A protobuf message (one .onnx file) cannot exceed 2 GiB; leave room for the graph itself.
ONNX_INLINE_LIMIT = 2**31 - 2**26


def _example(model, input_shape):
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    if input_shape is None:
        input_shape = getattr(model, "input_shape", None)
    if input_shape is None and _first_linear(model) is not None:
        input_shape = (_first_linear(model).in_features,)
    if input_shape is None:
        raise ValueError(f"cannot tell the input shape of a {type(model).__name__}: pass "
                         "input_shape (one row's shape, e.g. (3, 32, 32)) / --input-shape")
    # batch 2: torch.export specialises a size-1 dimension, which would fix the batch to 1
    return torch.randn(2, *tuple(input_shape), dtype=dtype,
                       device=p.device if p is not None else "cpu")


def _first_linear(model):
    """The first linear layer registered, unless a convolution comes first (then None)."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, BottleneckLinear, WideShallowStudent)):
            return m
        if isinstance(m, nn.modules.conv._ConvNd):
            return None
    return None


def _check_runs(plain, example):
    """Run the model once eagerly, so that a wrong input shape is one clear error up front
    (torch.export's own message is long and coloured)."""
    try:
        with torch.no_grad():
            plain(example)
    except Exception as e:
        shape = tuple(example.shape[1:])
        first = _first_linear(plain)
        n = first.in_features if first is not None else None
        if n is not None and n not in (math.prod(shape), shape[-1] if shape else None):
            raise ValueError(f"input shape {shape} (prod {math.prod(shape)}) does not fit the "
                             f"model: its first linear layer takes {n} features; pass "
                             f"input_shape / --input-shape {n} (or a shape whose product is "
                             f"{n})") from e
        raise ValueError(f"the {type(plain).__name__} does not run on a batch of input shape "
                         f"{shape}: {type(e).__name__}: {one_line(e)}") from e


def _prepare_path(path, format):
    """Refuse a .pt2 path without its extension; create a missing parent folder."""
    if not isinstance(path, (str, os.PathLike)):
        return  # a file object: the caller's
    path = os.fspath(path)
    if format == "torch-export" and not path.endswith(".pt2"):
        raise ValueError(f"{path}: a torch-export file must end in .pt2 (torch.export.load "
                         "and torch.export.save expect it)")
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)


def plain_model(model):
    """A copy of `model` in eval mode with every fused layer as plain nn.Linear + activation."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return unfuse(copy.deepcopy(model)).eval()


def export_student(model, path, format="onnx", input_shape=None, check=True):
    """Write `model` (any module; fused layers are unfused on a copy) to `path` as plain ops.

    format: "onnx" or "torch-export"; input_shape: one row's shape (default: the model's
    `input_shape` or its first Linear's in_features). The batch dimension is dynamic. With check,
    the written file is run on a random batch and compared with `model` (ValueError if it differs)
    before it replaces any file at `path` (the replacement is atomic; see the module docstring).
    `path` may also be a writable binary file object: the file is written and checked in a temp
    folder, then its bytes are copied into it. Returns `path`.
    """
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    plain = plain_model(model)
    example = _example(plain, input_shape)
    _check_runs(plain, example)
    _prepare_path(path, format)
    batch = {0: torch.export.Dim("batch")}
    external = format == "onnx" and _onnx_bytes(plain) > ONNX_INLINE_LIMIT
    if format == "onnx":
        try:
            import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
        except ImportError:
            raise ValueError("ONNX export needs onnx and onnxscript: pip install "
                             "'mimic_fast[export]'") from None

    def write(target):
        try:
            with torch.no_grad(), _quiet_onnx():
                if format == "torch-export":
                    program = torch.export.export(plain, (example,), dynamic_shapes=(batch,))
                    _save_program(program, target)
                else:
                    torch.onnx.export(plain, (example,), target, dynamo=True,
                                      dynamic_shapes=(batch,), input_names=["x"],
                                      output_names=["logits"], verbose=False,
                                      external_data=external)
        except OSError:
            raise  # writing failed (a full disk): the OS's error, naming the file
        except Exception as e:  # torch.export / dynamo raise many kinds; keep the cause chained
            raise ValueError(f"could not export the {type(model).__name__} as {format}: "
                             f"{type(e).__name__}: {one_line(e)}") from e
        if check:
            _check(model, target, format, example)

    if isinstance(path, (str, os.PathLike)):
        atomic_write_files(path, write)
    else:  # a file object: written and checked as a file in a temp folder, then its bytes copied in
        if external:
            raise ValueError("an ONNX export over 2 GB is two files (.onnx and .onnx.data): pass a "
                             "path, not a file object")
        with tempfile.TemporaryDirectory(prefix="mimic_fast_export_") as tmp:
            target = os.path.join(tmp, "student" + (".pt2" if format == "torch-export" else ".onnx"))
            write(target)
            with open(target, "rb") as f:
                shutil.copyfileobj(f, path)
    if external:
        warnings.warn(f"the weights are over 2 GB (one .onnx file's limit): wrote {path} and its "
                      f"weights {os.fspath(path)}.data; ship both files, side by side",
                      stacklevel=2)
    return path


def _save_program(program, path):
    """torch.export.save into memory, then the bytes to `path`: torch's zip writer aborts the whole
    process (`terminate called`, from a destructor) when a write fails on a full disk, where a
    Python write raises an OSError that names the file."""
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    with open(path, "wb") as f:
        f.write(buffer.getbuffer())


def _onnx_bytes(model):
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


@contextlib.contextmanager
def _quiet_onnx():
    # torch.onnx logs a warning per torchvision op it cannot register when torchvision is absent.
    log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            # torch 2.13's own ExportedProgram.run_decompositions deep-copies a pytree LeafSpec,
            # which warns about its own deprecated isinstance check: torch's, on every ONNX export,
            # nothing a caller can change
            warnings.filterwarnings("ignore", category=FutureWarning,
                                    message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
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
            # interleaved rounds (a busy machine slows both alike), >= 10 of them and >= 0.5 s
            times, errors = interleave({"fused": lambda x=x: model(x), "exported": lambda x=x: run(x)},
                                       rounds=10, min_seconds=0.5)
            if errors:
                raise next(iter(errors.values()))
            fused_s, exported_s = (statistics.median(times[n]) for n in ("fused", "exported"))
            rows.append({"batch": b, "fused_s": fused_s, "exported_s": exported_s})
    return rows
