"""Training loops: a teacher on hard labels (train_teacher), a student on stored logits (distill).

Both share one loop: epoch order from a DistributedSampler seeded by (seed, epoch), also in one
process; after each epoch an atomic checkpoint (model, optimizer, step, every rank's RNG states,
history) and one JSONL metrics line, so a resumed run reproduces an uninterrupted one bit for bit.
A resume with a changed lr, momentum, weight decay, precision or longer --epochs applies it (the
schedule is a closed-form function of the step, rebuilt for the new length); other changes are
refused, and so is a distill resume on other inputs (the checkpoint records the logit store's and
the transfer set's identities). A non-finite loss or weight stops the run before anything is
written from it. One writer per output folder (a lock file). Under torch.distributed (torchrun) the
model is wrapped in DDP, only rank 0 writes and evaluation is sharded.

Mixed precision (precision="bf16", --precision bf16): the parameters and the optimizer state stay
float32 (the master weights); each forward and its loss run under torch.autocast(device, bfloat16),
so GEMMs and convolutions (the fused ops too) take bfloat16 operands, while backward() runs outside
it and leaves float32 gradients in the float32 parameters. Evaluation and throughput() run under the
same autocast, and every metrics line records the precision its losses and test accuracy were
measured in. No GradScaler: bfloat16 has float32's exponent range, so its gradients do not underflow
as float16's do. The loss checked for non-finite values is the float32 one autocast returns.

The checkpoint and model file formats are mimic_fast.files' (whose save_model / load_model are
re-exported here); ranks and devices mimic_fast.distributed's. Limits: map-style datasets only; the
learning-rate schedule steps once per batch.
"""
import contextlib
import json
import math
import os
import random
import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, Subset,
                              default_collate)
from tqdm.auto import tqdm

from ._checks import is_int
from ._io import atomic_write_text, refuse_links, writer_lock
from ._wording import one_line, option
from .convert import mimic_loss_of
from .data.recipe import DATA_FIELDS, recipe_differences
from .distributed import default_device, dist_info, on_rank0, unwrap
from .files import CHECKPOINT_HINT, load_checkpoint, load_model, save_checkpoint, save_model
from .functional import kd_loss, logit_mse_loss

__all__ = ["train_teacher", "distill", "evaluate", "throughput", "TrainConfig", "TrainResult",
           "save_model", "load_model", "set_seed", "make_optimizer", "lr_factor", "CHECKPOINT",
           "METRICS", "DEFAULT_LR", "OPTIMIZERS", "SCHEDULES", "DISTILL_LOSSES", "PRECISIONS",
           "check_precision", "autocast", "describe_inputs", "check_options"]

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "step", "none")
DISTILL_LOSSES = ("mse", "kd")
# fp32, or bf16 mixed precision: float32 master weights and optimizer state, forward and loss under
# torch.autocast(bfloat16). The one list of the allowed values (TrainConfig, DemoConfig, SweepConfig,
# every --precision).
PRECISIONS = ("fp32", "bf16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16}
# One default learning rate per loop, for the Python API and the CLI alike. Logit regression needs a
# far smaller SGD step than cross-entropy: the squared error is unbounded and the gradient of W sums
# over the whole width H (0.05 diverges to NaN on the digits pipeline in its first epoch).
DEFAULT_LR = {"teacher": 0.05, "distill": 0.01}
# Options a resume applies (the rest change the data order, the model or the optimizer's state and
# are refused when they differ from the checkpoint's).
# precision: the checkpoint holds float32 weights and optimizer state in either precision, so another
# precision changes only the arithmetic of the steps to come (as another lr does); each metrics line
# records the precision of its epoch.
RESUMABLE_CHANGES = ("epochs", "lr", "momentum", "weight_decay", "grad_clip", "eval_batch_size",
                     "num_workers", "world_size", "precision")
NONFINITE_CHECK_EVERY = 16  # steps between host syncs that look for a non-finite loss


# ----------------------------------------------------------------------------------------------
# small utilities
# ----------------------------------------------------------------------------------------------
def set_seed(seed):
    """Seed python, numpy and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _rng_state():
    # numpy's key array as a list: the checkpoint holds plain containers only (no pickled arrays)
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        # a checkpoint from a machine with more GPUs than this one: restore the devices present
        for i, s in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def check_precision(precision, name="precision"):
    """Refuse (ValueError naming `name`) a precision that is not one of PRECISIONS."""
    if precision not in PRECISIONS:
        raise ValueError(f"{name} must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def autocast(precision, device):
    """The context of a forward pass at `precision` on `device` (a torch.device or its type): nothing
    for fp32 (an enclosing autocast of the caller's is left as it is), torch.autocast(device type,
    bfloat16) for bf16. Raises ValueError when the device has no autocast."""
    check_precision(precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    device_type = device.type if isinstance(device, torch.device) else str(device)
    if not torch.amp.is_autocast_available(device_type):
        raise ValueError(f"precision {precision} runs under torch.autocast, which this torch does not "
                         f"offer on {device_type} devices: use precision fp32 or another device")
    return torch.autocast(device_type, dtype=_AUTOCAST_DTYPES[precision])


def _model_device(model, device):
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------
# optimisers and schedules
# ----------------------------------------------------------------------------------------------
def make_optimizer(params, optimizer="sgd", lr=DEFAULT_LR["teacher"], momentum=0.9, weight_decay=0.0,
                   nesterov=True):
    """SGD with (Nesterov) momentum, or Adam."""
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay,
                               nesterov=nesterov and momentum > 0)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")


def lr_factor(schedule, step, total_steps, step_every=None, gamma=0.1):
    """The per-batch schedule as a closed form of the step (so a resume can rebuild it for another
    length): cosine from 1 to 0 over total_steps (0 past the end, never rising again), step (x gamma
    every step_every steps; default a third of the run), or none."""
    if schedule == "cosine":
        total = max(1, total_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    if schedule == "step":
        return gamma ** (step // (step_every or max(1, total_steps // 3)))
    if schedule == "none":
        return 1.0
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def _set_hyperparameters(optimizer, config, lr):
    """Write lr, momentum and weight decay into every param group (also over a loaded state)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        group["weight_decay"] = config.weight_decay
        if config.optimizer == "sgd":
            group["momentum"] = config.momentum
            group["nesterov"] = config.momentum > 0


@dataclass
class TrainConfig:
    """Hyper-parameters shared by train_teacher and distill (recorded in every checkpoint)."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"
    lr: float = None  # None: DEFAULT_LR of the loop (teacher 0.05, distill 0.01)
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_epochs: int = 0  # "step" schedule: decay every this many epochs (0: every third of the run)
    gamma: float = 0.1
    seed: int = 0
    eval_batch_size: int = 1024
    num_workers: int = 0
    grad_clip: float = 0.0  # max global grad norm, 0: off
    precision: str = "fp32"  # PRECISIONS: fp32, or bf16 autocast over float32 master weights

    def validate(self):
        """Refuse nonsense before anything runs (ValueError naming the option and the range)."""
        for name, lo in (("epochs", 1), ("batch_size", 1), ("eval_batch_size", 1), ("step_epochs", 0),
                         ("num_workers", 0)):
            v = getattr(self, name)
            if not is_int(v, lo):
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if not is_int(self.seed, -math.inf, math.inf):
            raise ValueError(f"seed must be an int, got {self.seed!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check_precision(self.precision)

        def number(name):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            return v
        if not number("lr") > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if not 0 <= number("momentum") < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r} (SGD diverges at >= 1)")
        if not number("weight_decay") >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if not 0 < number("gamma") <= 1:
            raise ValueError(f"gamma must be in (0, 1] (the step schedule's decay factor), got "
                             f"{self.gamma!r}")
        if not number("grad_clip") >= 0:
            raise ValueError(f"grad_clip must be >= 0 (0: off), got {self.grad_clip!r}")


@dataclass
class TrainResult:
    model: nn.Module  # unwrapped, on the training device
    history: list = field(default_factory=list)  # one dict per epoch (the JSONL lines)
    out_dir: str = None
    resumed_from: int = 0  # epochs already done when this call started
    config: TrainConfig = None  # the options this call ran with

    @property
    def final(self):
        return self.history[-1] if self.history else {}


# ----------------------------------------------------------------------------------------------
# evaluation
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(model, dataset, batch_size=1024, device=None, precision="fp32"):
    """Top-1 accuracy on a dataset of (x, y, ...) items (on the model's device unless `device`), the
    forward under autocast(precision); sharded over ranks under torch.distributed."""
    model = unwrap(model)
    device = _model_device(model, device)
    rank, world = dist_info()
    part = Subset(dataset, range(rank, len(dataset), world)) if world > 1 else dataset
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in DataLoader(part, batch_size=batch_size, shuffle=False):
        x, y = batch[0].to(device), batch[1].to(device)
        with autocast(precision, device):
            logits = model(x)
        counts[0] += (logits.argmax(-1) == y).sum()
        counts[1] += y.numel()
    model.train(was_training)
    if world > 1:
        dist.all_reduce(counts)
    return float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")


# ----------------------------------------------------------------------------------------------
# objectives: the whole loss lives in forward(), so DDP sees every parameter use (incl. the fused
# mimic_loss, which bypasses student.forward)
# ----------------------------------------------------------------------------------------------
class _TeacherObjective(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        logits = self.model(x)
        loss = F.cross_entropy(logits.float(), y)
        correct = (logits.detach().argmax(-1) == y).sum()
        return loss, {"loss": (loss.detach(), y.numel()), "train_accuracy": (correct / y.numel(), y.numel())}


class _DistillObjective(nn.Module):
    def __init__(self, model, loss, alpha, temperature, fused_loss):
        super().__init__()
        self.model, self.loss, self.alpha = model, loss, alpha
        self.temperature, self.fused_loss = temperature, fused_loss  # fused_loss: None or (x, t) -> loss

    def forward(self, x, t, y=None):
        t = t.to(torch.float32 if not x.is_floating_point() else x.dtype)
        logits = None
        if self.fused_loss is not None:
            soft = self.fused_loss(x, t)
        else:
            logits = self.model(x)
            soft = (logit_mse_loss(logits, t) if self.loss == "mse"
                    else kd_loss(logits, t, self.temperature))
        stats = {"soft_loss": (soft.detach(), x.shape[0])}
        total = soft
        if self.alpha > 0:
            labelled = y >= 0
            n = int(labelled.sum())
            if n > 0:
                if logits is None:  # fused soft path: the hard loss needs logits of labelled rows only
                    hard = F.cross_entropy(self.model(x[labelled]).float(), y[labelled])
                else:
                    hard = F.cross_entropy(logits[labelled].float(), y[labelled])
                stats["hard_loss"] = (hard.detach(), n)
                total = (1 - self.alpha) * soft + self.alpha * hard
            else:
                # no labelled row here: keep the soft term at the same weight as in mixed batches
                total = (1 - self.alpha) * soft
        stats["loss"] = (total.detach(), x.shape[0])
        return total, stats


# ----------------------------------------------------------------------------------------------
# the loop
# ----------------------------------------------------------------------------------------------
def _check_out_dir(out_dir, resume):
    if out_dir is None:
        return None
    path = os.path.join(out_dir, CHECKPOINT)
    if os.path.exists(path):
        if not resume:
            raise FileExistsError(
                f"{path} exists: pass {option('resume=True', '--resume')} to continue that run, or "
                f"choose another {option('output directory', '--out')} (nothing is overwritten)")
        return path
    return None


def _jsonable(line):
    # JSON has no NaN/Infinity: a non-finite value (e.g. the accuracy of an empty test set) is null
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in line.items()}


def _json_line(line):
    return json.dumps(_jsonable(line), allow_nan=False) + "\n"


def _write_metrics(out_dir, history):
    atomic_write_text(os.path.join(out_dir, METRICS), "".join(_json_line(h) for h in history))


def _append_metrics(out_dir, line):
    # O_NOFOLLOW: a link planted in the run folder is refused, not written through
    fd = os.open(os.path.join(out_dir, METRICS),
                 os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(_json_line(line))
        f.flush()
        os.fsync(f.fileno())


def _gather_rng():
    rank, world = dist_info()
    state = _rng_state()
    if world == 1:
        return [state]
    states = [None] * world
    dist.all_gather_object(states, state)
    return states


def _resume_changes(ckpt, run_config, spec, path):
    """{option: (saved, now)} of the changes a resume applies; refuses (ValueError, every difference
    listed) the ones it cannot apply honestly (also another model spec or data recipe)."""
    # checkpoints written before precision was an option were all float32 runs
    saved = {"precision": "fp32", **ckpt["config"]}
    if saved.get("inputs") != run_config.get("inputs"):
        raise ValueError(f"cannot resume {path}: it was trained on {describe_inputs(saved.get('inputs'))}"
                         f" but this run reads {describe_inputs(run_config.get('inputs'))}: the "
                         "logits or the transfer set were collected or built again since, so the "
                         "resumed run would mix two data sets. Resume with the inputs it was trained "
                         "on, or start a new run in another output directory")
    changed = {k: (saved.get(k), v) for k, v in run_config.items() if saved.get(k) != v}
    refused = {k: d for k, d in changed.items() if k not in RESUMABLE_CHANGES}
    if "data" in refused and isinstance(refused["data"][0], dict) and isinstance(refused["data"][1], dict):
        # only the fields that decide the rows: a moved data file with the same rows may resume
        diff = recipe_differences(*refused.pop("data"), DATA_FIELDS)
        refused.update({f"data {k}": v for k, v in diff.items()})
    if ckpt.get("spec") is not None and spec is not None and ckpt["spec"] != spec:
        refused["model spec"] = (ckpt["spec"], spec)
    if refused:
        listed = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in refused.items())
        raise ValueError(f"cannot resume {path} with changed {', '.join(refused)} ({listed}): they "
                         f"change the data order, the model or the optimizer state, so the run would "
                         f"match neither the saved one nor a fresh one. Resume with the saved values, "
                         f"or start a new run in another output directory")
    done = int(ckpt["epoch"])
    if run_config["epochs"] < done:
        raise ValueError(f"{path} has {done} epochs done but epochs={run_config['epochs']} asks for "
                         f"fewer: resume with epochs >= {done}")
    return changed


def describe_inputs(inputs):
    """The identities a run trained on, in words ({"logit_store": sha256, "transfer_set": sha256})."""
    if not inputs:
        return "inputs of no recorded identity"
    names = {"logit_store": "logit store", "transfer_set": "transfer set"}
    return " and ".join(f"{names.get(k, k)} sha256 {v}" for k, v in inputs.items())


def _first_nonfinite(values, world):
    """Index of the first non-finite value (0-d device tensors), the same on all ranks, or None.
    One host sync."""
    bad = (~torch.isfinite(torch.stack(values))).to(torch.int32)
    if world > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    hit = bad.nonzero()
    return int(hit[0, 0]) if len(hit) else None


def _fit(kind, model, objective, train_set, test_set, config, out_dir, resume, device,
         progress, extra_config, spec):
    config.validate()
    rank, world = dist_info()
    device = default_device(device)
    autocast(config.precision, device)  # a device without autocast is refused before anything runs
    with contextlib.ExitStack() as held:
        if out_dir is not None:
            # one writer per output folder: a second run would interleave checkpoints and metrics
            on_rank0(lambda: held.enter_context(writer_lock(out_dir, f"{kind} run folder")))
        return _fit_locked(kind, model, objective, train_set, test_set, config, out_dir, resume,
                           device, progress, extra_config, spec, rank, world)


def _fit_locked(kind, model, objective, train_set, test_set, config, out_dir, resume, device,
                progress, extra_config, spec, rank, world):
    model.to(device)
    if out_dir is not None:
        refuse_links(out_dir, [CHECKPOINT, METRICS])  # before anything is written there
    resume_path = _check_out_dir(out_dir, resume)

    # the model is seeded (initialised) by the caller; this seed drives dropout, sampler and RNG draws
    set_seed(config.seed + rank)
    objective.to(device)
    if world > 1:
        ddp_kw = {"device_ids": [device.index]} if device.type == "cuda" else {}
        objective = nn.parallel.DistributedDataParallel(objective, **ddp_kw)
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} (the global batch) must be divisible by the "
                         f"world size {world}")
    local_batch = config.batch_size // world
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=True,
                                 seed=config.seed, drop_last=False)
    # batch_size=None: the sampler yields whole index batches, fetched in one go by _Batches
    loader = DataLoader(train_set, batch_size=None,
                        sampler=BatchSampler(sampler, local_batch, drop_last=False),
                        num_workers=config.num_workers, pin_memory=device.type == "cuda")
    steps_per_epoch = len(loader)
    total_steps = config.epochs * steps_per_epoch
    step_every = config.step_epochs * steps_per_epoch or None

    def lr_at(step):
        return config.lr * lr_factor(config.schedule, step, total_steps, step_every, config.gamma)

    optimizer = make_optimizer(model.parameters(), config.optimizer, config.lr, config.momentum,
                               config.weight_decay)

    run_config = {"kind": kind, **asdict(config), **extra_config, "world_size": world}
    history, start, resumes = [], 0, []
    if resume_path is not None:
        ckpt = load_checkpoint(resume_path, kind)  # every rank reads it: the same error everywhere
        changed = _resume_changes(ckpt, run_config, spec, resume_path)
        try:
            unwrap(model).load_state_dict(ckpt["model"])
        except RuntimeError as e:  # another architecture or size (e.g. a changed --hidden)
            raise ValueError(f"{resume_path} holds a model that does not fit this {kind} model "
                             f"(saved spec {ckpt.get('spec')!r}, now {spec!r}): {e}") from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
            raise ValueError(f"{resume_path} holds an optimizer state that does not fit this "
                             f"{kind} run's {config.optimizer} optimizer ({type(e).__name__}: "
                             f"{one_line(e)}); {CHECKPOINT_HINT}") from None
        history, start = list(ckpt["history"]), int(ckpt["epoch"])
        resumes = list(ckpt.get("resumes", []))
        if changed:
            resumes.append({"epoch": start, "changed": {k: list(v) for k, v in changed.items()}})
            notes = [f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()]
            if "epochs" in changed and start and (config.schedule == "cosine" or
                                                  (config.schedule == "step" and not config.step_epochs)):
                notes.append(f"the {config.schedule} schedule is rebuilt for {config.epochs} epochs: "
                             f"epochs {start + 1}.. follow it, epochs 1..{start} followed the "
                             f"{changed['epochs'][0]}-epoch one")
            warnings.warn(f"resuming {resume_path} at epoch {start} with: {'; '.join(notes)}",
                          stacklevel=4)
        rng = ckpt["rng"]
        if len(rng) == world:
            try:
                _set_rng_state(rng[rank])
            except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
                raise ValueError(f"{resume_path} holds a random state that cannot be restored "
                                 f"({type(e).__name__}: {one_line(e)}); {CHECKPOINT_HINT}") from None
        else:  # a different world size cannot replay the same streams; keep going, seeded afresh
            set_seed(config.seed + rank + 1000003 * start)
        if rank == 0 and out_dir is not None:
            _write_metrics(out_dir, history)  # drop lines of any epoch that never got its checkpoint
    elif rank == 0 and out_dir is not None:
        _write_metrics(out_dir, [])
    # lr, momentum and weight decay of this call, also over a loaded optimizer state
    _set_hyperparameters(optimizer, config, lr_at(start * steps_per_epoch))

    show = progress and rank == 0
    params = [p for p in model.parameters()]
    for epoch in range(start + 1, config.epochs + 1):
        sampler.set_epoch(epoch)
        objective.train()
        t0 = time.perf_counter()
        sums, losses = {}, []
        step = (epoch - 1) * steps_per_epoch
        bar = tqdm(loader, desc=f"{kind} epoch {epoch}/{config.epochs}", leave=False, disable=not show,
                   dynamic_ncols=True)
        for i, batch in enumerate(bar):
            batch = [b.to(device, non_blocking=True) for b in batch]
            batch[1:] = [b if b.is_floating_point() else b.long() for b in batch[1:]]
            # bf16: forward and loss under autocast, backward outside it (as torch.amp documents)
            with autocast(config.precision, device):
                loss, stats = objective(*batch)
            # the loss is float32 in either precision (the losses return float32 under autocast, so
            # a bf16 overflow shows as inf/NaN here); it stays on the device and is looked at every
            # few steps: no host sync per step
            losses.append(loss.detach().float())
            if len(losses) == NONFINITE_CHECK_EVERY or i + 1 == steps_per_epoch:
                bad = _first_nonfinite(losses, world)
                if bad is not None:
                    _diverged(kind, epoch, i + 1 - len(losses) + bad, steps_per_epoch, config, out_dir,
                              f"the loss is {losses[bad].item()}")
                losses = []
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            step += 1
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
            for name, (value, n) in stats.items():
                acc = sums.setdefault(name, torch.zeros(2, dtype=torch.float64, device=device))
                acc[0] += value.double() * n
                acc[1] += n
            if show:
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", refresh=False)
        bar.close()
        # the last step's update can overflow the weights while its loss was still finite
        weights = torch.stack([p.detach().sum(dtype=torch.float64) for p in params]).sum()  # NaN/Inf propagate
        if _first_nonfinite([weights], world) is not None:
            _diverged(kind, epoch, steps_per_epoch - 1, steps_per_epoch, config, out_dir,
                      "the weights became non-finite")
        names = sorted(sums)
        if world > 1:  # a name missing on one rank (hard loss, no labelled rows) must not deadlock
            present = [None] * world
            dist.all_gather_object(present, names)
            names = sorted(set().union(*present))
            for name in names:
                sums.setdefault(name, torch.zeros(2, dtype=torch.float64, device=device))
                dist.all_reduce(sums[name])
        line = {"epoch": epoch}
        for name in names:
            total, count = sums[name].tolist()
            line[name] = total / count if count else None
        if test_set is not None:
            line["test_accuracy"] = evaluate(model, test_set, config.eval_batch_size, device,
                                             config.precision)
        line["precision"] = config.precision  # of this epoch's steps, losses and test accuracy
        line["lr"] = optimizer.param_groups[0]["lr"]
        line["time"] = time.perf_counter() - t0
        line = _jsonable(line)
        history.append(line)
        rng = _gather_rng()
        if rank == 0 and out_dir is not None:
            # checkpoint first, then the metrics line: a crash in between is repaired on resume from
            # the checkpoint's own history
            save_checkpoint(os.path.join(out_dir, CHECKPOINT), epoch=epoch, step=step, config=run_config,
                            spec=spec, model=unwrap(model).state_dict(),
                            optimizer=optimizer.state_dict(), rng=rng, history=history,
                            resumes=resumes)
            _append_metrics(out_dir, line)
        if show:
            tqdm.write(_format_line(kind, line))
    if world > 1:
        dist.barrier()
    model.eval()
    return TrainResult(model=unwrap(model), history=history, out_dir=out_dir, resumed_from=start,
                       config=config)


def _diverged(kind, epoch, bad, steps_per_epoch, config, out_dir, what):
    if out_dir and epoch == 1:  # a fresh run starts its metrics file empty: leave nothing after all
        with contextlib.suppress(FileNotFoundError):  # (another rank may have removed it already)
            if os.path.getsize(os.path.join(out_dir, METRICS)) == 0:
                os.remove(os.path.join(out_dir, METRICS))
    kept = (f"the checkpoint of epoch {epoch - 1} in {out_dir} is kept" if out_dir and epoch > 1 else
            "nothing was written")
    raise FloatingPointError(
        f"{kind} training diverged: {what} at epoch {epoch}, step {bad + 1} of {steps_per_epoch} "
        f"(global step {(epoch - 1) * steps_per_epoch + bad + 1}); no checkpoint or model is written "
        f"from it ({kept}). Lower the learning rate (lr={config.lr:g}, momentum={config.momentum:g}) "
        f"or clip gradients (grad_clip, --grad-clip)")


def _format_line(kind, line):
    parts = [f"{kind} epoch {line['epoch']}"]
    for k, v in line.items():
        if k == "epoch" or v is None:
            continue
        parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)


def check_options(kind, loss="mse", alpha=0.0, temperature=4.0, **options):
    """Refuse (ValueError/TypeError) what train_teacher (kind "teacher") or distill ("distill", with
    its loss, alpha and temperature) would refuse of these options, so that a caller can do it
    before it writes anything. Returns the TrainConfig."""
    if kind == "distill":
        _check_distill(loss, alpha, temperature)
    config = _config(None, options, kind)
    config.validate()
    return config


def _check_distill(loss, alpha, temperature):
    if loss not in DISTILL_LOSSES:
        raise ValueError(f"loss must be one of {DISTILL_LOSSES}, got {loss!r}")
    if not (0.0 <= alpha <= 1.0):
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def _config(config, overrides, kind):
    config = TrainConfig() if config is None else TrainConfig(**asdict(config))
    for k, v in overrides.items():
        if not hasattr(config, k):
            raise TypeError(f"unknown training option {k!r}: expected one of {list(asdict(config))}")
        setattr(config, k, v)
    if config.lr is None:
        config.lr = DEFAULT_LR[kind]
    return config


class _Batches(Dataset):
    """dataset[list of indices] -> one collated batch: whole-batch tensor indexing for datasets that
    hold tensors (TensorDataset, TransferSet) or offer get_batch (LogitDataset), else item by item.

    `fields` picks and orders the item positions the objective takes (teacher: x, y; distill: x, t[, y]).
    """

    def __init__(self, dataset, fields):
        self.dataset, self.fields = dataset, fields

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, indices):
        ds = self.dataset
        idx = torch.as_tensor(indices, dtype=torch.long)
        if hasattr(ds, "get_batch"):
            batch = ds.get_batch(idx)
        elif isinstance(getattr(ds, "tensors", None), (tuple, list)):
            batch = tuple(t[idx] for t in ds.tensors)
        else:
            batch = default_collate([ds[i] for i in idx.tolist()])
        out = [torch.as_tensor(batch[f]) for f in self.fields]
        return out


def train_teacher(model, train_set, test_set=None, *, out_dir=None, resume=False, device=None,
                  progress=True, config=None, spec=None, data=None, **options):
    """Train `model` with cross-entropy on a dataset of (x, y) items.

    options: any TrainConfig field (epochs, batch_size, optimizer "sgd"|"adam", lr (default 0.05),
    momentum, weight_decay, schedule "cosine"|"step"|"none", seed, precision "fp32"|"bf16", ...).
    With out_dir: checkpoint.pt after each epoch and metrics.jsonl, one writer at a time (a lock
    file); resume=True continues from the checkpoint (an existing checkpoint is never overwritten
    without it), applying a changed lr, momentum, weight_decay, grad_clip, precision or a longer
    epochs and refusing (ValueError) any other change (also of `spec` or `data`, the data recipe
    recorded in the checkpoint). A non-finite loss raises FloatingPointError naming the epoch and
    step before anything is written from it.
    Returns a TrainResult.
    """
    config = _config(config, options, "teacher")
    extra = {} if data is None else {"data": data}
    return _fit("teacher", model, _TeacherObjective(model), _Batches(train_set, (0, 1)), test_set,
                config, out_dir, resume, device, progress, extra, spec)


def _label_field(dataset, first):
    """Position of the hard label y in a distill item: (x, t, y) or (x, t, index, y)."""
    names = getattr(dataset, "fields", None)  # LogitDataset says what its items hold
    if names is not None:
        if "y" not in names:
            raise ValueError(f"alpha > 0 mixes in hard labels but the dataset's items are "
                             f"{tuple(names)}: use LogitDataset(..., with_labels=True)")
        pos = names.index("y")
    elif len(first) in (3, 4):
        pos = len(first) - 1
    else:
        raise ValueError("alpha > 0 mixes in hard labels, so dataset items must be (x, teacher_logits, "
                         f"y) or (x, teacher_logits, index, y); got items of length {len(first)}")
    y = torch.as_tensor(first[pos])
    if y.is_floating_point() or y.is_complex() or y.dim() != 0:
        raise TypeError(f"the hard label y (item position {pos}) must be an integer class index "
                        f"(-1: unlabelled), got {first[pos]!r}")
    return pos


def distill(student, dataset, test_set=None, *, loss="mse", alpha=0.0, temperature=4.0,
            fused=None, out_dir=None, resume=False, device=None, progress=True, config=None,
            spec=None, data=None, inputs=None, **options):
    """Train `student` on a teacher's logits.

    dataset items: (x, teacher_logits), (x, teacher_logits, index) or, when alpha > 0,
    (x, teacher_logits, y) or (x, teacher_logits, index, y) with y = -1 for unlabelled rows
    (mimic_fast.data.store.LogitDataset, whose `fields` say which is which).
    loss: "mse" (logit regression, Ba & Caruana) or "kd" (Hinton, at `temperature`);
    total = (1 - alpha) * soft + alpha * cross-entropy on the labelled rows (y >= 0); the soft and
    hard parts are logged separately (soft_loss, hard_loss). With loss "mse", a student with a
    mimic_loss method (WideShallowStudent, models.ConvStudent) or one whose output is a
    WideShallowStudent's (e.g. a model after mimic_fast.convert.fuse_student) trains through the
    fused forward+loss op (fused=False forces the unfused path).
    inputs: the identities of the data it trains on, recorded in the checkpoint; a resume with
    other inputs is refused naming both (default: the dataset's own `identity`, which a
    LogitDataset has: its store's digest).
    Other options as in train_teacher (lr default 0.01). Returns a TrainResult.
    """
    _check_distill(loss, alpha, temperature)
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) < 2:
        size = len(first) if hasattr(first, "__len__") else "?"
        raise ValueError("distill dataset items must be (x, teacher_logits[, index[, y]]), got "
                         f"{type(first).__name__} of length {size}")
    label = _label_field(dataset, first) if alpha > 0 else None
    fused_loss = mimic_loss_of(student) if loss == "mse" and fused is not False else None
    can_fuse = fused_loss is not None
    if fused is None:
        fused = can_fuse
    elif fused and not can_fuse:
        raise ValueError("fused=True needs a student with mimic_loss (WideShallowStudent, ConvStudent) "
                         "or whose output is a WideShallowStudent's, and loss='mse' "
                         f"(got {type(student).__name__}, loss={loss!r})")
    config = _config(config, options, "distill")
    objective = _DistillObjective(student, loss, alpha, temperature, fused_loss if fused else None)
    extra = {"loss": loss, "alpha": alpha, "temperature": temperature, "fused": fused}
    if data is not None:
        extra["data"] = data
    inputs = inputs if inputs is not None else getattr(dataset, "identity", None)
    if inputs is not None:
        extra["inputs"] = dict(inputs)
    fields = (0, 1, label) if alpha > 0 else (0, 1)
    return _fit("distill", student, objective, _Batches(dataset, fields), test_set, config,
                out_dir, resume, device, progress, extra, spec)


@torch.no_grad()
def throughput(model, example, batch_size=256, min_time=0.5, device=None, precision="fp32"):
    """Inference samples per second of model(x) on batches shaped like `example` (one item), the
    forward under autocast(precision)."""
    model = unwrap(model).eval()
    device = _model_device(model, device)
    x = example.unsqueeze(0).expand(batch_size, *example.shape).contiguous().to(device)
    context = autocast(precision, device)
    with context:
        model(x)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        with context:
            model(x)
        n += 1
        sync()
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time and n >= 3:
            return n * batch_size / elapsed
