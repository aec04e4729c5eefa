"""Bring your own teacher: load one from a file or a Python factory, and pick its logits.

load_teacher(spec) accepts
  - a mimic_fast model file (save_model: teacher.pt of `mimic-fast train-teacher`), verified against
    the sha256 it records and loaded without pickle; a damaged or altered one is refused, never
    loaded another way,
  - a TorchScript archive (torch.jit.save), a torch.export program (torch.export.save, .pt2),
  - a pickled module (torch.save(module)) — loading it RUNS PICKLE: arbitrary code from the file
    executes, so load only files you trust (a PickledTeacherWarning says so each time); the class
    must be importable here,
  - "package.module:factory": a Python callable taking no arguments and returning an nn.Module or a
    plain function. The current folder is appended to sys.path first (appended, not prepended: a
    file here never shadows an installed module), so a package in the folder the command runs
    from imports under the `mimic-fast` console script as it does under `python -m mimic_fast`.
A file of the user's (TorchScript, .pt2, pickle) carries no digest of ours: its sha256 is returned in
`info` and becomes part of the teacher's identity in a logit store, so a changed file is noticed
when the store is reused or resumed. A file holding only a state dict is refused with a hint (it has
no architecture: use a factory), and a torch.export program traced with a fixed batch size is refused
(a teacher runs on batches of any size: export it with a dynamic batch dimension).
`output` picks the logits out of a teacher returning something else: a dict key ("logits"),
a tuple index ("0"), an attribute (HF-style `.logits`), or a dotted path of those ("0.logits").
"""
import importlib
import inspect
import os
import sys
import warnings
import zipfile
from collections.abc import Mapping

import torch

from ._wording import one_line
from .data.identity import file_sha256
from .files import load_model, written_format
from .models import Teacher, as_teacher, pick_output

# Teacher, as_teacher and pick_output live with the models (the logit store wraps callables too)
__all__ = ["load_teacher", "load_module", "as_teacher", "pick_output", "Teacher",
           "PickledTeacherWarning"]


class PickledTeacherWarning(UserWarning):
    """A teacher file was loaded by pickle (torch.save(module)): it could run code."""


def _importable_here():
    """Append the current folder to sys.path unless it is there already (`python -m` puts it first;
    a console script does not put it at all). Appended: an installed module keeps its name."""
    here = os.getcwd()
    if "" not in sys.path and not any(os.path.abspath(p) == here for p in sys.path if p):
        sys.path.append(here)
        importlib.invalidate_caches()


_REQUIRED = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.KEYWORD_ONLY)


def _from_factory(spec, what):
    module_name, _, attr = spec.partition(":")
    _importable_here()
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{what} {spec!r}: cannot import {module_name!r} ({e}); a package in the "
                         f"current folder ({os.getcwd()}) or on PYTHONPATH is found") from None
    factory = module
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise ValueError(f"{what} {spec!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise ValueError(f"{what} {spec!r}: {attr!r} is a {type(factory).__name__}, not a callable")
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins have none: call it and see
        signature = None
    needed = [] if signature is None else [
        p.name for p in signature.parameters.values() if p.kind in _REQUIRED and p.default is p.empty]
    if needed:
        raise ValueError(f"{what} {spec!r}: {attr}{signature} needs arguments ({', '.join(needed)}), "
                         "but a factory is called with none: wrap it in a function that takes no "
                         "arguments and returns the model")
    made = factory()
    if not callable(made):
        raise ValueError(f"{what} {spec!r}: {attr}() returned a {type(made).__name__}, expected an "
                         "nn.Module or a function")
    return made


def _fixed_batch(program):
    """The batch size a torch.export program's first input was traced with when it is fixed (an int,
    not a symbol), else None."""
    names = program.graph_signature.user_inputs
    for node in program.graph.nodes:
        if node.op == "placeholder" and names and node.name == names[0]:
            shape = getattr(node.meta.get("val"), "shape", None)
            if shape and isinstance(shape[0], int):
                return int(shape[0]), tuple(shape)
    return None


def _archive_kind(path):
    """'export', 'torchscript', 'torch.save' or None, from the zip archive's member names."""
    if not zipfile.is_zipfile(path):
        return None
    names = zipfile.ZipFile(path).namelist()
    if any(n.endswith("/models/model.json") or n.endswith("archive_format") for n in names):
        return "export"
    if any("/code/__torch__/" in n for n in names) and any(n.endswith("/constants.pkl")
                                                          for n in names):
        return "torchscript"
    return "torch.save"


def _from_file(path, map_location, what):
    """(model, kind, payload of a mimic_fast model file or None)."""
    found = written_format(path)
    if found is not None:  # ours, also when damaged or altered: never unpickled
        if found.split("/")[0] != "mimic_fast.model":
            name = found.split("/")[0].split(".")[1]
            raise ValueError(f"{what} {path} is a mimic_fast {name} file, not a model: expected a "
                             "teacher.pt or student.pt (a model file)")
        model, payload = load_model(path, map_location)  # verified, or refused naming the file
        return model, "mimic_fast model file", payload
    kind = _archive_kind(path)
    if kind == "export":
        try:
            program = torch.export.load(path)
        except Exception as e:  # torch.export raises many kinds on a damaged archive
            raise ValueError(f"{what} {path} looks like a torch.export .pt2 but does not load "
                             f"({type(e).__name__}: {one_line(e)})"
                             ) from None
        fixed = _fixed_batch(program)
        if fixed is not None:
            raise ValueError(
                f"{what} {path} is a torch.export program traced with a fixed batch of {fixed[0]} "
                f"(input shape {fixed[1]}): it would refuse batches of any other size; export it "
                "with a dynamic batch dimension: torch.export.export(model, (x,), dynamic_shapes="
                "({0: torch.export.Dim('batch')},))")
        return program.module(), "torch.export program", None
    if kind == "torchscript":
        try:
            return torch.jit.load(path, map_location=map_location), "TorchScript", None
        except Exception as e:  # a damaged archive: torch.jit raises RuntimeError and others
            raise ValueError(f"{what} {path} looks like TorchScript but does not load "
                             f"({type(e).__name__}: {one_line(e)})"
                             ) from None
    with open(path, "rb") as f:
        magic = f.read(1)
    if kind is None and magic != b"\x80":  # neither a zip nor a pickle (protocol >= 2)
        raise ValueError(f"{what} {path} is not a mimic_fast model file, TorchScript, torch.export "
                         ".pt2 or torch.save(module) file (it is neither a zip archive nor a "
                         "pickle)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # not plain tensors and containers: a pickled object (a whole module)
        payload = None
    if payload is None:
        warnings.warn(f"{what} {path} is a pickled module (torch.save(module)): loading it runs "
                      "pickle, which executes any code the file holds; use only files you trust "
                      "(TorchScript or torch.export .pt2 files run no pickle)",
                      PickledTeacherWarning, stacklevel=4)
        try:
            payload = torch.load(path, map_location=map_location, weights_only=False)
        except Exception as e:
            raise ValueError(f"{what} {path} is not a mimic_fast model file, TorchScript, "
                             f"torch.export .pt2 or torch.save(module) file (torch.load: "
                             f"{type(e).__name__}: {e})") from None
    if callable(payload):
        return payload, "pickled module", None
    if isinstance(payload, Mapping) and payload and all(isinstance(v, torch.Tensor)
                                                        for v in payload.values()):
        raise ValueError(f"{what} {path} holds a state dict ({len(payload)} tensors, e.g. "
                         f"{next(iter(payload))!r}) but no architecture: pass "
                         "package.module:factory, a function that builds the model and loads it")
    raise ValueError(f"{what} {path} holds a {type(payload).__name__}, not a model: expected a "
                     "mimic_fast model file, torch.save(module), TorchScript or a torch.export .pt2")


def _load(spec, map_location, what="teacher"):
    if not isinstance(spec, str):
        raise TypeError(f"{what} spec must be a path or 'package.module:factory', got "
                        f"{type(spec).__name__}")
    if os.path.exists(spec):
        if os.path.isdir(spec):
            raise ValueError(f"{what} {spec} is a folder: expected a model file")
        return _from_file(spec, map_location, what)
    if ":" in spec and not spec.startswith((".", "/")):
        return _from_factory(spec, what), "factory", None
    raise FileNotFoundError(f"{what} {spec} does not exist (expected a model file or "
                            "package.module:factory)")


def load_module(spec, map_location="cpu", what="model"):
    """(the module or function as loaded, what kind it was) from a path or "package.module:factory";
    `what` names it in errors (e.g. "--model")."""
    model, kind, _ = _load(spec, map_location, what)
    return model, kind


def load_teacher(spec, output=None, map_location="cpu"):
    """(teacher in eval mode, info) from a file path or "package.module:factory".

    The teacher is a mimic_fast model file's module itself, else a Teacher wrapper whose output is
    checked to be a logits tensor (`output` selects it: see pick_output). info: {"kind", "spec",
    "data", "sha256"} with the build spec and data recipe of a mimic_fast model file (else None) and
    the sha256 of a file of the user's (TorchScript, .pt2, pickle; else None). Pickled modules and
    factories run code: use only files and packages you trust.
    """
    model, kind, payload = _load(spec, map_location)
    foreign = kind not in ("mimic_fast model file", "factory")
    if kind == "mimic_fast model file" and output is None:
        teacher = model  # unwrapped: its logit stores keep the identity they always had
    else:  # checks the output is a logits tensor (and says how to pick one); handles eval()
        teacher = Teacher(model, output, name=spec)
    info = {"kind": kind, "spec": payload["spec"] if payload else None,
            "data": payload.get("data") if payload else None,
            "sha256": file_sha256(spec) if foreign else None}
    return teacher.eval(), info
