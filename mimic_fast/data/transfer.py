"""Transfer sets: the inputs the teacher labels for the student (labelled + unlabelled + generated).

Every generator is a pure function of (X, n, its parameters, seed). Limits: MUNGE treats every
attribute as continuous and needs all of X in memory for its nearest-neighbour search (scikit-learn);
generated rows are materialised in memory.
"""
import numbers

import torch
from torch.utils.data import Dataset

__all__ = ["TransferSet", "SOURCES", "munge", "add_noise", "random_shift", "build_transfer_set"]

SOURCES = ("labelled", "unlabelled", "generated")
METHODS = ("munge", "noise", "shift")


def _as_rows(X, name, min_dim=2):
    if not isinstance(X, torch.Tensor):
        try:
            X = torch.as_tensor(X)
        except Exception:
            raise TypeError(f"{name} must be a tensor or array, got {type(X).__name__}") from None
    if X.dim() < min_dim or X.shape[0] < 1:
        raise ValueError(f"{name} must have at least {min_dim} dims (N, ...) with N >= 1, got shape "
                         f"{tuple(X.shape)}")
    if not X.is_floating_point():
        X = X.to(torch.float32)
    return X


def _check_n(n):
    # numbers.Integral: numpy ints (e.g. len of an array, n // 2 of an np.int64) are ints too
    if not isinstance(n, numbers.Integral) or isinstance(n, bool) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(n)


def _base_rows(N, n, g):
    """n source-row indices that use every row equally often (concatenated permutations)."""
    reps = -(-n // N) if n else 0
    if not reps:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat([torch.randperm(N, generator=g) for _ in range(reps)])[:n]


def munge(X, n, p=0.5, s=1.0, seed=0):
    """MUNGE (Buciluă, Caruana & Niculescu-Mizil 2006): n pseudo-examples from X (N, ...).

    Each new row starts from a source row e (every row used equally often) and its Euclidean nearest
    neighbour e' in X; each attribute a is, with probability p, replaced by a draw from
    N(e'_a, |e_a − e'_a| / s), else kept. All attributes are treated as continuous.
    """
    X = _as_rows(X, "X")
    n = _check_n(n)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    if not s > 0:
        raise ValueError(f"s must be > 0, got {s}")
    N = X.shape[0]
    if N < 2:
        raise ValueError(f"munge needs at least 2 rows in X to find neighbours, got {N}")
    from sklearn.neighbors import NearestNeighbors

    flat = X.reshape(N, -1)
    _, idx = NearestNeighbors(n_neighbors=2).fit(flat.double().numpy()).kneighbors(flat.double().numpy())
    idx = torch.from_numpy(idx)
    # With duplicate rows the row itself may come second: take whichever neighbour is not the row.
    nearest = torch.where(idx[:, 0] == torch.arange(N), idx[:, 1], idx[:, 0])
    g = torch.Generator().manual_seed(seed)
    base = _base_rows(N, n, g)
    a, b = flat[base], flat[nearest[base]]
    swap = torch.rand(a.shape, generator=g) < p
    noise = torch.randn(a.shape, generator=g, dtype=a.dtype)
    out = torch.where(swap, b + (a - b).abs() / s * noise, a)
    return out.reshape(n, *X.shape[1:])


def add_noise(X, n, std, seed=0):
    """n rows: source rows of X (each used equally often) plus Gaussian noise of `std` (a float or a
    tensor broadcastable to one row, e.g. per-feature scales)."""
    X = _as_rows(X, "X")
    n = _check_n(n)
    std = torch.as_tensor(std, dtype=X.dtype)
    if (std < 0).any():
        raise ValueError("std must be >= 0")
    g = torch.Generator().manual_seed(seed)
    base = _base_rows(X.shape[0], n, g)
    return X[base] + std * torch.randn((n, *X.shape[1:]), generator=g, dtype=X.dtype)


def random_shift(X_images, n, max_shift=4, seed=0, flip=False, block_rows=65536):
    """n images: source images of X_images (N, C, H, W) translated by an integer offset in
    [-max_shift, max_shift] along each axis, zeros filling the uncovered border; with flip, also
    mirrored left-right with probability 1/2 (the standard CIFAR augmentation)."""
    X = _as_rows(X_images, "X_images", min_dim=1)
    if X.dim() != 4:
        raise ValueError(f"X_images must be (N, C, H, W), got shape {tuple(X.shape)}")
    n = _check_n(n)
    N, C, H, W = X.shape
    if not isinstance(max_shift, int) or max_shift < 0 or max_shift >= min(H, W):
        raise ValueError(f"max_shift must be an int in [0, {min(H, W) - 1}], got {max_shift!r}")
    g = torch.Generator().manual_seed(seed)
    base = _base_rows(N, n, g)
    m = max_shift
    dy = torch.randint(-m, m + 1, (n,), generator=g)
    dx = torch.randint(-m, m + 1, (n,), generator=g)
    do_flip = torch.rand(n, generator=g) < 0.5 if flip else torch.zeros(n, dtype=torch.bool)
    out = torch.empty((n, C, H, W), dtype=X.dtype)
    # One slice per distinct offset instead of per image: at most (2m+1)² slices per block.
    for lo in range(0, n, block_rows):
        hi = min(n, lo + block_rows)
        src = torch.nn.functional.pad(X[base[lo:hi]], (m, m, m, m))
        src[do_flip[lo:hi]] = src[do_flip[lo:hi]].flip(-1)
        key = (dy[lo:hi] + m) * (2 * m + 1) + (dx[lo:hi] + m)
        for k in key.unique().tolist():
            sel = (key == k).nonzero().squeeze(1)
            oy, ox = divmod(k, 2 * m + 1)  # oy = dy + m; content moves down/right by dy, dx
            out[lo + sel] = src[sel, :, 2 * m - oy: 2 * m - oy + H, 2 * m - ox: 2 * m - ox + W]
    return out


class TransferSet(Dataset):
    """Transfer-set inputs `x` with `sources` (int8 codes into SOURCES: 0 labelled, 1 unlabelled,
    2 generated). Items are (x_i,) like TensorDataset(x), or (x_i, y_i) when `labels` is given
    (y = -1 on unlabelled and generated rows)."""

    def __init__(self, x, sources, labels=None):
        if len(sources) != len(x) or (labels is not None and len(labels) != len(x)):
            raise ValueError(f"x has {len(x)} rows, sources {len(sources)}, labels "
                             f"{None if labels is None else len(labels)}: they must match")
        self.x, self.sources, self.labels = x, sources, labels

    @property
    def tensors(self):
        return (self.x,) if self.labels is None else (self.x, self.labels)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, index):
        return tuple(t[index] for t in self.tensors)

    def indices(self, source):
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r}: expected one of {', '.join(SOURCES)}")
        return (self.sources == SOURCES.index(source)).nonzero().squeeze(1)

    def counts(self):
        return {name: int((self.sources == i).sum()) for i, name in enumerate(SOURCES)}

    def __repr__(self):
        return f"TransferSet(n={len(self)}, row_shape={tuple(self.x.shape[1:])}, {self.counts()})"


def build_transfer_set(X_labelled, X_unlabelled=None, n_generated=0, method="munge", seed=0,
                       y_labelled=None, generate_from="labelled", **method_kwargs):
    """Rows: X_labelled, then X_unlabelled, then `n_generated` rows made by `method` from the
    labelled rows (generate_from="all": labelled + unlabelled). method_kwargs go to the generator:
    munge (p=0.5, s=1.0), noise (std=0.1, in the data's units), shift (max_shift=4, flip=False)."""
    X_l = _as_rows(X_labelled, "X_labelled")
    parts, codes = [X_l], [torch.zeros(len(X_l), dtype=torch.int8)]
    if X_unlabelled is not None:
        X_u = _as_rows(X_unlabelled, "X_unlabelled").to(X_l.dtype)
        if X_u.shape[1:] != X_l.shape[1:]:
            raise ValueError(f"X_unlabelled rows have shape {tuple(X_u.shape[1:])} but X_labelled rows "
                             f"have {tuple(X_l.shape[1:])}")
        parts.append(X_u)
        codes.append(torch.ones(len(X_u), dtype=torch.int8))
    n_generated = _check_n(n_generated)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}: expected one of {', '.join(METHODS)}")
    if generate_from not in ("labelled", "all"):
        raise ValueError(f"generate_from must be 'labelled' or 'all', got {generate_from!r}")
    if n_generated:
        pool = X_l if generate_from == "labelled" else torch.cat(parts)
        if method == "munge":
            gen = munge(pool, n_generated, seed=seed, **method_kwargs)
        elif method == "noise":
            gen = add_noise(pool, n_generated, seed=seed, **{"std": 0.1, **method_kwargs})
        else:
            gen = random_shift(pool, n_generated, seed=seed, **method_kwargs)
        parts.append(gen.to(X_l.dtype))
        codes.append(torch.full((n_generated,), 2, dtype=torch.int8))
    x, sources = torch.cat(parts), torch.cat(codes)
    labels = None
    if y_labelled is not None:
        y = torch.as_tensor(y_labelled)
        if y.is_floating_point() and not torch.equal(y, y.round()):
            # a cast would silently truncate (1.7 -> 1): class ids must be whole numbers
            raise ValueError(f"y_labelled must hold integer class ids, got {y.dtype} values such as "
                             f"{y[y != y.round()][0].item()}")
        if y.is_complex() or y.dtype == torch.bool:
            raise TypeError(f"y_labelled must hold integer class ids, got dtype {y.dtype}")
        y = y.to(torch.int64)
        if y.shape != (len(X_l),):
            raise ValueError(f"y_labelled must have shape ({len(X_l)},), got {tuple(y.shape)}")
        labels = torch.full((len(x),), -1, dtype=torch.int64)
        labels[: len(X_l)] = y
    return TransferSet(x, sources, labels)
