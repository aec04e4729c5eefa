"""Identities of data and models: a digest of every input row, a dataset's fingerprint, a teacher's
fingerprint, a model's weight hash and the checksum of stored rows. The one place that decides how
the pipeline tells one dataset, teacher or array from another.

Row digests are the first 8 bytes of sha256 over a row's shape, dtype and bytes (hardware-accelerated
sha256 runs at ~1.6 GB/s here, 1.5x blake2b); a dataset's fingerprint hashes its length and every row
digest, so it changes with any changed, swapped or shuffled row. A teacher's fingerprint hashes a
sample of its weights (cheap for huge teachers), a state hash all of them.
"""
import hashlib

import numpy as np
import torch

__all__ = ["row_digests", "input_digests", "fingerprint", "teacher_fingerprint", "state_hash",
           "checksum", "first_field", "plan_batches", "batch_inputs"]

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


def checksum(rows):
    """sha256 (hex) of an array's bytes, hashed in place: the logit store's chunk checksum."""
    return hashlib.sha256(np.ascontiguousarray(rows).reshape(-1).view(np.uint8)).hexdigest()


def state_hash(model):
    """sha256 of every parameter and buffer (names, shapes, bytes): equal iff the weights are."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
