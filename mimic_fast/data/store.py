"""The logit store's format and reader: a crash-safe, verified store of a teacher's logits, keyed by
sample index (row i = logits of dataset[i]). Running a teacher to fill one is mimic_fast.data.collect.

Layout of a store directory: `logits.npy` ((N, C) rows written through a memmap), `inputs.npy`
((N,) uint64: a digest of each row's input, so the store knows which inputs its logits belong to)
and `header.json`. Rows are written chunk by chunk, in order; a chunk is committed by flushing its
rows, then atomically replacing the header (write temp, fsync, os.replace, fsync dir) with the sha256
of the chunk's logits and of its input digests appended. The header is the only truth: rows past
`committed` chunks are ignored, so a run killed at any instant (even SIGKILL) resumes at the first
uncommitted chunk with nothing lost, duplicated or shifted. Opening a store checks every committed
chunk's checksum (one sequential read of the file) and, given a dataset, every row's input digest
(one pass over the inputs; "sample" checks ~1000 rows). A store's identity (`digest`) is the sha256
of its header's layout and chunk checksums: what a training run records it trained on.
Readers and writers (mimic_fast._io's folder lock): a LogitDataset shares the store's lock for its
lifetime (close() or `with` ends it); collect_logits and from_array write it alone, so a store is
never rewritten while it is read for training. A store is (re)created by writing new files and
renaming them into place, never by rewriting the files a reader may have mapped, and never through
symbolic links. Limits: numpy cannot hold bfloat16 (use float16 or float32); under torch.distributed all ranks must
see one file system where rank 0 reads the rows other ranks wrote (one node, or a coherent shared
file system).
"""
import datetime
import errno
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .._checks import is_int
from .._io import atomic_write_bytes, atomic_write_text, reader_lock, refuse_links, writer_lock
from .._wording import option
from ..distributed import dist_info
from .identity import checksum, content_digest, first_field, input_digests

__all__ = ["LogitStore", "LogitDataset", "HEADER_NAME", "LOGITS_NAME", "INPUTS_NAME", "STORE_FILES",
           "NP_DTYPES", "store_digest"]

HEADER_NAME = "header.json"
LOGITS_NAME = "logits.npy"
INPUTS_NAME = "inputs.npy"
STORE_FILES = (HEADER_NAME, LOGITS_NAME, INPUTS_NAME)
FORMAT = "mimic_fast.logit_store"
# 2: per-row input digests (inputs.npy) and their per-chunk checksums; 3: teachers identified by a
# hash of all their weights (and a user's teacher file by its sha256), stores by their digest
VERSION = 3
CHECK_INPUTS = ("all", "sample")
SAMPLE_ROWS = 1024  # rows hashed by check_inputs="sample"
CHUNK_BATCHES = 16  # default commit unit: this many batches of every rank
NP_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}
def _remedy(what="it"):
    """What to do about a damaged, foreign or outdated store (in the caller's words: a library call
    is told both ways, the command line its own)."""
    command = "the same `mimic-fast collect-logits` command with --overwrite"
    return f"recollect {what}: " + option(f"collect_logits(..., overwrite=True), or {command}",
                                          command)


# ----------------------------------------------------------------------------- header and files

def read_header(directory):
    p = Path(directory) / HEADER_NAME
    if not p.exists():
        return None
    try:
        header = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{p} is not a valid logit-store header ({e}); {_remedy()}") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ValueError(f"{p} is not a mimic_fast logit-store header (format {found!r}); {_remedy()}")
    return header


def _short(v):
    text = repr(v)
    return text if len(text) <= 40 else text[:20] + "..." + text[-8:] + f" ({len(text)} characters)"


def _is_sha_list(v, length):
    return (isinstance(v, list) and len(v) == length and
            all(isinstance(s, str) and len(s) == 64 and set(s) <= set("0123456789abcdef") for s in v))


def validate_header(header, directory):
    """Check the header as a whole (schema, counts consistent with each other); one ValueError
    listing every problem."""
    p = Path(directory) / HEADER_NAME
    if header.get("version") != VERSION:
        raise ValueError(f"{p} is a logit store of format version {header.get('version')!r}; this "
                         f"mimic_fast reads version {VERSION} (teachers identified by all their "
                         f"weights): {_remedy()}")
    bad = []
    for key, lo in (("n", 1), ("num_classes", 1), ("chunk_rows", 1), ("n_chunks", 1), ("committed", 0)):
        if not is_int(header.get(key), lo):
            bad.append(f"{key} must be an int in [{lo}, 2**63), got {_short(header.get(key))}")
    if header.get("dtype") not in {str(np.dtype(d)) for d in NP_DTYPES.values()}:
        bad.append(f"dtype must be float16, float32 or float64, got {header.get('dtype')!r}")
    if header.get("checksum") != "sha256":
        bad.append(f"checksum must be 'sha256', got {header.get('checksum')!r}")
    if not isinstance(header.get("teacher"), str):
        bad.append(f"teacher must be a string, got {header.get('teacher')!r}")
    if not isinstance(header.get("complete"), bool):
        bad.append(f"complete must be true or false, got {header.get('complete')!r}")
    if not bad:
        n, rows, chunks, done = (header[k] for k in ("n", "chunk_rows", "n_chunks", "committed"))
        need = -(-n // rows)  # integer ceil: a JSON int may exceed any float
        if chunks != need:
            bad.append(f"n_chunks is {chunks} but n={n} rows in chunks of {rows} make {need}")
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
        raise ValueError(f"{p} is not a valid logit-store header: {'; '.join(bad)}; {_remedy()}")


def write_header(directory, header):
    """Atomic: readers (and a resumed run) see the old header or the new one, never a torn one."""
    atomic_write_text(Path(directory) / HEADER_NAME, json.dumps(header, indent=1))


def store_digest(header):
    """A store's identity: sha256 over its format, layout and every committed chunk's checksums
    (rows and input digests). Equal for the same rows of the same inputs; the files match it once
    verified."""
    keys = ("format", "version", "n", "num_classes", "dtype", "chunk_rows", "committed", "checksums",
            "input_checksums")
    return content_digest({k: header.get(k) for k in keys})


def chunk_bounds(header, k):
    lo = k * header["chunk_rows"]
    return lo, min(header["n"], lo + header["chunk_rows"])


def open_npy(path, shape, dtype, mode="r"):
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
                                f"the store is broken; {_remedy()}") from None
    except ValueError as e:
        raise ValueError(f"{path} is not a readable .npy file ({e}); {_remedy()}") from None
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
        raise ValueError(f"{path}: {problems[0]}; {_remedy()}")
    return np.memmap(path, dtype=np.dtype(dtype), mode=mode, offset=offset, shape=tuple(shape))


# ----------------------------------------------------------------------------- reading

class LogitStore:
    """A store opened for reading: `.logits` is the (N, C) memmap, `.header` the committed header,
    `.digest` its identity.

    Pickles by path (a DataLoader worker reopens the memmap instead of copying it, unverified: the
    process that opened the store verified it; a store whose header no longer has this identity is
    refused there).
    """

    def __init__(self, path, header):
        self.path = Path(path)
        self.header = header
        self._logits = self._inputs = None
        self._reopened = False  # unpickled in another process: check the files are still these
        self._checked = []  # datasets whose inputs were checked against this store (by identity)

    @property
    def digest(self):
        """The store's identity (store_digest of its header)."""
        return store_digest(self.header)

    def check_unchanged(self):
        """Refuse (ValueError) a store whose header on disk is no longer the one opened: another
        process collected it again since."""
        try:
            now = read_header(self.path)
        except ValueError:
            now = None
        if now is None or store_digest(now) != self.digest:
            raise ValueError(f"logit store {self.path} changed since it was opened (it was collected "
                             "or imported again meanwhile): open it again")

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
        header = read_header(path)
        if header is None:
            raise FileNotFoundError(f"no logit store at {path}: expected {path / HEADER_NAME} "
                                    f"(made by collect_logits)")
        validate_header(header, path)
        store = cls(path, header)
        store.logits, store.inputs  # noqa: B018  (open both files now: size and layout checks)
        if not header["complete"] and not allow_partial:
            command = "the same `mimic-fast collect-logits` command"
            how = option(f"run collect_logits ({command}) again to resume it, or open it with "
                         "allow_partial=True", f"run {command} again to resume it")
            raise ValueError(f"logit store {path} is incomplete: {store.committed_rows} of "
                             f"{header['n']} rows committed; {how}")
        if verify:
            store.verify()
        if dataset is not None:
            store.check_dataset(dataset, check_inputs)
        return store

    @classmethod
    def from_array(cls, path, logits, dataset, dtype=None, overwrite=False, source=None, wait=False):
        """Write logits computed elsewhere (an (N, C) numpy array or tensor, row i for dataset[i])
        as an ordinary store at `path`, through the commit protocol collect_logits uses (chunks,
        checksums, every row's input digest), then verify it and check every row against `logits`.

        dtype: storage dtype (default: the array's float16/float32/float64, else float32).
        `source` (e.g. the file name) goes into the header's teacher identity with a hash of the
        rows. An existing store at `path` is refused unless overwrite=True, and any store while
        another process reads or writes it (wait=True: wait for it). Single process only.
        """
        arr = logits.detach().cpu().numpy() if isinstance(logits, torch.Tensor) else np.asarray(logits)
        if arr.dtype.kind != "f" or arr.ndim != 2:
            raise TypeError(f"logits must be a 2-D floating-point (N, C) array, got {arr.ndim}-D "
                            f"{arr.dtype} of shape {arr.shape}")
        if len(arr) != len(dataset):
            raise ValueError(f"logits has {len(arr)} rows but the dataset has {len(dataset)}: "
                             "row i must be the teacher's logits for dataset[i]")
        if dtype is None:
            dtype = {np.dtype(v): k for k, v in NP_DTYPES.items()}.get(arr.dtype, torch.float32)
        if dtype not in NP_DTYPES:
            raise ValueError(f"dtype must be one of torch.float16, torch.float32, torch.float64 (a "
                             f".npy file cannot hold {dtype}), got {dtype}")
        if dist_info()[1] > 1:  # every rank would write the rows: the array is not sharded
            raise ValueError("LogitStore.from_array runs in one process, not under torch.distributed")
        path = Path(path)
        if (path / HEADER_NAME).exists() and not overwrite:
            raise FileExistsError(f"a logit store exists at {path}; pass overwrite=True to replace it")
        digest = hashlib.sha256(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)).hexdigest()
        teacher_id = f"array {source or ''} {arr.shape} {arr.dtype} sha256 {digest}".replace("  ", " ")
        identity = {"n": len(arr), "dtype": str(np.dtype(NP_DTYPES[dtype])), "teacher": teacher_id}
        with writer_lock(path, "logit store", wait=wait):
            header = new_header(identity, arr.shape[1], CHUNK_BATCHES * 256)
            create_files(path, header)
            rows, inputs = open_rows(path, header)
            for k in range(header["n_chunks"]):
                lo, hi = chunk_bounds(header, k)
                out = torch.from_numpy(np.array(arr[lo:hi]))
                stored = out.to(dtype)
                check_finite(out, stored, lo, f"rows {lo}..{hi - 1}", dtype, "the logits array")
                rows[lo:hi] = stored.numpy()
                inputs[lo:hi] = input_digests(dataset, rows=range(lo, hi))
                rows.flush()
                inputs.flush()
                commit_chunk(path, header, k, rows, inputs)
            del rows, inputs
        store = cls.open(path)  # verified: every chunk's checksum recomputed from the files
        if not np.array_equal(store.logits, arr.astype(store.logits.dtype)):
            raise RuntimeError(f"logit store {path} does not hold the rows it was given")
        store._checked.append(dataset)  # every row was just hashed into the store
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
                             f"for, or {_remedy('the logits')}")
        if check_inputs == "all":
            self._checked.append(dataset)

    @property
    def logits(self):
        if self._logits is None:
            if self._reopened:
                self.check_unchanged()
                self._reopened = False
            self._logits = open_npy(self.path / LOGITS_NAME, (self.n, self.num_classes),
                                     self.header["dtype"])
        return self._logits

    @property
    def inputs(self):
        """(N,) uint64 input digests, row i for dataset[i] (valid for committed rows)."""
        if self._inputs is None:
            self._inputs = open_npy(self.path / INPUTS_NAME, (self.n,), np.uint64)
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
            lo, hi = chunk_bounds(self.header, k)
            if (checksum(self.logits[lo:hi]) != self.header["checksums"][k] or
                    checksum(self.inputs[lo:hi]) != self.header["input_checksums"][k]):
                bad.append(k)
        if bad and raise_error:
            spans = ", ".join(f"chunk {k} (rows {chunk_bounds(self.header, k)[0]}.."
                              f"{chunk_bounds(self.header, k)[1] - 1})" for k in bad[:5])
            more = f" and {len(bad) - 5} more chunks" if len(bad) > 5 else ""
            raise ValueError(f"logit store {self.path}: checksum mismatch in {spans}{more}: the files "
                             f"were modified or corrupted after they were written; {_remedy()}")
        return bad

    def __getstate__(self):
        return {"path": self.path, "header": self.header}

    def __setstate__(self, state):
        self.path, self.header = state["path"], state["header"]
        self._logits = self._inputs = None
        self._reopened = True
        self._checked = []

    def __repr__(self):
        return (f"LogitStore({str(self.path)!r}, n={self.n}, num_classes={self.num_classes}, "
                f"dtype={self.header['dtype']}, committed_rows={self.committed_rows})")


class LogitDataset(Dataset):
    """dataset[i] paired with the teacher's logits for row i, by index, so any shuffling or sampler
    keeps them aligned. Item: (x_i, logits_i float32, i) or, with_labels, (x_i, logits_i, i, y_i),
    y_i = -1 where the item has no label (an unlabelled or generated transfer row);
    with_index=False drops i: (x_i, logits_i[, y_i]). `fields` names the positions.

    `store` is a LogitStore or a store path (opened and verified); every row's input must match the
    digest the store holds for it (check_inputs="all"; "sample" checks ~1000 rows).
    It holds the store's reader lock from construction to close() (or the end of a `with` block, or
    garbage collection): no process can collect into or overwrite the store meanwhile, and one that
    is writing it makes the construction fail naming its pid (wait=True: wait for it). DataLoader
    workers read under the lock of the process that made the dataset. `identity` is what a training
    run records it trained on.
    """

    def __init__(self, dataset, store, with_labels=False, check_inputs="all", with_index=True,
                 wait=False):
        self._lock = None
        path = store.path if isinstance(store, LogitStore) else Path(store)
        lock = reader_lock(path, "logit store", wait=wait).acquire()
        try:
            if isinstance(store, LogitStore):
                store.check_unchanged()  # opened before the lock was taken: still the same files
            else:
                store = LogitStore.open(store)
            if not store.complete:
                raise ValueError(f"logit store {store.path} is incomplete ({store.committed_rows} of "
                                 f"{store.n} rows); finish it with collect_logits first")
            store.check_dataset(dataset, check_inputs)
        except BaseException:
            lock.release()
            raise
        self._lock = lock
        self.dataset, self.store, self.with_labels = dataset, store, bool(with_labels)
        self.with_index = bool(with_index)
        self.fields = ("x", "logits") + (("index",) if with_index else ()) + (
            ("y",) if with_labels else ())

    @property
    def identity(self):
        """{"logit_store": the store's digest}: recorded by train.distill in its checkpoints."""
        return {"logit_store": self.store.digest}

    def close(self):
        """Release the store's reader lock (items cannot be read afterwards). Idempotent."""
        lock, self._lock = getattr(self, "_lock", None), None
        self._closed = True
        if lock is not None:
            lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter exit the lock's module may be gone: the OS drops it
            pass

    def __getstate__(self):
        # a worker process reads under its parent's lock: the lock itself stays with the parent
        return {**self.__dict__, "_lock": None}

    def _rows(self, index):
        if getattr(self, "_closed", False):
            raise ValueError(f"this LogitDataset of {self.store.path} is closed (its reader lock was "
                             "released): make a new one to read the store")
        return np.array(self.store.logits[index], dtype=np.float32)

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
        t = torch.from_numpy(self._rows(index))
        return self._pick(first_field(item), t, index, self._label(item) if self.with_labels else None)

    def get_batch(self, indices):
        """Collated batch for an index list without per-item Python work when the dataset holds
        tensors (TensorDataset, TransferSet): same tuple layout as a DataLoader batch."""
        idx = torch.as_tensor(indices, dtype=torch.int64).reshape(-1)
        tensors = getattr(self.dataset, "tensors", None)
        if tensors is None:
            return torch.utils.data.default_collate([self[int(i)] for i in idx])
        x = tensors[0][idx]
        t = torch.from_numpy(self._rows(idx.numpy()))
        y = None
        if self.with_labels:
            y = tensors[1][idx] if len(tensors) > 1 else torch.full((len(idx),), -1, dtype=torch.int64)
        return self._pick(x, t, idx, y)


# ----------------------------------------------------------------------------- writing
# The commit protocol, shared by collect_logits and from_array: files and header first (no chunk
# committed), then per chunk: rows flushed, checksums computed from the files, header replaced.

def new_header(identity, num_classes, chunk_rows, world=1):
    """The header of an empty store of `identity` ({"n", "dtype", "teacher"})."""
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")
    return {"format": FORMAT, "version": VERSION, "checksum": "sha256", **identity,
            "num_classes": num_classes, "chunk_rows": chunk_rows,
            "n_chunks": math.ceil(identity["n"] / chunk_rows), "committed": 0, "checksums": [],
            "input_checksums": [], "complete": False,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(), "world_size": world}


def _empty_npy(f, dtype, shape):
    """Write a zero-filled .npy of this dtype and shape to f, its rows' space allocated on disk now.
    A sparse file would defer the allocation to the writes through the memmap, where a full disk is
    a SIGBUS that kills the process without a word; allocated here, it is an OSError (ENOSPC)
    before any row is written."""
    np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                             "fortran_order": False, "shape": tuple(shape)})
    offset, size = f.tell(), math.prod(shape) * dtype.itemsize
    f.flush()
    if size and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), offset, size)
            return
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
    # no posix_fallocate (macOS) or a file system without it: sparse, as before
    f.truncate(offset + size)


def create_files(path, header):
    """Empty logits.npy and inputs.npy of the header's size, then the header (one process). Each is
    a new file renamed into place: a reader that mapped the old files keeps the old rows, and a link
    in the store folder is refused before anything is written."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    refuse_links(path, STORE_FILES)
    # Header first: a crash before the new header exists leaves no header at all, never an old
    # header over new rows. Without it the old rows are unreachable: removed before the new files
    # are allocated, so a disk that held the old store holds the new one (a reader that mapped them
    # keeps them until it unmaps).
    (path / HEADER_NAME).unlink(missing_ok=True)
    for name in (LOGITS_NAME, INPUTS_NAME):
        (path / name).unlink(missing_ok=True)
    n = header["n"]
    for name, np_dtype, shape in ((LOGITS_NAME, header["dtype"], (n, header["num_classes"])),
                                  (INPUTS_NAME, np.uint64, (n,))):
        atomic_write_bytes(path / name, lambda f, d=np.dtype(np_dtype), s=shape: _empty_npy(f, d, s))
    write_header(path, header)


def open_rows(path, header, mode="r+"):
    """(logits, input digests) memmaps of the store at `path` (mode "r+": for writing, refusing
    links)."""
    path = Path(path)
    if mode != "r":
        refuse_links(path, STORE_FILES)
    n = header["n"]
    return (open_npy(path / LOGITS_NAME, (n, header["num_classes"]), header["dtype"], mode=mode),
            open_npy(path / INPUTS_NAME, (n,), np.uint64, mode=mode))


def check_finite(out, stored, first_row, where, dtype, source="teacher"):
    """Refuse logits `out` (rows first_row.. of the dataset) with a NaN/Inf, or whose `stored` copy
    overflowed the storage dtype, naming `source` (the teacher's files, the array) and the row."""
    # One float64 sum is finite iff every stored value is (NaN/Inf propagate; finite float16/32
    # values cannot overflow it): 3x cheaper than isfinite().all() twice.
    if torch.isfinite(stored.sum(dtype=torch.float64)):
        return
    bad = ~torch.isfinite(out).all(1)
    if bad.any():
        row = first_row + int(bad.nonzero()[0])
        raise ValueError(f"{source} gave NaN/Inf logits for dataset row {row} "
                         f"({int(bad.sum())} of {where})")
    row = first_row + int((~torch.isfinite(stored).all(1)).nonzero()[0])
    raise ValueError(f"{source}: its logits for dataset row {row} overflow {dtype} (max |logit| "
                     f"{out.abs().max().item():.3g}; {dtype} holds up to "
                     f"{torch.finfo(dtype).max:.3g}); {overflow_remedy(dtype)}")


def cast_limit(dtype):
    """The smallest magnitude that becomes Inf when cast to `dtype` (round to nearest: float16's
    65510 is stored as 65504, 65520 overflows): the one overflow rule of imports and collection."""
    top = np.finfo(dtype).max
    ulp = float(top) - float(np.nextafter(top, top.dtype.type(0)))  # the top binade's spacing
    return float(top) + ulp / 2


def overflow_remedy(dtype):
    """What to do about logits beyond the storage dtype's range."""
    if dtype == torch.float16:
        return f"store float32 ({option('dtype=torch.float32', '--dtype float32')})"
    return ("logits that large are not a teacher's scores: check the teacher or the file "
            "(subtracting each row's maximum changes no softmax)")


def commit_chunk(path, header, k, logits, inputs):
    """Commit chunk k, whose rows are flushed to `logits` and `inputs` (the files' memmaps)."""
    lo, hi = chunk_bounds(header, k)
    header["checksums"] = header["checksums"][:k] + [checksum(logits[lo:hi])]
    header["input_checksums"] = header["input_checksums"][:k] + [checksum(inputs[lo:hi])]
    header["committed"] = k + 1
    header["complete"] = k + 1 == header["n_chunks"]
    write_header(path, header)
