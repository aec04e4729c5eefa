"""Crash-safe, verified store of a teacher's logits, keyed by sample index (row i = logits of dataset[i]).

Layout of a store directory: `logits.npy` ((N, C) rows written through a memmap), `inputs.npy`
((N,) uint64: a digest of each row's input, so the store knows which inputs its logits belong to)
and `header.json`. Rows are written chunk by chunk, in order; a chunk is committed by flushing its
rows, then atomically replacing the header (write temp, fsync, os.replace, fsync dir) with the sha256
of the chunk's logits and of its input digests appended. The header is the only truth: rows past
`committed` chunks are ignored, so a run killed at any instant (even SIGKILL) resumes at the first
uncommitted chunk with nothing lost, duplicated or shifted. Opening a store checks every committed
chunk's checksum (one sequential read of the file) and, given a dataset, every row's input digest
(one pass over the inputs; "sample" checks ~1000 rows). One writer at a time (a lock file).
Limits: numpy cannot hold bfloat16 (use float16 or float32); under torch.distributed all ranks must
see one file system where rank 0 reads the rows other ranks wrote (one node, or a coherent shared
file system).
"""
import contextlib
import datetime
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._io import atomic_write_text, writer_lock

__all__ = ["collect_logits", "fingerprint", "input_digests", "LogitStore", "LogitDataset",
           "teacher_fingerprint"]

HEADER_NAME = "header.json"
LOGITS_NAME = "logits.npy"
INPUTS_NAME = "inputs.npy"
FORMAT = "mimic_fast.logit_store"
VERSION = 2  # 2: per-row input digests (inputs.npy) and their per-chunk checksums
CHECK_INPUTS = ("all", "sample")
SAMPLE_ROWS = 1024  # rows hashed by check_inputs="sample"
_NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
REMEDY = ("recollect it: collect_logits(..., overwrite=True), or the same `mimic-fast collect-logits` "
          "command with --overwrite")


# ----------------------------------------------------------------------------- identities

def _first(item):
    return item[0] if isinstance(item, (tuple, list)) else item


def _row_digests(x, where):
    """(b,) uint64: for each row of the batch x (b, ...), the first 8 bytes of sha256 over the row's
    shape, dtype and bytes. sha256 is hardware-accelerated here (~1.6 GB/s, 1.5x blake2b)."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} is a {type(x).__name__}: expected tensors or arrays (give the "
                        "dataset a transform that returns tensors)")
    t = x.detach().cpu().contiguous()
    if t.dim() == 0:
        raise ValueError(f"{where} is a 0-d batch: expected rows (b, ...)")
    head = hashlib.sha256(f"{tuple(t.shape[1:])}|{t.dtype}|".encode())
    rows = t.reshape(len(t), -1).view(torch.uint8).numpy() if t[0].numel() else \
        np.zeros((len(t), 0), np.uint8)
    out = bytearray()
    for r in rows:
        h = head.copy()
        h.update(r)
        out += h.digest()[:8]
    return np.frombuffer(bytes(out), dtype=np.uint64)


def _plan_batches(lo, hi, batch_size):
    return [range(b, min(b + batch_size, hi)) for b in range(lo, hi, batch_size)]


def _batch_inputs(dataset, batches, num_workers=0):
    """Yield (rows, x) for each index range, x the collated inputs: whole-tensor slices when the
    dataset holds tensors (no per-item work), else a DataLoader over the index batches. Collection
    and verification both read rows through here, so they hash the very same bytes."""
    tensors = getattr(dataset, "tensors", None)
    if num_workers == 0 and isinstance(tensors, (tuple, list)):
        for b in batches:
            yield b, tensors[0][b[0]: b[-1] + 1]
        return
    if not batches:
        return
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)
    for b, item in zip(batches, loader):
        yield b, _first(item)


def input_digests(dataset, rows=None, batch_size=1024):
    """uint64 digests of dataset[i]'s input x for i in `rows` (None: every row; a range: those rows,
    read in batches; an index array: gathered): what a store records for each row it collects.
    Labels are not hashed: logits depend only on x, so TensorDataset(X) and TensorDataset(X, y)
    share a store."""
    if rows is None:
        rows = range(len(dataset))
    if isinstance(rows, range):
        batches = _plan_batches(rows.start, rows.stop, batch_size)
    else:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        tensors = getattr(dataset, "tensors", None)
        if isinstance(tensors, (tuple, list)) and len(rows):  # the sampled rows in one gather
            return _row_digests(tensors[0][torch.from_numpy(rows)], "dataset rows")
        batches = [range(int(i), int(i) + 1) for i in rows]
    parts = [_row_digests(x, f"dataset[{b[0]}..{b[-1]}]") for b, x in _batch_inputs(dataset, batches)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def fingerprint(dataset):
    """Identity of a dataset's inputs: sha256 (hex, 32 chars) over N and every row's input digest
    (one pass over the inputs). Equal for the same rows in the same order, different after any
    change, swap or shuffle of rows."""
    h = hashlib.sha256(f"{FORMAT}|n={len(dataset)}|".encode())
    h.update(input_digests(dataset).tobytes())
    return h.hexdigest()[:32]


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
                first = flat[:16].cpu().contiguous()
                h.update(first.view(torch.uint8).numpy().tobytes())
    return f"{type(teacher).__name__}, {n_params} parameters, weights {h.hexdigest()}"


def _checksum(rows):
    # sha256: hardware-accelerated on current CPUs (~1.6 GB/s here, 1.5x blake2b); hashed in place.
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


# ----------------------------------------------------------------------------- header and files

def _read_header(directory):
    p = Path(directory) / HEADER_NAME
    if not p.exists():
        return None
    try:
        header = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a valid logit-store header ({e}); {REMEDY}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{p} is not a mimic_fast logit-store header (format {found!r}); {REMEDY}")
    return header


def _is_int(v, lo):
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _is_sha_list(v, length):
    return (isinstance(v, list) and len(v) == length and
            all(isinstance(s, str) and len(s) == 64 and set(s) <= set("0123456789abcdef") for s in v))


def _validate_header(header, directory):
    """Check the header as a whole (schema, counts consistent with each other); one ValueError
    listing every problem."""
    p = Path(directory) / HEADER_NAME
    if header.get("version") != VERSION:
        raise ValueError(f"{p} is a logit store of format version {header.get('version')!r}; this "
                         f"mimic_fast reads version {VERSION} (with per-row input digests): {REMEDY}")
    bad = []
    for key, lo in (("n", 1), ("num_classes", 1), ("chunk_rows", 1), ("n_chunks", 1), ("committed", 0)):
        if not _is_int(header.get(key), lo):
            bad.append(f"{key} must be an int >= {lo}, got {header.get(key)!r}")
    if header.get("dtype") not in {str(np.dtype(d)) for d in _NP_DTYPES.values()}:
        bad.append(f"dtype must be float16, float32 or float64, got {header.get('dtype')!r}")
    if header.get("checksum") != "sha256":
        bad.append(f"checksum must be 'sha256', got {header.get('checksum')!r}")
    if not isinstance(header.get("teacher"), str):
        bad.append(f"teacher must be a string, got {header.get('teacher')!r}")
    if not isinstance(header.get("complete"), bool):
        bad.append(f"complete must be true or false, got {header.get('complete')!r}")
    if not bad:
        n, rows, chunks, done = (header[k] for k in ("n", "chunk_rows", "n_chunks", "committed"))
        if chunks != math.ceil(n / rows):
            bad.append(f"n_chunks is {chunks} but n={n} rows in chunks of {rows} make "
                       f"{math.ceil(n / rows)}")
        elif done > chunks:
            bad.append(f"committed is {done} but there are only {chunks} chunks")
        elif header["complete"] != (done == chunks):
            bad.append(f"complete is {str(header['complete']).lower()} but {done} of {chunks} "
                       "chunks are committed")
        for key in ("checksums", "input_checksums"):
            if not _is_sha_list(header.get(key), done):
                got = header.get(key)
                what = f"a list of {len(got)}" if isinstance(got, list) else repr(got)[:40]
                bad.append(f"{key} must list {done} sha256 hex digests (one per committed chunk), "
                           f"got {what}")
    if bad:
        raise ValueError(f"{p} is not a valid logit-store header: {'; '.join(bad)}; {REMEDY}")


def _write_header(directory, header):
    """Atomic: readers (and a resumed run) see the old header or the new one, never a torn one."""
    atomic_write_text(Path(directory) / HEADER_NAME, json.dumps(header, indent=1))


def _chunk_bounds(header, k):
    lo = k * header["chunk_rows"]
    return lo, min(header["n"], lo + header["chunk_rows"])


def _open_npy(path, shape, dtype, mode="r"):
    """Memmap of the .npy file at `path`, refused (ValueError naming the file) unless it is a
    readable C-order .npy of exactly this shape and dtype whose size matches (a truncated or padded
    file, a damaged magic or header)."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                got_shape, fortran, got_dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not supported")
            offset = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} is missing but {Path(path).parent / HEADER_NAME} exists: "
                                f"the store is broken; {REMEDY}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy file ({e}); {REMEDY}") from None
    problems = []
    if tuple(got_shape) != tuple(shape) or got_dtype != np.dtype(dtype) or fortran:
        problems.append(f"it holds {tuple(got_shape)} {got_dtype}{' (Fortran order)' if fortran else ''}"
                        f" but the header says {tuple(shape)} {np.dtype(dtype)}")
    else:
        size, expected = os.path.getsize(path), offset + math.prod(shape) * np.dtype(dtype).itemsize
        if size != expected:
            problems.append(f"it is {size} bytes but {tuple(shape)} {np.dtype(dtype)} rows need "
                            f"{expected} (truncated or padded)")
    if problems:
        raise ValueError(f"{path}: {problems[0]}; {REMEDY}")
    return np.memmap(path, dtype=np.dtype(dtype), mode=mode, offset=offset, shape=tuple(shape))


# ----------------------------------------------------------------------------- reading

class LogitStore:
    """A store opened for reading: `.logits` is the (N, C) memmap, `.header` the committed header.

    Pickles by path (a DataLoader worker reopens the memmap instead of copying it, unverified: the
    process that opened the store verified it).
    """

    def __init__(self, path, header):
        self.path = Path(path)
        self.header = header
        self._logits = self._inputs = None
        self._checked = []  # datasets whose inputs were checked against this store (by identity)

    @classmethod
    def open(cls, path, dataset=None, allow_partial=False, verify=True, check_inputs="all"):
        """Open the store at `path`, validating its header and file sizes.

        verify=True (default) recomputes every committed chunk's checksums (one sequential read of
        the store: ~65 ms for 200k x 183 float16 rows) and refuses damage naming the chunk and
        rows; verify=False skips that for huge stores (then call .verify() yourself).
        With `dataset`, every row's input is hashed and compared with the digest stored for it
        (check_inputs="all", one pass over the inputs) or ~1000 of them ("sample": first, last,
        evenly spaced and random rows); a changed, swapped or shuffled row is refused naming the
        first bad index. An incomplete store is refused unless allow_partial=True (then only the
        first `committed_rows` rows are valid)."""
        if check_inputs not in CHECK_INPUTS:
            raise ValueError(f"check_inputs must be one of {CHECK_INPUTS}, got {check_inputs!r}")
        path = Path(path)
        header = _read_header(path)
        if header is None:
            raise FileNotFoundError(f"no logit store at {path}: expected {path / HEADER_NAME} "
                                    f"(made by collect_logits)")
        _validate_header(header, path)
        store = cls(path, header)
        store.logits, store.inputs  # noqa: B018  (open both files now: size and layout checks)
        if not header["complete"] and not allow_partial:
            raise ValueError(f"logit store {path} is incomplete: {store.committed_rows} of "
                             f"{header['n']} rows committed; run collect_logits (the same "
                             f"`mimic-fast collect-logits` command) again to resume it, or open it "
                             f"with allow_partial=True")
        if verify:
            store.verify()
        if dataset is not None:
            store.check_dataset(dataset, check_inputs)
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
        if _dist_info()[0] > 1:  # every rank would write its share of rows the array does not shard
            raise ValueError("LogitStore.from_array runs in one process, not under torch.distributed")
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

    def check_dataset(self, dataset, check_inputs="all"):
        """Refuse (ValueError) a dataset whose inputs are not the ones the committed rows were
        collected for: another length, or a changed, swapped or shuffled row (first bad index)."""
        if check_inputs not in CHECK_INPUTS:
            raise ValueError(f"check_inputs must be one of {CHECK_INPUTS}, got {check_inputs!r}")
        if len(dataset) != self.n:
            raise ValueError(f"dataset has {len(dataset)} rows but the logit store {self.path} was "
                             f"made for {self.n} rows")
        if any(d is dataset for d in self._checked):
            return
        m = self.committed_rows
        if m == 0:
            return
        if check_inputs == "all":
            rows = np.arange(m)
            got = input_digests(dataset, rows=range(m))
        else:
            spaced = np.linspace(0, m - 1, num=min(m, SAMPLE_ROWS // 2)).round().astype(np.int64)
            rand = np.random.default_rng().integers(0, m, size=min(m, SAMPLE_ROWS // 2))
            rows = np.unique(np.concatenate([spaced, rand]))
            got = input_digests(dataset, rows=rows)
        expected = np.asarray(self.inputs[rows])
        bad = rows[got != expected]
        if len(bad):
            first = int(bad[0])
            where = (f"{len(bad)} of {len(rows)} rows differ" if check_inputs == "all" else
                     f"{len(bad)} of {len(rows)} sampled rows differ")
            raise ValueError(f"dataset row {first} is not the input the logit store {self.path} "
                             f"holds logits for ({where}, first at index {first}): the store was "
                             f"made for other data or another row order; use the dataset it was made "
                             f"for, or {REMEDY.replace('recollect it', 'recollect the logits')}")
        if check_inputs == "all":
            self._checked.append(dataset)

    @property
    def logits(self):
        if self._logits is None:
            self._logits = _open_npy(self.path / LOGITS_NAME, (self.n, self.num_classes),
                                     self.header["dtype"])
        return self._logits

    @property
    def inputs(self):
        """(N,) uint64 input digests, row i for dataset[i] (valid for committed rows)."""
        if self._inputs is None:
            self._inputs = _open_npy(self.path / INPUTS_NAME, (self.n,), np.uint64)
        return self._inputs

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
        """Recompute every committed chunk's checksums (logits and input digests). Returns the list
        of bad chunk indices; with raise_error (default) a mismatch raises ValueError naming the
        chunks and their rows."""
        bad = []
        for k in range(self.header["committed"]):
            lo, hi = _chunk_bounds(self.header, k)
            if (_checksum(self.logits[lo:hi]) != self.header["checksums"][k] or
                    _checksum(self.inputs[lo:hi]) != self.header["input_checksums"][k]):
                bad.append(k)
        if bad and raise_error:
            spans = ", ".join(f"chunk {k} (rows {_chunk_bounds(self.header, k)[0]}.."
                              f"{_chunk_bounds(self.header, k)[1] - 1})" for k in bad[:5])
            more = f" and {len(bad) - 5} more chunks" if len(bad) > 5 else ""
            raise ValueError(f"logit store {self.path}: checksum mismatch in {spans}{more}: the files "
                             f"were modified or corrupted after they were written; {REMEDY}")
        return bad

    def __getstate__(self):
        return {"path": self.path, "header": self.header}

    def __setstate__(self, state):
        self.path, self.header = state["path"], state["header"]
        self._logits = self._inputs = None
        self._checked = []

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

    `store` is a LogitStore or a store path (opened and verified); every row's input must match the
    digest the store holds for it (check_inputs="all"; "sample" checks ~1000 rows).
    """

    def __init__(self, dataset, store, with_labels=False, check_inputs="all", with_index=True):
        if not isinstance(store, LogitStore):
            store = LogitStore.open(store)
        if not store.complete:
            raise ValueError(f"logit store {store.path} is incomplete ({store.committed_rows} of "
                             f"{store.n} rows); finish it with collect_logits first")
        store.check_dataset(dataset, check_inputs)
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
    m = _chunk_bounds(header, header["committed"] - 1)[1]
    rows = np.unique(np.linspace(0, m - 1, num=min(m, CHECKED_ROWS)).round().astype(np.int64))
    x = _first(torch.utils.data.default_collate([dataset[int(i)] for i in rows]))
    where = f"dataset rows {rows.tolist()}"
    got = _run_teacher(teacher, x, device, len(rows), header["num_classes"], where)
    got = got.detach().cpu().to(torch.float64)
    stored = torch.from_numpy(np.asarray(_open_npy(path / LOGITS_NAME, (header["n"], header["num_classes"]),
                                                   header["dtype"])[rows], dtype=np.float64))
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
    header = _read_header(path)
    if header is None:
        return None
    _validate_header(header, path)
    for key, value in identity.items():
        if header.get(key) != value:
            raise ValueError(f"logit store {path} was made with {key} {header.get(key)!r} but this "
                             f"call has {value!r}; {remedy}")
    store = LogitStore(path, header)
    store.verify()  # a damaged committed chunk must not be resumed (or reused) as if it were good
    store.check_dataset(dataset, check_inputs)
    return header


def collect_logits(teacher, dataset, path, batch_size=256, dtype=torch.float16, device=None,
                   chunk_rows=None, progress=True, num_workers=0, overwrite=False, teacher_id=None,
                   check_inputs="all", remedy=REUSE_REMEDY):
    """Run `teacher` (eval mode, no_grad) over `dataset` (items x or (x, ...)) and store its logits
    and a digest of every row's input at directory `path`, row i for dataset[i]. Returns the opened
    LogitStore.

    Resumes an interrupted store at its first uncommitted chunk and reuses a complete one, after
    verifying the committed chunks and checking the committed rows' inputs against `dataset`
    (check_inputs "all" or "sample", as in LogitStore.open); refuses (ValueError) a damaged store or
    one made for another dataset, teacher, or dtype unless overwrite=True. A second process writing
    the same store is refused (LockedError naming its pid) while the first runs.
    `chunk_rows` (default 16 batches per rank) is the commit unit: at most that many rows are
    recomputed after a crash; a resumed store keeps its original chunk size. `teacher_id` replaces
    the weight hash in the teacher's identity (use it for teachers too large to hash).
    Under torch.distributed each rank computes its share of every chunk and writes it at its own
    row indices; rank 0 holds the lock, checksums and commits the chunk after a barrier. Every rank
    must call this with the same arguments; an error raised on one rank mid-run leaves the others
    at a barrier (as any collective does), and the store resumes cleanly afterwards. The dataset must
    be deterministic (no random augmentation in __getitem__): row i must mean the same input each time.
    `teacher` may be any callable (wrapped by mimic_fast.teachers.as_teacher; a plain function is
    identified by its qualified name unless teacher_id is given). Before a store is reused or
    resumed the teacher is run again on a few committed rows: other logits than the stored ones
    (a changed function or parameter-free teacher) are refused. `remedy`: what the refusals of an
    existing store tell the user to do.
    """
    from ..teachers import Teacher, as_teacher

    teacher = as_teacher(teacher)  # a module stays itself; a function is wrapped
    if teacher_id is None and isinstance(teacher, Teacher) and "net" not in teacher._modules:
        teacher_id = f"function {teacher.name}"  # a function has no weights to fingerprint
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of torch.float16, torch.float32, torch.float64 (a .npy "
                         f"file cannot hold {dtype}), got {dtype}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if check_inputs not in CHECK_INPUTS:
        raise ValueError(f"check_inputs must be one of {CHECK_INPUTS}, got {check_inputs!r}")
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset is empty: nothing to collect")
    world, rank = _dist_info()
    path = Path(path)
    device = _infer_device(teacher, device)
    identity = {"n": n, "dtype": str(np.dtype(_NP_DTYPES[dtype])),
                "teacher": teacher_id if teacher_id is not None else teacher_fingerprint(teacher)}

    with contextlib.ExitStack() as held:
        # Rank 0 alone locks, reads and decides, then tells the others: no rank may see a header
        # mid-creation. An error found by rank 0 is raised on every rank (a lone raise would hang
        # the others).
        decision = None
        if rank == 0:
            try:
                held.enter_context(writer_lock(path, "logit store"))
                decision = ("ok", None if overwrite else
                            _existing_store(path, identity, dataset, check_inputs, remedy))
            except (ValueError, OSError) as e:
                decision = ("error", e)
        status, header = _broadcast(decision, world)
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
                                     world, rank)
                if not header["complete"]:
                    logits = _open_npy(path / LOGITS_NAME, (n, header["num_classes"]), header["dtype"],
                                       mode="r+")
                    inputs = _open_npy(path / INPUTS_NAME, (n,), np.uint64, mode="r+")
                    _collect_chunks(teacher, dataset, path, header, logits, inputs, batch_size, dtype,
                                    device, progress, num_workers, world, rank)
                    del logits, inputs
        finally:
            teacher.train(was_training)
        _barrier(world)  # every rank returns only once rank 0 has committed the last chunk
    # Verified already: a reused or resumed store's committed chunks by _existing_store, new chunks
    # by their checksums just computed from the files themselves.
    store = LogitStore.open(path, verify=False)
    if check_inputs == "all":
        store._checked.append(dataset)  # every row was just hashed or checked against the store
    return store


def _create(teacher, dataset, path, identity, batch_size, chunk_rows, device, world, rank):
    n = identity["n"]
    # Probe the number of classes with one row (cheap, and identical on every rank).
    x0 = _first(torch.utils.data.default_collate([dataset[0]]))
    num_classes = int(_run_teacher(teacher, x0, device, 1, None, "dataset[0]").shape[1])
    if chunk_rows is None:
        chunk_rows = 16 * batch_size * world
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    header = {"format": FORMAT, "version": VERSION, "checksum": "sha256", **identity,
              "num_classes": num_classes, "chunk_rows": chunk_rows,
              "n_chunks": math.ceil(n / chunk_rows), "committed": 0, "checksums": [],
              "input_checksums": [], "complete": False,
              "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "world_size": world}
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
        # Header first: a crash before the new header exists leaves no header at all, never an old
        # header over new rows.
        (path / HEADER_NAME).unlink(missing_ok=True)
        for name, np_dtype, shape in ((LOGITS_NAME, identity["dtype"], (n, num_classes)),
                                      (INPUTS_NAME, np.uint64, (n,))):
            mm = np.lib.format.open_memmap(path / name, mode="w+", dtype=np.dtype(np_dtype), shape=shape)
            mm.flush()
            del mm
        _write_header(path, header)
    _barrier(world)
    return header


def _collect_chunks(teacher, dataset, path, header, logits, inputs, batch_size, dtype, device,
                    progress, num_workers, world, rank):
    # Each rank's contiguous share of each remaining chunk, cut into batches that never cross a
    # chunk boundary, so one DataLoader (one set of workers) serves the whole run.
    plan = []
    for k in range(header["committed"], header["n_chunks"]):
        lo, hi = _chunk_bounds(header, k)
        share = math.ceil((hi - lo) / world)
        r_lo, r_hi = min(hi, lo + rank * share), min(hi, lo + (rank + 1) * share)
        plan.append((k, _plan_batches(r_lo, r_hi, batch_size)))
    rows = _batch_inputs(dataset, [b for _, bs in plan for b in bs], num_workers)
    from tqdm.auto import tqdm

    bar = tqdm(total=header["n"], initial=min(header["n"], header["committed"] * header["chunk_rows"]),
               unit="rows", desc="teacher logits", disable=not progress or rank != 0)
    try:
        for k, chunk_batches in plan:
            for _ in chunk_batches:
                b, x = next(rows)
                where = f"rows {b[0]}..{b[-1]}"
                inputs[b[0]: b[-1] + 1] = _row_digests(x, f"dataset {where}")
                out = _run_teacher(teacher, x, device, len(b), header["num_classes"], where)
                stored = out.to(dtype)
                # One float64 sum is finite iff every stored value is (NaN/Inf propagate; finite
                # float16/32 values cannot overflow it): 3x cheaper than isfinite().all() twice.
                if not torch.isfinite(stored.sum(dtype=torch.float64)):
                    bad = ~torch.isfinite(out).all(1)
                    if bad.any():
                        row = b[0] + int(bad.nonzero()[0])
                        raise ValueError(f"teacher produced NaN/Inf logits for dataset row {row} "
                                         f"({int(bad.sum())} of {where})")
                    row = b[0] + int((~torch.isfinite(stored).all(1)).nonzero()[0])
                    raise ValueError(f"teacher logits for dataset row {row} overflow {dtype} (max "
                                     f"|logit| {out.abs().max().item():.3g}); store float32 "
                                     "(dtype=torch.float32, --dtype float32)")
                logits[b[0]: b[-1] + 1] = stored.cpu().numpy()
                bar.update(len(b) * world)
            logits.flush()  # this rank's rows reach the file before anyone commits them
            inputs.flush()
            _barrier(world)
            if rank == 0:
                lo, hi = _chunk_bounds(header, k)
                header["checksums"] = header["checksums"][:k] + [_checksum(logits[lo:hi])]
                header["input_checksums"] = header["input_checksums"][:k] + [_checksum(inputs[lo:hi])]
                header["committed"] = k + 1
                header["complete"] = k + 1 == header["n_chunks"]
                _write_header(path, header)
            bar.n = min(header["n"], (k + 1) * header["chunk_rows"])
            bar.refresh()
    finally:
        bar.close()
