"""Identities of data and models: a digest of every input row, a dataset's fingerprint, a teacher's
fingerprint, a model's weight hash and the checksum of stored rows. The one place that decides how
the pipeline tells one dataset, teacher or array from another.

Row digests are the first 8 bytes of sha256 over a row's shape, dtype and bytes (hardware-accelerated
sha256 runs at ~1.6 GB/s here, 1.5x blake2b); a dataset's fingerprint hashes its length and every row
digest, so it changes with any changed, swapped or shuffled row. A teacher's fingerprint and a state
hash cover every byte of every parameter and buffer (~0.5 s for 174M float32 parameters; pass a
teacher_id to collect_logits for teachers too large to hash). A content digest covers a whole tree
of containers, numbers, strings and tensors: the checksum every file of ours records of itself.
"""
import hashlib

import numpy as np
import torch

__all__ = ["row_digests", "input_digests", "fingerprint", "teacher_fingerprint", "state_hash",
           "checksum", "content_digest", "file_sha256", "first_field", "plan_batches", "batch_inputs"]

# Domain tag of dataset fingerprints: the logit store's format name, kept so that the fingerprints
# recorded in existing files (data recipes, stores) keep their values.
_FINGERPRINT_TAG = "mimic_fast.logit_store"


def first_field(item):
    """The input x of a dataset item (x itself or (x, ...))."""
    return item[0] if isinstance(item, (tuple, list)) else item


def row_digests(x, where):
    """(b,) uint64: for each row of the batch x (b, ...), the first 8 bytes of sha256 over the row's
    shape, dtype and bytes. `where` names the rows in the error for a batch that is not a tensor."""
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


def plan_batches(lo, hi, batch_size):
    return [range(b, min(b + batch_size, hi)) for b in range(lo, hi, batch_size)]


def batch_inputs(dataset, batches, num_workers=0):
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
        yield b, first_field(item)


def input_digests(dataset, rows=None, batch_size=1024):
    """uint64 digests of dataset[i]'s input x for i in `rows` (None: every row; a range: those rows,
    read in batches; an index array: gathered): what a store records for each row it collects.
    Labels are not hashed: logits depend only on x, so TensorDataset(X) and TensorDataset(X, y)
    share a store."""
    if rows is None:
        rows = range(len(dataset))
    if isinstance(rows, range):
        batches = plan_batches(rows.start, rows.stop, batch_size)
    else:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        tensors = getattr(dataset, "tensors", None)
        if isinstance(tensors, (tuple, list)) and len(rows):  # the sampled rows in one gather
            return row_digests(tensors[0][torch.from_numpy(rows)], "dataset rows")
        batches = [range(int(i), int(i) + 1) for i in rows]
    parts = [row_digests(x, f"dataset[{b[0]}..{b[-1]}]") for b, x in batch_inputs(dataset, batches)]
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def fingerprint(dataset):
    """Identity of a dataset's inputs: sha256 (hex, 32 chars) over N and every row's input digest
    (one pass over the inputs). Equal for the same rows in the same order, different after any
    change, swap or shuffle of rows."""
    h = hashlib.sha256(f"{_FINGERPRINT_TAG}|n={len(dataset)}|".encode())
    h.update(input_digests(dataset).tobytes())
    return h.hexdigest()[:32]


def _tensor_bytes(t):
    """A tensor's bytes (CPU, contiguous, any dtype incl. bfloat16 and 0-d) as a numpy uint8 view."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def teacher_fingerprint(teacher):
    """Class, parameter count and sha256 over every parameter's and buffer's name, shape, dtype and
    bytes: equal for the same weights reloaded, different after any change of any value."""
    h = hashlib.sha256()
    params = list(teacher.named_parameters())
    n_params = sum(t.numel() for _, t in params)
    with torch.no_grad():
        for name, t in params + list(teacher.named_buffers()):
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.device.type != "meta":
                h.update(_tensor_bytes(t))
    return f"{type(teacher).__name__}, {n_params} parameters, weights sha256 {h.hexdigest()}"


def checksum(rows):
    """sha256 (hex) of an array's bytes, hashed in place: the logit store's chunk checksum."""
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


def state_hash(model):
    """sha256 of every parameter and buffer (names, shapes, bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def file_sha256(path):
    """sha256 (hex) of a file's bytes: the identity of a file we cannot check otherwise (a user's
    TorchScript, .pt2 or pickled teacher)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def content_digest(obj):
    """sha256 (hex) of a tree of dicts (with a state dict's _metadata), lists, tuples, str, bytes,
    int, float, bool, None and tensors (dtype, shape, bytes): what a file records of its own payload
    and checks on load. Containers are tagged with their kind and length, so no two trees share a
    byte stream; dict order counts (it survives torch.save / json round trips)."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj):
    if isinstance(obj, torch.Tensor):
        if obj.layout != torch.strided or obj.is_quantized:
            raise TypeError(f"cannot digest a {obj.layout} tensor")
        h.update(f"T{obj.dtype}{tuple(obj.shape)}|".encode())
        h.update(_tensor_bytes(obj))
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}|".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
        meta = getattr(obj, "_metadata", None)  # state dicts: module versions for load_state_dict
        if meta is not None:
            h.update(b"M")
            _feed(h, dict(meta))
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}|".encode())
        for v in obj:
            _feed(h, v)
    elif isinstance(obj, (str, bytes)):
        b = obj.encode("utf-8", "surrogatepass") if isinstance(obj, str) else obj
        h.update(f"{'S' if isinstance(obj, str) else 'B'}{len(b)}|".encode())
        h.update(b)
    elif obj is None or isinstance(obj, (bool, int, float)):
        h.update(f"{type(obj).__name__[0]}{obj!r}|".encode())
    else:
        raise TypeError(f"cannot digest a {type(obj).__name__} (expected containers, numbers, "
                        "strings and tensors)")
