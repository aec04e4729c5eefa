"""Crash-safe store of a teacher's logits, keyed by sample index (row i = logits of dataset[i]).

Layout of a store directory: `logits.npy` (an (N, C) .npy file written through a memmap) and
`header.json`. Rows are written chunk by chunk, in order; a chunk is committed by flushing its rows,
then atomically replacing the header (write temp, fsync, os.replace, fsync dir) with the chunk's
checksum appended. The header is the only truth: rows past `committed` chunks are ignored, so a run
killed at any instant (even SIGKILL) resumes at the first uncommitted chunk with nothing lost,
duplicated or shifted. Limits: numpy cannot hold bfloat16 (use float16 or float32); under
torch.distributed all ranks must see one file system where rank 0 reads the rows other ranks wrote
(one node, or a coherent shared file system).
"""
import datetime
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._io import atomic_write_text

__all__ = ["collect_logits", "fingerprint", "LogitStore", "LogitDataset", "teacher_fingerprint"]

HEADER_NAME = "header.json"
LOGITS_NAME = "logits.npy"
FORMAT = "mimic_fast.logit_store"
VERSION = 1
_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


# ----------------------------------------------------------------------------- identities

def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _tensor_bytes(value, where):
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(value)
        except Exception:
            raise TypeError(f"{where} is a {type(value).__name__}: expected a tensor or array "
                            f"(give the dataset a transform that returns tensors)") from None
    t = value.detach().cpu().contiguous()
    head = f"{tuple(t.shape)}|{t.dtype}|".encode()
    return head + t.reshape(-1).view(torch.uint8).numpy().tobytes()


def fingerprint(dataset, n_samples=64):
    """A cheap identity of a dataset's inputs: a hash of N and the bytes (with shape and dtype) of the
    inputs x of ~n_samples rows: the first, the last, evenly spaced ones and a few pseudo-random ones
    (seeded by N, so the same rows are read every time). Labels are not hashed: logits depend only
    on x, so TensorDataset(X) and TensorDataset(X, y) share a store."""
    n = len(dataset)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{FORMAT}|n={n}".encode())
    if n:
        spaced = np.linspace(0, n - 1, num=min(n, n_samples // 2 + 2)).round().astype(np.int64)
        rand = np.random.default_rng(n).integers(0, n, size=min(n, n_samples // 2))
        for i in sorted(set(spaced.tolist()) | set(rand.tolist())):
            h.update(_tensor_bytes(_first(dataset[i]), f"dataset[{i}]"))
    return h.hexdigest()


def teacher_fingerprint(teacher):
    """Class, parameter count and a hash of every parameter's and buffer's name, shape, float64 sum
    and first 16 values: equal for the same weights reloaded, different for another teacher."""
    h = hashlib.blake2b(digest_size=16)
    n_params = 0
    with torch.no_grad():
        for name, t in list(teacher.named_parameters()) + list(teacher.named_buffers()):
            n_params += t.numel() if isinstance(t, torch.nn.Parameter) else 0
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type != "meta" and t.numel():
                flat = t.detach().reshape(-1)
                h.update(np.float64(flat.double().sum().item()).tobytes())
                h.update(_tensor_bytes(flat[:16], name))
    return f"{type(teacher).__name__}, {n_params} parameters, weights {h.hexdigest()}"


def _checksum(rows):
    # sha256: hardware-accelerated on current CPUs (~1 GB/s here, 3x blake2b); hashed in place.
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


# ----------------------------------------------------------------------------- header I/O

def _read_header(directory):
    p = Path(directory) / HEADER_NAME
    if not p.exists():
        return None
    try:
        header = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a valid logit-store header ({e}); delete the store or pass "
                         f"overwrite=True") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{p} is not a mimic_fast logit-store header (format "
                         f"{header.get('format') if isinstance(header, dict) else None!r})")
    return header


def _write_header(directory, header):
    """Atomic: readers (and a resumed run) see the old header or the new one, never a torn one."""
    atomic_write_text(Path(directory) / HEADER_NAME, json.dumps(header, indent=1))


def _chunk_bounds(header, k):
    lo = k * header["chunk_rows"]
    return lo, min(header["n"], lo + header["chunk_rows"])


# ----------------------------------------------------------------------------- reading

class LogitStore:
    """A store opened for reading: `.logits` is the (N, C) memmap, `.header` the committed header.

    Pickles by path (a DataLoader worker reopens the memmap instead of copying it).
    """

    def __init__(self, path, header):
        self.path = Path(path)
        self.header = header
        self._logits = None

    @classmethod
    def open(cls, path, dataset=None, allow_partial=False):
        """Open the store at `path`. With `dataset`, refuse (ValueError, both fingerprints shown) a
        store made for other data. An incomplete store is refused unless allow_partial=True (then
        only the first `committed_rows` rows are valid)."""
        path = Path(path)
        header = _read_header(path)
        if header is None:
            raise FileNotFoundError(f"no logit store at {path}: expected {path / HEADER_NAME} "
                                    f"(made by collect_logits)")
        store = cls(path, header)
        if not (path / LOGITS_NAME).exists():
            raise FileNotFoundError(f"{path / LOGITS_NAME} is missing but {path / HEADER_NAME} exists")
        shape, dtype = store.logits.shape, store.logits.dtype
        if shape != (header["n"], header["num_classes"]) or str(dtype) != header["dtype"]:
            raise ValueError(f"{path / LOGITS_NAME} holds {shape} {dtype} but the header says "
                             f"({header['n']}, {header['num_classes']}) {header['dtype']}")
        if dataset is not None:
            store.check_dataset(dataset)
        if not header["complete"] and not allow_partial:
            raise ValueError(f"logit store {path} is incomplete: {store.committed_rows} of "
                             f"{header['n']} rows committed; run collect_logits again to resume, "
                             f"or open with allow_partial=True")
        return store

    @classmethod
    def from_array(cls, path, logits, dataset, dtype=None, overwrite=False, source=None):
        """Write logits computed elsewhere (an (N, C) numpy array or tensor, row i for dataset[i])
        as an ordinary store at `path`, through collect_logits' own writing path (chunks, checksums,
        the dataset's fingerprint), then verify it and check every row against `logits`.

        dtype: storage dtype (default: the array's float16/float32/float64, else float32).
        `source` (e.g. the file name) goes into the header's teacher identity with a hash of the
        rows. An existing store at `path` is refused unless overwrite=True. Single process only.
        """
        arr = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        if arr.dtype.kind != "f" or arr.ndim != 2:
            raise TypeError(f"logits must be a 2-D floating-point (N, C) array, got {arr.ndim}-D "
                            f"{arr.dtype} of shape {arr.shape}")
        if len(arr) != len(dataset):
            raise ValueError(f"logits has {len(arr)} rows but the dataset has {len(dataset)}: "
                             "row i must be the teacher's logits for dataset[i]")
        if dtype is None:
            dtype = {np.dtype(v): k for k, v in _NP_DTYPES.items()}.get(arr.dtype, torch.float32)
        if (Path(path) / HEADER_NAME).exists() and not overwrite:
            raise FileExistsError(f"a logit store exists at {path}; pass overwrite=True to replace it")
        digest = hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()
        teacher_id = f"array {source or ''} {arr.shape} {arr.dtype} sha256 {digest}".replace("  ", " ")
        # collect_logits probes one row (dataset[0]) first, then asks for every row in order.
        store = collect_logits(_RowsInOrder(arr), dataset, path, dtype=dtype, overwrite=True,
                               progress=False, teacher_id=teacher_id)
        store.verify()
        if not np.array_equal(store.logits, arr.astype(store.logits.dtype)):
            raise RuntimeError(f"logit store {path} does not hold the rows it was given")
        return store

    def check_dataset(self, dataset):
        if len(dataset) != self.n:
            raise ValueError(f"dataset has {len(dataset)} rows but the logit store {self.path} was made "
                             f"for {self.n} rows (fingerprint {self.header['fingerprint']})")
        fp = fingerprint(dataset)
        if fp != self.header["fingerprint"]:
            raise ValueError(f"dataset fingerprint {fp} differs from the logit store's "
                             f"{self.header['fingerprint']} ({self.path}): the store was made for "
                             f"other data or another row order")

    @property
    def logits(self):
        if self._logits is None:
            self._logits = np.load(self.path / LOGITS_NAME, mmap_mode="r")
        return self._logits

    n = property(lambda self: self.header["n"])
    num_classes = property(lambda self: self.header["num_classes"])
    complete = property(lambda self: bool(self.header["complete"]))
    committed_rows = property(lambda self: min(self.n, self.header["committed"] * self.header["chunk_rows"]))

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        """Row(s) as a float32 tensor (a copy); int, slice or index array."""
        if isinstance(index, (int, np.integer)):
            i = int(index) + (self.n if index < 0 else 0)
            if not 0 <= i < self.committed_rows:
                raise IndexError(f"row {index} is out of range or not committed "
                                 f"({self.committed_rows} of {self.n} rows committed)")
        return torch.from_numpy(np.array(self.logits[index], dtype=np.float32))

    def tensor(self, dtype=torch.float32):
        """All committed rows as one in-memory tensor (fast path for data that fits in RAM)."""
        return torch.from_numpy(np.array(self.logits[: self.committed_rows])).to(dtype)

    def verify(self, raise_error=True):
        """Recompute every committed chunk's checksum. Returns the list of bad chunk indices; with
        raise_error (default) a mismatch raises ValueError naming the chunks and their rows."""
        bad = []
        for k, expected in enumerate(self.header["checksums"][: self.header["committed"]]):
            lo, hi = _chunk_bounds(self.header, k)
            if _checksum(self.logits[lo:hi]) != expected:
                bad.append(k)
        if bad and raise_error:
            spans = ", ".join(f"chunk {k} (rows {_chunk_bounds(self.header, k)[0]}.."
                              f"{_chunk_bounds(self.header, k)[1] - 1})" for k in bad)
            raise ValueError(f"logit store {self.path}: checksum mismatch in {spans}; the file was "
                             f"modified or corrupted; recollect with overwrite=True")
        return bad

    def __getstate__(self):
        return {"path": self.path, "header": self.header}

    def __setstate__(self, state):
        self.path, self.header, self._logits = state["path"], state["header"], None

    def __repr__(self):
        return (f"LogitStore({str(self.path)!r}, n={self.n}, num_classes={self.num_classes}, "
                f"dtype={self.header['dtype']}, committed_rows={self.committed_rows})")


class _RowsInOrder(torch.nn.Module):
    """A stand-in teacher for LogitStore.from_array: returns the given rows in the order
    collect_logits asks for them (one probe row, then every batch in order)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.next, self.probed = rows, 0, False

    def forward(self, x):
        if not self.probed:
            self.probed = True
            return torch.from_numpy(np.array(self.rows[: len(x)]))
        out = torch.from_numpy(np.array(self.rows[self.next: self.next + len(x)]))
        self.next += len(x)
        return out


class LogitDataset(Dataset):
    """dataset[i] paired with the teacher's logits for row i, by index, so any shuffling or sampler
    keeps them aligned. Item: (x_i, logits_i float32, i) or, with_labels, (x_i, logits_i, i, y_i),
    y_i = -1 where the item has no label (an unlabelled or generated transfer row);
    with_index=False drops i: (x_i, logits_i[, y_i]). `fields` names the positions.

    `store` is a LogitStore or a store path; the dataset's fingerprint must match the store's.
    """

    def __init__(self, dataset, store, with_labels=False, with_index=True):
        if not isinstance(store, LogitStore):
            store = LogitStore.open(store)
        store.check_dataset(dataset)
        if not store.complete:
            raise ValueError(f"logit store {store.path} is incomplete ({store.committed_rows} of "
                             f"{store.n} rows); finish it with collect_logits first")
        self.dataset, self.store, self.with_labels = dataset, store, bool(with_labels)
        self.with_index = bool(with_index)
        self.fields = ("x", "logits") + (("index",) if with_index else ()) + (
            ("y",) if with_labels else ())

    def _pick(self, x, t, index, y):
        values = {"x": x, "logits": t, "index": index, "y": y}
        return tuple(values[f] for f in self.fields)

    def __len__(self):
        return len(self.dataset)

    def _label(self, item):
        if isinstance(item, (tuple, list)) and len(item) > 1:
            return item[1]
        return -1

    def __getitem__(self, index):
        index = int(index)
        item = self.dataset[index]
        t = torch.from_numpy(np.array(self.store.logits[index], dtype=np.float32))
        return self._pick(_first(item), t, index, self._label(item) if self.with_labels else None)

    def get_batch(self, indices):
        """Collated batch for an index list without per-item Python work when the dataset holds
        tensors (TensorDataset, TransferSet): same tuple layout as a DataLoader batch."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None:
            return torch.utils.data.default_collate([self[int(i)] for i in idx])
        x = tensors[0][idx]
        t = torch.from_numpy(np.array(self.store.logits[idx.numpy()], dtype=np.float32))
        y = None
        if self.with_labels:
            y = tensors[1][idx] if len(tensors) > 1 else torch.full((len(idx),), -1, dtype=torch.int64)
        return self._pick(x, t, idx, y)


# ----------------------------------------------------------------------------- writing

def _dist_info():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def _barrier(world):
    if world > 1:
        torch.distributed.barrier()


def _broadcast(obj, world):
    if world == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _infer_device(teacher, device):
    if device is not None:
        return torch.device(device)
    for p in teacher.parameters():
        return p.device
    return torch.device("cpu")


def _param_dtype(teacher):
    for p in teacher.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _run_teacher(teacher, x, device, rows, num_classes, where):
    # float inputs follow a half/bfloat16/float64 teacher's dtype (dataset rows are float32)
    dtype = _param_dtype(teacher) if x.is_floating_point() else None
    out = teacher(x.to(device, dtype=dtype or x.dtype, non_blocking=True))
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows or (
            num_classes is not None and out.shape[1] != num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        expect = f"({rows}, {num_classes if num_classes is not None else 'C'})"
        raise ValueError(f"teacher output for {where} has shape {shape}: expected logits {expect}")
    return out


def _fetch(dataset, batch, loader_iter):
    if loader_iter is None:  # tensors held in memory: slice, no per-item work
        return dataset.tensors[0][batch[0]: batch[-1] + 1]
    return _first(next(loader_iter))


def collect_logits(teacher, dataset, path, batch_size=256, dtype=torch.float16, device=None,
                   chunk_rows=None, progress=True, num_workers=0, overwrite=False, teacher_id=None):
    """Run `teacher` (eval mode, no_grad) over `dataset` (items x or (x, ...)) and store its logits
    at directory `path`, row i for dataset[i]. Returns the opened LogitStore.

    Resumes an interrupted store at its first uncommitted chunk and reuses a complete one; refuses
    (ValueError) a store made for another dataset, teacher, or dtype unless overwrite=True.
    `chunk_rows` (default 16 batches per rank) is the commit unit: at most that many rows are
    recomputed after a crash; a resumed store keeps its original chunk size. `teacher_id` replaces
    the weight hash in the teacher's identity (use it for teachers too large to hash).
    Under torch.distributed each rank computes its share of every chunk and writes it at its own
    row indices; rank 0 checksums and commits the chunk after a barrier. Every rank must call this
    with the same arguments; an error raised on one rank mid-run leaves the others at a barrier
    (as any collective does), and the store resumes cleanly afterwards. The dataset must be
    deterministic (no random augmentation in __getitem__): row i must mean the same input each time.
    `teacher` may be any callable (wrapped by mimic_fast.teachers.as_teacher; a plain function is
    identified by its qualified name unless teacher_id is given).
    """
    if not isinstance(teacher, torch.nn.Module):
        from ..teachers import as_teacher

        teacher = as_teacher(teacher)
        teacher_id = teacher_id if teacher_id is not None else f"function {teacher.name}"
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of torch.float16, torch.float32, torch.float64 (a .npy "
                         f"file cannot hold {dtype}), got {dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to collect")
    world, rank = _dist_info()
    path = Path(path)
    device = _infer_device(teacher, device)
    identity = {"n": n, "fingerprint": fingerprint(dataset), "dtype": str(np.dtype(_NP_DTYPES[dtype])),
                "teacher": teacher_id if teacher_id is not None else teacher_fingerprint(teacher)}

    # Rank 0 alone reads and decides, then tells the others: no rank may see a header mid-creation.
    # An error found by rank 0 is raised on every rank (a lone raise would hang the others).
    decision = None
    if rank == 0:
        try:
            header = None if overwrite else _read_header(path)
            for key, value in identity.items():
                if header is not None and header.get(key) != value:
                    raise ValueError(f"logit store {path} was made with {key} {header.get(key)!r} "
                                     f"but this call has {value!r}; use another path or overwrite=True")
            decision = ("ok", header)
        except ValueError as e:
            decision = ("error", str(e))
    status, header = _broadcast(decision, world)
    if status == "error":
        raise ValueError(header)

    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            if header is not None and header["complete"]:
                _barrier(world)
                return LogitStore.open(path, dataset)
            if header is None:
                # Probe the number of classes with one row (cheap, and identical on every rank).
                x0 = _first(torch.utils.data.default_collate([dataset[0]]))
                num_classes = int(_run_teacher(teacher, x0, device, 1, None, "dataset[0]").shape[1])
                if chunk_rows is None:
                    chunk_rows = 16 * batch_size * world
                if not isinstance(chunk_rows, int) or chunk_rows < 1:
                    raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
                header = {"format": FORMAT, "version": VERSION, "checksum": "sha256", **identity,
                          "num_classes": num_classes,
                          "chunk_rows": chunk_rows, "n_chunks": math.ceil(n / chunk_rows),
                          "committed": 0, "checksums": [], "complete": False,
                          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                          "world_size": world}
                if rank == 0:
                    path.mkdir(parents=True, exist_ok=True)
                    # Header first: a crash before the new header exists leaves no header at all,
                    # never an old header over new rows.
                    (path / HEADER_NAME).unlink(missing_ok=True)
                    mm = np.lib.format.open_memmap(path / LOGITS_NAME, mode="w+",
                                                   dtype=_NP_DTYPES[dtype], shape=(n, num_classes))
                    mm.flush()
                    del mm
                    _write_header(path, header)
                _barrier(world)
            if not (path / LOGITS_NAME).is_file():
                raise FileNotFoundError(f"{path / HEADER_NAME} exists but {path / LOGITS_NAME} is "
                                        f"missing: the store is broken; use overwrite=True")
            mm = np.lib.format.open_memmap(path / LOGITS_NAME, mode="r+")
            if mm.shape != (n, header["num_classes"]) or mm.dtype != np.dtype(header["dtype"]):
                raise ValueError(f"{path / LOGITS_NAME} holds {mm.shape} {mm.dtype} but the header "
                                 f"says ({n}, {header['num_classes']}) {header['dtype']}; "
                                 f"use overwrite=True")
            _collect_chunks(teacher, dataset, path, header, mm, batch_size, dtype, device,
                            progress, num_workers, world, rank)
            del mm
    finally:
        teacher.train(was_training)
    _barrier(world)  # every rank returns only once rank 0 has committed the last chunk
    return LogitStore.open(path, dataset)


def _collect_chunks(teacher, dataset, path, header, mm, batch_size, dtype, device, progress,
                    num_workers, world, rank):
    # Each rank's contiguous share of each remaining chunk, cut into batches that never cross a
    # chunk boundary, so one DataLoader (one set of workers) serves the whole run.
    plan = []
    for k in range(header["committed"], header["n_chunks"]):
        lo, hi = _chunk_bounds(header, k)
        share = math.ceil((hi - lo) / world)
        r_lo, r_hi = min(hi, lo + rank * share), min(hi, lo + (rank + 1) * share)
        plan.append((k, [range(b, min(b + batch_size, r_hi)) for b in range(r_lo, r_hi, batch_size)]))
    batches = [b for _, bs in plan for b in bs]
    fast = num_workers == 0 and isinstance(getattr(dataset, "tensors", None), (tuple, list))
    loader_iter = None
    if not fast and batches:
        loader_iter = iter(torch.utils.data.DataLoader(dataset, batch_sampler=batches,
                                                       num_workers=num_workers))
    from tqdm.auto import tqdm

    bar = tqdm(total=header["n"], initial=min(header["n"], header["committed"] * header["chunk_rows"]),
               unit="rows", desc="teacher logits", disable=not progress or rank != 0)
    try:
        for k, chunk_batches in plan:
            for b in chunk_batches:
                x = _fetch(dataset, b, loader_iter)
                where = f"rows {b[0]}..{b[-1]}"
                out = _run_teacher(teacher, x, device, len(b), header["num_classes"], where)
                stored = out.to(dtype)
                # One float64 sum is finite iff every stored value is (NaN/Inf propagate; finite
                # float16/32 values cannot overflow it): 3x cheaper than isfinite().all() twice.
                if not torch.isfinite(stored.sum(dtype=torch.float64)):
                    if not torch.isfinite(out).all():
                        raise ValueError(f"teacher produced NaN/Inf logits for {where}")
                    raise ValueError(f"teacher logits for {where} overflow {dtype} (max |logit| "
                                     f"{out.abs().max().item():.3g}); use dtype=torch.float32")
                mm[b[0]: b[-1] + 1] = stored.cpu().numpy()
                bar.update(len(b) * world)
            mm.flush()  # this rank's rows reach the file before anyone commits them
            _barrier(world)
            if rank == 0:
                lo, hi = _chunk_bounds(header, k)
                header["checksums"] = header["checksums"][:k] + [_checksum(mm[lo:hi])]
                header["committed"] = k + 1
                header["complete"] = k + 1 == header["n_chunks"]
                _write_header(path, header)
            bar.n = min(header["n"], (k + 1) * header["chunk_rows"])
            bar.refresh()
    finally:
        bar.close()
