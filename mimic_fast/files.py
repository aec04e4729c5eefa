"""The pipeline's file formats: one writer and one loader per kind of file.

- model file (teacher.pt, student.pt): a model's weights, the spec that rebuilds it, and extras
  (data recipe, history); `save_model` / `load_model`.
- transfer-set file (transfer.pt): the transfer set's rows, sources and labels with its recipe (the
  data recipe plus the transfer options) and whether test rows were allowed in; `save_transfer` /
  `load_transfer`.
- checkpoint (checkpoint.pt of a training run): model, optimizer, step, every rank's RNG states and
  the history; `save_checkpoint` / `load_checkpoint`.
Every file is written atomically (mimic_fast._io) and every loader refuses a truncated, foreign or
incomplete file with a ValueError that names it and says what to do. Limits: the files are pickles
(torch.load with weights_only=False): load only files you trust.
"""
import os

import torch

from ._io import atomic_write_bytes
from .data.transfer import TransferSet
from .distributed import unwrap
from .models import TeacherEnsemble, build_model
from .nn import WideShallowStudent

__all__ = ["MODEL_FORMAT", "TRANSFER_FORMAT", "CHECKPOINT_FORMAT", "save_model", "load_model",
           "build_from_spec", "save_transfer", "load_transfer", "save_checkpoint", "load_checkpoint",
           "load_torch_file"]

MODEL_FORMAT = "mimic_fast.model/1"
TRANSFER_FORMAT = "mimic_fast.transfer/1"
CHECKPOINT_FORMAT = "mimic_fast.checkpoint/1"


def _save(obj, path):
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def load_torch_file(path, what, hint, map_location="cpu"):
    """torch.load(path) for files this package wrote, refusing a truncated or foreign file with a
    ValueError that names it (torch raises RuntimeError/UnpicklingError/EOFError... instead)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise  # the OS's own error, naming the file
    except Exception as e:  # a truncated zip even surfaces as OSError(EINVAL)
        first = str(e).splitlines()[0] if str(e) else ""
        raise ValueError(f"{path} is not a {what}, or it is truncated or damaged (torch.load failed: "
                         f"{type(e).__name__}: {first}); {hint}") from None


# ----------------------------------------------------------------------------------------------
# model files
# ----------------------------------------------------------------------------------------------
def save_model(path, model, spec=None, **extra):
    """Atomically save a model's weights with the spec needed to rebuild it (see load_model).

    spec: {"name": <models.build_model name>, "kwargs": {...}} or {"class": "WideShallowStudent",
    "kwargs": {...}}; extra entries (metrics, dataset name) are stored beside it.
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
    """(model, payload) from a file written by save_model; the model is in eval mode."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"model file {path} does not exist: expected a .pt file written by "
                                f"save_model (e.g. teacher.pt of `mimic-fast train-teacher`)")
    payload = load_torch_file(path, "mimic_fast model file", "train or save it again", map_location)
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise ValueError(f"{path} is not a mimic_fast model file (expected format {MODEL_FORMAT!r})")
    try:
        model = build_from_spec(payload["spec"])
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError, TypeError) as e:
        raise ValueError(f"{path} holds a model that cannot be rebuilt from its spec "
                         f"({type(e).__name__}: {e})") from None
    return model.eval(), payload


# ----------------------------------------------------------------------------------------------
# transfer-set files
# ----------------------------------------------------------------------------------------------
def save_transfer(path, transfer, recipe, allow_test_rows=False, test_rows=0):
    """Atomically write a TransferSet with its recipe (mimic_fast.pipeline.transfer_recipe: the data
    recipe and the transfer options), whether test rows were allowed in, and how many there are."""
    _save({"format": TRANSFER_FORMAT, "recipe": recipe, "x": transfer.x, "sources": transfer.sources,
           "labels": transfer.labels, "allow_test_rows": bool(allow_test_rows),
           "test_rows_in_transfer": int(test_rows)}, path)


def load_transfer(path, hint):
    """(TransferSet, payload) from a file written by save_transfer; payload["recipe"] is its recipe.
    `hint`: what the refusal of a damaged or foreign file tells the user to do."""
    saved = load_torch_file(path, "mimic_fast transfer set", hint)
    if not isinstance(saved, dict) or saved.get("format") != TRANSFER_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise ValueError(f"{path} is not a mimic_fast transfer set (format {found!r}, expected "
                         f"{TRANSFER_FORMAT!r}); {hint}")
    missing = [k for k in ("recipe", "x", "sources", "labels") if k not in saved]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a complete transfer set; "
                         f"{hint}")
    return TransferSet(saved["x"], saved["sources"], saved["labels"]), saved


# ----------------------------------------------------------------------------------------------
# training checkpoints
# ----------------------------------------------------------------------------------------------
_CHECKPOINT_FIELDS = ("epoch", "config", "model", "optimizer", "rng", "history")
CHECKPOINT_HINT = ("delete it to start the run over, or restore it from a backup (resume never "
                   "overwrites it with a fresh run)")


def save_checkpoint(path, **fields):
    """Atomically write a training checkpoint: epoch, step, config (with its "kind"), spec, model,
    optimizer, rng, history, resumes."""
    _save({"format": CHECKPOINT_FORMAT, **fields}, path)


def load_checkpoint(path, kind):
    """The checkpoint at `path` of a `kind` ("teacher" or "distill") run, refused (ValueError naming
    the file) when damaged, incomplete or of another kind."""
    ckpt = load_torch_file(path, "mimic_fast training checkpoint", CHECKPOINT_HINT)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a mimic_fast training checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r}); {CHECKPOINT_HINT}")
    missing = [k for k in _CHECKPOINT_FIELDS if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: it is not a complete checkpoint; "
                         f"{CHECKPOINT_HINT}")
    if ckpt["config"].get("kind") != kind:
        raise ValueError(f"{path} is a {ckpt['config'].get('kind')!r} checkpoint, not a {kind} one: "
                         "use another output directory")
    return ckpt
