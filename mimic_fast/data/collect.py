"""Collecting a teacher's logits into a logit store (the format: mimic_fast.data.store).

The teacher runs over the dataset in order, chunk by chunk; each chunk is committed by the store's
protocol (rows flushed, checksums from the files, header atomically replaced), so a killed run
resumes at its first uncommitted chunk. An existing store is resumed or reused only after its
committed chunks, its rows' inputs and the teacher itself (rerun on a few rows) are checked. A
complete store is reused under the store's reader lock (training runs may go on reading it); one is
created, resumed or overwritten under its writer lock, refused while anyone reads it. Under
torch.distributed each rank computes its share of every chunk; rank 0 locks, decides and commits.
"""
import contextlib
import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .._io import reader_lock, writer_lock
from ..distributed import barrier, broadcast, dist_info, on_rank0
from ..models import Teacher, as_teacher
from .identity import batch_inputs, first_field, plan_batches, row_digests, teacher_fingerprint
from .store import (CHECK_INPUTS, CHUNK_BATCHES, NP_DTYPES, LogitStore, check_finite, chunk_bounds,
                    commit_chunk, create_files, new_header, open_rows, read_header, validate_header)

__all__ = ["collect_logits", "param_dtype", "REUSE_REMEDY", "CHECKED_ROWS"]


def _infer_device(teacher, device):
    if device is not None:
        return torch.device(device)
    for p in teacher.parameters():
        return p.device
    return torch.device("cpu")


def param_dtype(teacher):
    """The dtype of the teacher's first floating-point parameter (None: it has none)."""
    for p in teacher.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _run_teacher(teacher, x, device, rows, num_classes, where, name="teacher"):
    # float inputs follow a half/bfloat16/float64 teacher's dtype (dataset rows are float32)
    dtype = param_dtype(teacher) if x.is_floating_point() else None
    out = teacher(x.to(device, dtype=dtype or x.dtype, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows or (
            num_classes is not None and out.shape[1] != num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        expect = f"({rows}, {num_classes if num_classes is not None else 'C'})"
        raise ValueError(f"{name}: its output for {where} has shape {shape}: expected logits {expect}")
    return out


# what to do about a store that may not be reused (the caller's words: sweep has no --overwrite)
REUSE_REMEDY = ("use another path, or overwrite=True (`mimic-fast collect-logits --overwrite`) to "
                "replace it")
CHECKED_ROWS = 4  # rows a reused store's teacher is run on again


def _check_same_teacher(teacher, dataset, path, header, device, remedy):
    """Refuse a reused or resumed store whose teacher now gives other logits for committed rows.
    The identity check cannot see this for a teacher without parameters (a function, a lambda, a
    parameter-free module: known by name only) or under a given teacher_id; rerunning a few rows
    catches any change. Tolerance: a few units of the storage dtype's rounding, at least 1e-3 of the
    rows' largest |logit| (another batch size or device may sum in another order, or in TF32)."""
    if not header["committed"]:
        return
    m = chunk_bounds(header, header["committed"] - 1)[1]
    rows = np.unique(np.linspace(0, m - 1, num=min(m, CHECKED_ROWS)).round().astype(np.int64))
    x = first_field(torch.utils.data.default_collate([dataset[int(i)] for i in rows]))
    where = f"dataset rows {rows.tolist()}"
    got = _run_teacher(teacher, x, device, len(rows), header["num_classes"], where)
    got = got.detach().cpu().to(torch.float64)
    stored = torch.from_numpy(np.asarray(open_rows(path, header, "r")[0][rows], dtype=np.float64))
    rtol = max(4 * float(np.finfo(np.dtype(header["dtype"])).eps), 1e-3)
    tol = rtol * max(1.0, float(stored.abs().max()))
    diff = float((got - stored).abs().max()) if torch.isfinite(got).all() else float("inf")
    if not diff <= tol:
        raise ValueError(f"the teacher's logits for {where} differ from those stored in logit store "
                         f"{path} (max |difference| {diff:.3g}, tolerance {tol:.3g} for "
                         f"{header['dtype']}): the teacher changed since the store was made (one "
                         f"without parameters is known by its name only), so its stored logits are "
                         f"stale; {remedy}")


def _existing_store(path, identity, dataset, check_inputs, remedy=REUSE_REMEDY):
    """The header of the store at `path` if it may be resumed or reused for this call, None if
    there is none; refuses (ValueError) a damaged store or one made for another dataset, teacher or
    dtype."""
    header = read_header(path)
    if header is None:
        return None
    validate_header(header, path)
    for key, value in identity.items():
        if header.get(key) != value:
            raise ValueError(f"logit store {path} was made with {key} {header.get(key)!r} but this "
                             f"call has {value!r}; {remedy}")
    store = LogitStore(path, header)
    store.verify()  # a damaged committed chunk must not be resumed (or reused) as if it were good
    store.check_dataset(dataset, check_inputs)
    return header


def _lock_and_decide(held, path, identity, dataset, check_inputs, remedy, overwrite, wait):
    """Take the store's lock in the mode this call needs (held by `held`) and return the header of
    the store to reuse or resume (None: create one). A complete store that may be reused is held
    shared, so training runs reading it go on; anything else is held alone."""
    try:
        peek = None if overwrite else read_header(path)
    except ValueError:
        peek = None  # refused below, under the writer lock
    if peek is not None and peek.get("complete") is True:
        with contextlib.ExitStack() as shared:
            shared.enter_context(reader_lock(path, "logit store", wait=wait))
            header = _existing_store(path, identity, dataset, check_inputs, remedy)
            if header is not None and header["complete"]:
                held.enter_context(shared.pop_all())
                return header
    held.enter_context(writer_lock(path, "logit store", wait=wait))
    return None if overwrite else _existing_store(path, identity, dataset, check_inputs, remedy)


def collect_logits(teacher, dataset, path, batch_size=256, dtype=torch.float16, device=None,
                   chunk_rows=None, progress=True, num_workers=0, overwrite=False, teacher_id=None,
                   check_inputs="all", remedy=REUSE_REMEDY, wait=False, teacher_name="teacher"):
    """Run `teacher` (eval mode, no_grad) over `dataset` (items x or (x, ...)) and store its logits
    and a digest of every row's input at directory `path`, row i for dataset[i]. Returns the opened
    LogitStore.

    Resumes an interrupted store at its first uncommitted chunk and reuses a complete one, after
    verifying the committed chunks and checking the committed rows' inputs against `dataset`
    (check_inputs "all" or "sample", as in LogitStore.open); refuses (ValueError) a damaged store or
    one made for another dataset, teacher, or dtype unless overwrite=True. Writing (creating,
    resuming, overwriting) is refused (LockedError naming the pid) while another process reads the
    store for training or writes it; reusing a complete one only while another writes it.
    wait=True waits for them instead.
    `chunk_rows` (default 16 batches per rank) is the commit unit: at most that many rows are
    recomputed after a crash; a resumed store keeps its original chunk size. `teacher_id` replaces
    the weight hash in the teacher's identity (use it for teachers too large to hash).
    Under torch.distributed each rank computes its share of every chunk and writes it at its own
    row indices; rank 0 holds the lock, checksums and commits the chunk after a barrier. Every rank
    must call this with the same arguments; an error raised on one rank mid-run leaves the others
    at a barrier (as any collective does), and the store resumes cleanly afterwards. The dataset must
    be deterministic (no random augmentation in __getitem__): row i must mean the same input each time.
    `teacher` may be any callable (wrapped by mimic_fast.models.as_teacher; a plain function is
    identified by its qualified name unless teacher_id is given). Before a store is reused or
    resumed the teacher is run again on a few committed rows: other logits than the stored ones
    (a changed function or parameter-free teacher) are refused. `remedy`: what the refusals of an
    existing store tell the user to do; `teacher_name`: how its refusals of the teacher's output
    (NaN/Inf, overflow, shape) name it (the CLI: the --teacher files).
    """
    teacher = as_teacher(teacher)  # a module stays itself; a function is wrapped
    if teacher_id is None and isinstance(teacher, Teacher) and "net" not in teacher._modules:
        teacher_id = f"function {teacher.name}"  # a function has no weights to fingerprint
    if dtype not in NP_DTYPES:
        raise ValueError(f"dtype must be one of torch.float16, torch.float32, torch.float64 (a .npy "
                         f"file cannot hold {dtype}), got {dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if check_inputs not in CHECK_INPUTS:
        raise ValueError(f"check_inputs must be one of {CHECK_INPUTS}, got {check_inputs!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to collect")
    rank, world = dist_info()
    path = Path(path)
    device = _infer_device(teacher, device)
    identity = {"n": n, "dtype": str(np.dtype(NP_DTYPES[dtype])),
                "teacher": teacher_id if teacher_id is not None else teacher_fingerprint(teacher)}

    with contextlib.ExitStack() as held:
        # Rank 0 alone locks, reads and decides, then tells the others: no rank may see a header
        # mid-creation. An error found by rank 0 is raised on every rank (a lone raise would hang
        # the others).
        decision = None
        if rank == 0:
            try:
                decision = ("ok", _lock_and_decide(held, path, identity, dataset, check_inputs,
                                                   remedy, overwrite, wait))
            except (ValueError, OSError) as e:
                decision = ("error", e)
        status, header = broadcast(decision)
        if status == "error":
            raise header
        was_training = teacher.training
        teacher.eval()
        try:
            with torch.no_grad():
                if header is not None:  # every rank: each would raise the same refusal
                    _check_same_teacher(teacher, dataset, path, header, device, remedy)
                if header is None:
                    header = _create(teacher, dataset, path, identity, batch_size, chunk_rows, device,
                                     world, teacher_name)
                if not header["complete"]:
                    logits, inputs = open_rows(path, header)
                    _collect_chunks(teacher, dataset, path, header, logits, inputs, batch_size, dtype,
                                    device, progress, num_workers, world, rank, teacher_name)
                    del logits, inputs
        finally:
            teacher.train(was_training)
        barrier()  # every rank returns only once rank 0 has committed the last chunk
    # Verified already: a reused or resumed store's committed chunks by _existing_store, new chunks
    # by their checksums just computed from the files themselves.
    store = LogitStore.open(path, verify=False)
    if check_inputs == "all":
        store._checked.append(dataset)  # every row was just hashed or checked against the store
    return store


def _create(teacher, dataset, path, identity, batch_size, chunk_rows, device, world,
            teacher_name):
    # Probe the number of classes with one row (cheap, and identical on every rank).
    x0 = first_field(torch.utils.data.default_collate([dataset[0]]))
    num_classes = int(_run_teacher(teacher, x0, device, 1, None, "dataset[0]", teacher_name).shape[1])
    header = new_header(identity, num_classes,
                        CHUNK_BATCHES * batch_size * world if chunk_rows is None else chunk_rows, world)
    # a full disk (the rows are preallocated) raises on rank 0: on_rank0 raises it on every rank
    on_rank0(lambda: create_files(path, header))
    return header


def _collect_chunks(teacher, dataset, path, header, logits, inputs, batch_size, dtype, device,
                    progress, num_workers, world, rank, teacher_name):
    # Each rank's contiguous share of each remaining chunk, cut into batches that never cross a
    # chunk boundary, so one DataLoader (one set of workers) serves the whole run.
    plan = []
    for k in range(header["committed"], header["n_chunks"]):
        lo, hi = chunk_bounds(header, k)
        share = math.ceil((hi - lo) / world)
        r_lo, r_hi = min(hi, lo + rank * share), min(hi, lo + (rank + 1) * share)
        plan.append((k, plan_batches(r_lo, r_hi, batch_size)))
    rows = batch_inputs(dataset, [b for _, bs in plan for b in bs], num_workers)
    bar = tqdm(total=header["n"], initial=min(header["n"], header["committed"] * header["chunk_rows"]),
               unit="rows", desc="teacher logits", disable=not progress or rank != 0)
    try:
        for k, chunk_batches in plan:
            for _ in chunk_batches:
                b, x = next(rows)
                where = f"rows {b[0]}..{b[-1]}"
                inputs[b[0]: b[-1] + 1] = row_digests(x, f"dataset {where}")
                out = _run_teacher(teacher, x, device, len(b), header["num_classes"], where,
                                   teacher_name)
                stored = out.to(dtype)
                check_finite(out, stored, b[0], where, dtype, teacher_name)
                logits[b[0]: b[-1] + 1] = stored.cpu().numpy()
                bar.update(len(b) * world)
            logits.flush()  # this rank's rows reach the file before anyone commits them
            inputs.flush()
            barrier()
            if rank == 0:
                commit_chunk(path, header, k, logits, inputs)
            bar.n = min(header["n"], (k + 1) * header["chunk_rows"])
            bar.refresh()
    finally:
        bar.close()
