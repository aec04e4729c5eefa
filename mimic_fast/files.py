"""The pipeline's file formats: one writer and one loader per kind of file.

- model file (teacher.pt, student.pt): a model's weights, the spec that rebuilds it, and extras
  (data recipe, history, the inputs it was trained on); `save_model` / `load_model`.
- transfer-set file (transfer.pt): the transfer set's rows, sources and labels with its recipe (the
  data recipe plus the transfer options), the digest of its rows (its identity) and whether test
  rows were allowed in; `save_transfer` / `load_transfer`.
- checkpoint (checkpoint.pt of a training run): model, optimizer, step, every rank's RNG states and
  the history; `save_checkpoint` / `load_checkpoint`.
- JSON files of the sweep and of collect-logits (teacher.json, result.json, ...): `write_json` /
  `read_json`.
Every file is written atomically (mimic_fast._io) and records the sha256 of its own content
(data.identity.content_digest of the payload, as loaded: every tensor's bytes, every value); the
loaders check it before anything is used and refuse a damaged, truncated, foreign or older file with
one ValueError that names it and says what to do. No loader runs pickle: the .pt files are torch zip
archives of plain containers and tensors, loaded with torch.load(weights_only=True), which refuses
any other object instead of constructing it. Format versions: /2 (checksummed, pickle-free); files of
format /1 (mimic_fast 0.1 before it) are refused, naming the version and the remedy (train, collect
or run them again): they cannot be verified.
"""
import json
import math
import os
import re
import zipfile

import torch

from ._checks import is_int
from ._io import atomic_write_bytes, atomic_write_text
from ._wording import one_line, out_of_memory
from .data.identity import content_digest
from .data.transfer import TransferSet
from .distributed import unwrap
from .models import TeacherEnsemble, build_model
from .nn import WideShallowStudent

__all__ = ["MODEL_FORMAT", "TRANSFER_FORMAT", "CHECKPOINT_FORMAT", "save_model", "load_model",
           "build_from_spec", "save_transfer", "load_transfer", "transfer_digest", "save_checkpoint",
           "load_checkpoint", "load_torch_file", "written_format", "write_json", "read_json",
           "DIGEST_KEY"]

MODEL_FORMAT = "mimic_fast.model/2"
TRANSFER_FORMAT = "mimic_fast.transfer/2"
CHECKPOINT_FORMAT = "mimic_fast.checkpoint/2"
DIGEST_KEY = "sha256"  # the key of a file's own digest, beside its payload
_OURS = re.compile(rb"mimic_fast\.(?:model|transfer|checkpoint)/\d+")


def _save(payload, path):
    payload = {**payload, DIGEST_KEY: content_digest(payload)}
    atomic_write_bytes(path, lambda f: torch.save(payload, f))


def written_format(path):
    """The format name ("mimic_fast.model/2", ...) a torch zip archive at `path` carries in its
    pickle, read as bytes (nothing is unpickled); None for any other file. It tells our files, also
    damaged or older ones, from a user's."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"), None)
            found = _OURS.search(z.read(name)) if name else None
    except (OSError, zipfile.BadZipFile, KeyError, ValueError, RuntimeError, EOFError):
        return None
    return found.group().decode() if found else None


def load_torch_file(path, format, what, hint, map_location="cpu"):
    """The payload of a file written by _save at `path`: loaded without running code
    (weights_only=True), its format checked and its digest verified, refusing anything else with one
    ValueError that names the file (torch raises RuntimeError/UnpicklingError/EOFError... instead)."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the OS's own error, naming the file
    except Exception as e:  # a truncated zip even surfaces as OSError(EINVAL)
        _refuse_version(path, written_format(path), format, what, hint)
        raise ValueError(f"{path} is not a {what}, or it is truncated, damaged or altered (it does "
                         f"not load as plain tensors and containers: {_why(e)}); {hint}") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if found != format:
        _refuse_version(path, found, format, what, hint)
        shown = found if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is not a {what} (format {shown!r}, expected {format!r}); {hint}")
    recorded = payload.pop(DIGEST_KEY, None)
    if recorded != content_digest(payload):
        raise ValueError(f"{path} is damaged: its content does not match the sha256 recorded in it "
                         f"when it was written (a changed bit, or an edited file); {hint}")
    return payload


def _why(e):
    """One line of why torch.load(weights_only=True) refused a file (its message advises loading the
    file with pickle instead, which is exactly what must not happen here)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it refers to {found.group(1)}, which no file of ours does (it was not run)"
    if "WeightsUnpickler error:" in text:  # the unpickler's own words follow the advice
        text = text.split("WeightsUnpickler error:", 1)[1]
        text = text.split("Check the documentation of torch.load")[0]
    return f"{type(e).__name__}: {one_line(text)}"


def _refuse_version(path, found, format, what, hint):
    """Refuse a file of ours in another format version (one line: the version and the remedy)."""
    if isinstance(found, str) and found != format and found.split("/")[0] == format.split("/")[0]:
        raise ValueError(f"{path} is a {what} of format {found}, written by another version of "
                         f"mimic_fast; this one reads {format} (checksummed, loaded without pickle) "
                         f"and cannot verify older files: {hint}")


# ----------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------
MODEL_HINT = "train it again (`mimic-fast train-teacher` / `distill`), or restore it from a backup"


def save_model(path, model, spec=None, **extra):
    """Atomically save a model's weights with the spec needed to rebuild it (see load_model).

    spec: {"name": <models.build_model name>, "kwargs": {...}} or {"class": "WideShallowStudent",
    "kwargs": {...}}; extra entries (metrics, dataset name) are stored beside it: plain containers,
    numbers, strings and tensors only (the file loads without pickle).
    """
    payload = {"format": MODEL_FORMAT, "spec": spec, "state_dict": unwrap(model).state_dict()}
    payload.update(extra)
    _save(payload, path)


def build_from_spec(spec):
    if spec is None:
        raise ValueError("model file has no spec: it cannot be rebuilt, load its state_dict yourself")
    kwargs = dict(spec.get("kwargs", {}))
    if spec.get("class") == "WideShallowStudent":
        return WideShallowStudent(**kwargs)
    if spec.get("class") == "TeacherEnsemble":
        return TeacherEnsemble([build_from_spec(s) for s in spec["members"]])
    if "name" in spec:
        return build_model(spec["name"], **kwargs)
    raise ValueError(f"unknown model spec {spec!r}: expected a 'name' (models.build_model) or a "
                     "'class' of WideShallowStudent / TeacherEnsemble")


def load_model(path, map_location="cpu"):
    """(model, payload) from a file written by save_model, verified; the model is in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} does not exist: expected a .pt file written by "
                                f"save_model (e.g. teacher.pt of `mimic-fast train-teacher`)")
    payload = load_torch_file(path, MODEL_FORMAT, "mimic_fast model file", MODEL_HINT, map_location)
    wrong = [f"{key} must be a dict, got {type(payload.get(key)).__name__}"
             for key, optional in (("spec", True), ("state_dict", False), ("data", True))
             if not isinstance(payload.get(key), dict) and not (optional and payload.get(key) is None)]
    if wrong:
        raise ValueError(f"{path} is not a valid model file: {'; '.join(wrong)}; {MODEL_HINT}")
    try:
        model = build_from_spec(payload["spec"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, MemoryError, RuntimeError, TypeError, ValueError) as e:
        if out_of_memory(e):  # too large for this machine, not a damaged file (pipeline.build_checked)
            raise ValueError(f"the model in {path} does not fit in memory ({one_line(e, 200)}); load "
                             "it on a machine with more memory") from None
        raise ValueError(f"{path} holds a model that cannot be rebuilt from its spec "
                         f"({type(e).__name__}: {one_line(e, 300)})") from None
    return model.eval(), payload


# ----------------------------------------------------------------------------------------------
# transfer-set files
# ----------------------------------------------------------------------------------------------
def transfer_digest(transfer):
    """The identity of a transfer set: sha256 of its rows, sources and labels (the data a student
    trains on; not the recipe, so a moved data file with the same rows keeps it)."""
    return content_digest([transfer.x, transfer.sources, transfer.labels])


def save_transfer(path, transfer, recipe, allow_test_rows=False, test_rows=0):
    """Atomically write a TransferSet with its recipe (mimic_fast.pipeline.transfer_recipe: the data
    recipe and the transfer options), its identity (transfer_digest), whether test rows were allowed
    in, and how many there are. Returns the identity."""
    digest = transfer_digest(transfer)
    _save({"format": TRANSFER_FORMAT, "recipe": recipe, "x": transfer.x, "sources": transfer.sources,
           "labels": transfer.labels, "transfer_sha256": digest,
           "allow_test_rows": bool(allow_test_rows), "test_rows_in_transfer": int(test_rows)}, path)
    return digest


def load_transfer(path, hint):
    """(TransferSet, payload) from a file written by save_transfer, verified; payload["recipe"] is
    its recipe, payload["transfer_sha256"] its identity. `hint`: what the refusal of a damaged or
    foreign file tells the user to do."""
    saved = load_torch_file(path, TRANSFER_FORMAT, "mimic_fast transfer set", hint)
    missing = [k for k in ("recipe", "x", "sources", "labels", "transfer_sha256") if k not in saved]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a complete transfer set; "
                         f"{hint}")
    problems = _transfer_problems(saved)
    if problems:
        raise ValueError(f"{path} is not a valid transfer set: {'; '.join(problems)}; {hint}")
    return TransferSet(saved["x"], saved["sources"], saved["labels"]), saved


def _transfer_problems(saved):
    """What is wrong with a transfer set's rows, sources and labels (a file written by hand or by a
    bug can be consistent with its own digest and still not be one)."""
    x, sources, labels = saved["x"], saved["sources"], saved["labels"]
    if not isinstance(saved["recipe"], dict):
        return [f"recipe must be a dict, got {type(saved['recipe']).__name__}"]
    for name, t in (("x", x), ("sources", sources), ("labels", labels)):
        if not isinstance(t, torch.Tensor):
            return [f"{name} must be a tensor, got {type(t).__name__}"]
    problems = []
    if x.dim() != 2 or not x.is_floating_point() or len(x) == 0:
        problems.append(f"x must be (N, D) floating-point rows with N >= 1, got {tuple(x.shape)} "
                        f"{x.dtype}")
    elif not torch.isfinite(x).all():
        problems.append("x holds NaN or Inf")
    for name, t, lo, hi in (("sources", sources, 0, 2), ("labels", labels, -1, None)):
        if t.dim() != 1 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            problems.append(f"{name} must be a 1-D integer tensor, got {tuple(t.shape)} {t.dtype}")
        elif len(t) != len(x):
            problems.append(f"{name} has {len(t)} entries for {len(x)} rows")
        elif len(t) and (int(t.min()) < lo or (hi is not None and int(t.max()) > hi)):
            problems.append(f"{name} must be in {lo}..{hi if hi is not None else 'classes - 1'}, "
                            f"got {int(t.min())}..{int(t.max())}")
    return problems


# ----------------------------------------------------------------------------------------------
# training checkpoints
# ----------------------------------------------------------------------------------------------
_CHECKPOINT_FIELDS = ("epoch", "config", "model", "optimizer", "rng", "history")
CHECKPOINT_HINT = ("delete it to start the run over, or restore it from a backup (resume never "
                   "overwrites it with a fresh run)")


def save_checkpoint(path, **fields):
    """Atomically write a training checkpoint: epoch, step, config (with its "kind"), spec, model,
    optimizer, rng (plain containers: no numpy arrays), history, resumes."""
    _save({"format": CHECKPOINT_FORMAT, **fields}, path)


def load_checkpoint(path, kind):
    """The checkpoint at `path` of a `kind` ("teacher" or "distill") run, verified; refused
    (ValueError naming the file) when damaged, incomplete or of another kind."""
    ckpt = load_torch_file(path, CHECKPOINT_FORMAT, "mimic_fast training checkpoint", CHECKPOINT_HINT)
    missing = [k for k in _CHECKPOINT_FIELDS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a complete checkpoint; "
                         f"{CHECKPOINT_HINT}")
    problems = _checkpoint_problems(ckpt)
    if problems:
        raise ValueError(f"{path} is not a valid checkpoint: {'; '.join(problems)}; "
                         f"{CHECKPOINT_HINT}")
    if ckpt["config"].get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt['config'].get('kind')!r} checkpoint, not a {kind} one: "
                         "use another output directory")
    return ckpt


def _checkpoint_problems(ckpt):
    """What is wrong with a checkpoint's fields (one consistent with its own sha256 may still have
    been written by hand or by a bug)."""
    out = []
    for key, kind in (("config", dict), ("model", dict), ("optimizer", dict), ("rng", list),
                      ("history", list)):
        if not isinstance(ckpt[key], kind):
            out.append(f"{key} must be a {kind.__name__}, got {type(ckpt[key]).__name__}")
    if not is_int(ckpt["epoch"], 0, 2**31 - 1):
        out.append(f"epoch must be an int in [0, 2**31), got {str(ckpt['epoch'])[:40]}")
    if "step" in ckpt and not is_int(ckpt["step"]):
        out.append(f"step must be an int in [0, 2**63), got {str(ckpt['step'])[:40]}")
    if out:
        return out
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in ckpt["model"].items()):
        out.append("model must map parameter names to tensors")
    if not isinstance(ckpt["optimizer"].get("state"), dict) or \
            not isinstance(ckpt["optimizer"].get("param_groups"), list):
        out.append("optimizer must hold an optimizer's state_dict (state, param_groups)")
    if not all(isinstance(s, dict) for s in ckpt["rng"]) or not ckpt["rng"]:
        out.append("rng must list one random-state dict per rank")
    if len(ckpt["history"]) != ckpt["epoch"] or not all(isinstance(h, dict) for h in ckpt["history"]):
        out.append(f"history must hold one dict per finished epoch ({ckpt['epoch']}), got "
                   f"{len(ckpt['history'])} entries")
    return out


# ----------------------------------------------------------------------------------------------
# JSON files
# ----------------------------------------------------------------------------------------------
def _plain(obj):
    """obj as it reads back from JSON (tuples as lists; non-finite floats as null, as JSON has none)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def write_json(path, obj):
    """Atomically write the dict `obj` as indented JSON with the sha256 of its content (key
    "sha256", last), which read_json checks. Returns obj as it reads back."""
    plain = _plain(obj)
    text = json.dumps({**plain, DIGEST_KEY: content_digest(plain)}, indent=2, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return plain


def read_json(path, remedy):
    """The dict of a JSON file written by write_json, verified; a damaged, edited or unchecksummed
    one is refused (ValueError naming the file and `remedy`)."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged (not valid JSON: {e}); {remedy}") from None
    if not isinstance(obj, dict) or DIGEST_KEY not in obj:
        raise ValueError(f"{path} records no sha256 of its content: it was written by another "
                         f"version of mimic_fast (or by hand) and cannot be verified; {remedy}")
    recorded = obj.pop(DIGEST_KEY)
    if recorded != content_digest(obj):
        raise ValueError(f"{path} is damaged: its content does not match the sha256 recorded in it "
                         f"when it was written (a changed bit, or an edited file); {remedy}")
    return obj
