"""torch.distributed as the pipeline uses it: which rank this is, starting from torchrun's
environment, the device of a rank, and the few collectives the store and the training loop share.

Every helper works without torch.distributed (one process: rank 0 of a world of 1), so callers never
branch on it. Limits: the collectives assume every rank calls them in the same order (as any
torch.distributed collective does); an error on one rank between them leaves the others waiting.
"""
import os

import torch
import torch.distributed as dist
from torch import nn

from ._wording import option

__all__ = ["dist_info", "init_distributed", "default_device", "barrier", "broadcast", "on_rank0",
           "unwrap"]


def dist_info():
    """(rank, world_size); (0, 1) when torch.distributed is not initialised."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(backend=None):
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, ...).

    Does nothing and returns False when WORLD_SIZE is unset or 1. backend: nccl with CUDA, else gloo.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return dist.is_available() and dist.is_initialized()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def default_device(device=None):
    """`device`, or cuda if available, else cpu; under torch.distributed a bare "cuda" means this
    rank's GPU (LOCAL_RANK), so that `--device cuda` works under torchrun."""
    rank, world = dist_info()
    local = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else 0
    if device is None:
        return torch.device("cuda", local) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be a torch device such as cpu, cuda or cuda:1, got {device!r} "
                         f"({e})") from None
    if device.type == "cuda":
        # checked here: torch would fail later, deep inside model.to(), with an AssertionError
        if not torch.cuda.is_available():
            cpu = option("device='cpu'", "--device cpu")
            raise ValueError(f"device {str(device)!r} was requested but CUDA is not available "
                             f"(torch {torch.__version__}); use {cpu}")
        if device.index is None:
            device = torch.device("cuda", local)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} does not exist: this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return device


def barrier():
    if dist_info()[1] > 1:
        dist.barrier()


def broadcast(obj):
    """Rank 0's `obj` on every rank (the others' argument is ignored)."""
    if dist_info()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_rank0(fn):
    """Run fn() on rank 0 and raise its error (ValueError/OSError) on every rank: a lone raise on
    rank 0 would leave the others waiting at the next collective."""
    outcome = None
    if dist_info()[0] == 0:
        try:
            outcome = ("ok", fn())
        except (ValueError, OSError) as e:
            outcome = ("error", e)
    outcome = broadcast(outcome)
    if outcome[0] == "error":
        raise outcome[1]
    return outcome[1]


def unwrap(model):
    """The module inside a DistributedDataParallel wrapper (any other model as it is)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
