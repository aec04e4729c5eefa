"""Labelled data sets as in-memory float32/int64 TensorDatasets.

Limits: everything is loaded into RAM (CIFAR-10: 50k x 3x32x32 float32 = 614 MB). CIFAR's python
batches are pickles: they are read by a restricted unpickler that builds only what the format holds
(dicts, lists, bytes, str, numbers and numpy arrays) and refuses any other object, so a file cannot
run code. Scaling is fixed per data set and recorded in `meta`.
"""
import math
import pickle
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import TensorDataset

from .._wording import one_line

__all__ = ["DataSplits", "load_dataset", "labelled_split", "DATASETS"]

DATASETS = ("digits", "cifar10", "npz")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                   "truck")


@dataclass
class DataSplits:
    """train/test: TensorDataset(X float32 (N, *input_shape), y int64 (N,)); `unlabelled` is an optional
    float32 tensor of extra inputs for the transfer set (npz key X_unlabelled)."""
    train: TensorDataset
    test: TensorDataset
    input_shape: tuple
    num_classes: int
    name: str
    classes: Optional[list] = None
    meta: dict = field(default_factory=dict)
    unlabelled: Optional[torch.Tensor] = None

    @property
    def in_features(self):
        return math.prod(self.input_shape)


def _check_fraction(test_fraction):
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    return float(test_fraction)


def _split(X, y, test_fraction, seed):
    """Seeded random split; every row lands in exactly one side, the test side gets
    round(N * test_fraction) rows (at least 1, at most N - 1)."""
    n = len(X)
    if n < 2:
        raise ValueError(f"cannot split {n} row(s) into train and test")
    n_test = min(n - 1, max(1, round(n * test_fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    te, tr = perm[:n_test].sort().values, perm[n_test:].sort().values
    return X[tr], y[tr], X[te], y[te]


def _labels(y, where):
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-D (N,), got shape {y.shape}")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and y.size and np.all(np.isfinite(y)) and np.all(y == np.round(y)) \
                and np.abs(y).max() < 2**53:
            y = y.astype(np.int64)
        else:
            raise ValueError(f"{where}: labels must be integers, got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"{where}: labels must be >= 0, got min {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def load_dataset(name, root=None, seed=0, test_fraction=0.2):
    """Load a labelled data set by name.

    - "digits": scikit-learn's bundled 8x8 digits (1797 images, no download); pixels 0..16 scaled to
      [0, 1]; input_shape (1, 8, 8), stored flat (N, 64); stratified split by `seed`/`test_fraction`.
    - "cifar10": `root` is the folder of the standard python batches (data_batch_1..5, test_batch,
      optional batches.meta; a parent holding cifar-10-batches-py/ also works). Images (N, 3, 32, 32)
      scaled to [0, 1] then standardised per channel with the training set's mean/std (in meta).
    - "npz": `root` is an .npz with X (N, ...) float and y (N,) int; optional X_test/y_test (else a
      seeded split) and X_unlabelled (returned as `.unlabelled`). Values are used as given.
    """
    if name == "digits":
        return _load_digits(seed, _check_fraction(test_fraction))
    if name == "cifar10":
        if root is None:
            raise ValueError("cifar10 needs root= the folder holding data_batch_1..5 and test_batch")
        return _load_cifar10(Path(root))
    if name == "npz":
        if root is None:
            raise ValueError("npz needs root= the path of an .npz file with arrays X and y")
        return _load_npz(Path(root), seed, test_fraction)
    raise ValueError(f"unknown dataset {name!r}: expected one of {', '.join(DATASETS)}")


def labelled_split(y, fraction, seed):
    """(labelled, unlabelled) row indices: round(fraction * count) labelled rows per class (at least
    one), drawn with `seed`; the rest are unlabelled."""
    g = torch.Generator().manual_seed(10_000 + seed)
    labelled = []
    for c in y.unique().tolist():
        rows = (y == c).nonzero().squeeze(1)
        k = max(1, round(fraction * len(rows)))
        labelled.append(rows[torch.randperm(len(rows), generator=g)[:k]])
    labelled = torch.cat(labelled).sort().values
    mask = torch.zeros(len(y), dtype=torch.bool)
    mask[labelled] = True
    return labelled, (~mask).nonzero().squeeze(1)


def _load_digits(seed, test_fraction):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    Xtr, Xte, ytr, yte = train_test_split(X, d.target.astype(np.int64), test_size=test_fraction,
                                          random_state=seed, stratify=d.target)
    return DataSplits(TensorDataset(torch.from_numpy(Xtr), torch.from_numpy(ytr)),
                      TensorDataset(torch.from_numpy(Xte), torch.from_numpy(yte)),
                      input_shape=(1, 8, 8), num_classes=10, name="digits",
                      classes=[str(i) for i in range(10)],
                      meta={"scaling": "pixel / 16 -> [0, 1]", "seed": seed,
                            "test_fraction": test_fraction, "source": "sklearn.datasets.load_digits"})


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches (a dict of bytes, lists of ints/bytes and a uint8 array)
    and nothing else: the only callables it hands out rebuild numpy arrays, scalars and dtypes."""

    ALLOWED = {(f"numpy.{core}.{module}", name) for core in ("core", "_core")
               for module, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                    ("numeric", "_frombuffer"))}
    ALLOWED |= {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a CIFAR batch never "
                                         "does (only numpy arrays, bytes, lists and numbers)")
        if module.startswith("numpy.core."):  # numpy 1's name of numpy 2's numpy._core
            module = "numpy._core." + module[len("numpy.core."):] if hasattr(np, "_core") else module
        return super().find_class(module, name)


def _unpickle(path):
    try:
        with open(path, "rb") as f:
            obj = _BatchUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, ImportError,
            IndexError, KeyError) as e:
        raise ValueError(f"{path} is not a CIFAR-10 python batch (unpickling refused or failed: "
                         f"{e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected a dict, got "
                         f"{type(obj).__name__}")
    return obj


def _cifar_batch(path):
    d = _unpickle(path)
    data, labels = d.get(b"data", d.get("data")), d.get(b"labels", d.get("labels"))
    if data is None or labels is None:
        keys = sorted(k.decode() if isinstance(k, bytes) else str(k) for k in d)
        raise ValueError(f"{path} is not a CIFAR-10 python batch: expected keys b'data' and "
                         f"b'labels', found {keys}")
    data = np.asarray(data)
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(f"{path}: b'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
    y = _labels(labels, str(path))
    if len(y) != len(data):
        raise ValueError(f"{path}: {len(data)} images but {len(y)} labels")
    if len(y) and y.max() > 9:
        raise ValueError(f"{path}: CIFAR-10 labels must be in 0..9, got max {int(y.max())}")
    return data.reshape(-1, 3, 32, 32), y


def _load_cifar10(root):
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not root.is_dir():
        raise FileNotFoundError(f"CIFAR-10 root {root} is not a directory: expected the folder of the "
                                f"python batches ({', '.join(names)})")
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 root {root} lacks {', '.join(missing)}: expected the "
                                f"standard python batches ({', '.join(names)})")
    parts = [_cifar_batch(root / n) for n in names[:5]]
    Xtr = np.concatenate([p[0] for p in parts])
    ytr = torch.cat([p[1] for p in parts])
    Xte, yte = _cifar_batch(root / "test_batch")
    classes = list(CIFAR10_CLASSES)
    if (root / "batches.meta").is_file():
        m = _unpickle(root / "batches.meta")
        names_ = m.get(b"label_names", m.get("label_names"))
        if names_ is not None and len(names_) == 10:
            classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names_]
    # float64 statistics: float32 sums over 150M values lose digits.
    tr = torch.from_numpy(Xtr).to(torch.float32).div_(255.0)
    mean = tr.double().mean(dim=(0, 2, 3))
    std = tr.double().std(dim=(0, 2, 3)).clamp_min(1e-6)
    te = torch.from_numpy(Xte).to(torch.float32).div_(255.0)
    for t in (tr, te):
        t.sub_(mean.float().view(1, 3, 1, 1)).div_(std.float().view(1, 3, 1, 1))
    return DataSplits(TensorDataset(tr, ytr), TensorDataset(te, yte), input_shape=(3, 32, 32),
                      num_classes=10, name="cifar10", classes=classes,
                      meta={"scaling": "pixel / 255, then per-channel (x - mean) / std of train",
                            "mean": mean.tolist(), "std": std.tolist(), "root": str(root)})


NPZ_KEYS = ("X", "y", "X_test", "y_test", "X_unlabelled")


def _why(e):
    """One line of why numpy / zipfile could not read a file or member."""
    text = one_line(e, 160)
    return f"{type(e).__name__}: {text}" if str(e).strip() else type(e).__name__


def _load_npz(path, seed, test_fraction):
    if not path.is_file():
        raise FileNotFoundError(f"npz dataset {path} does not exist: expected an .npz file with "
                                f"arrays X (N, D) float and y (N,) int")
    try:
        z = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{path} is not a readable .npz file ({_why(e)}): expected arrays X and "
                         "y (numpy.savez)") from None
    if not hasattr(z, "files"):
        raise ValueError(f"{path} holds a single array, not an .npz archive with X and y")
    with z:
        keys = set(z.files)
        if not {"X", "y"} <= keys:
            raise ValueError(f"{path} must contain arrays 'X' and 'y', found {sorted(keys)}")
        if ("X_test" in keys) != ("y_test" in keys):
            raise ValueError(f"{path}: X_test and y_test must be given together, found {sorted(keys)}")
        arrays = {}
        for k in sorted(keys & set(NPZ_KEYS)):  # members are read (and checked) here, one by one
            try:
                arrays[k] = z[k]
            except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{path}: member {k} is not a readable array ({_why(e)}); write "
                                 "the file again with numpy.savez (numbers only: no object "
                                 "arrays)") from None

    def features(a, key):
        if a.dtype.kind not in "fiub" or a.ndim < 2 or 0 in a.shape:
            raise ValueError(f"{path}: {key} must be a numeric array (N, D...) with N, D >= 1, got "
                             f"{a.shape} {a.dtype}")
        with np.errstate(over="ignore", invalid="ignore"):  # beyond float32: inf, refused below
            t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        bad = int((~torch.isfinite(t)).sum())
        if bad:  # NaN/Inf (or float64 values beyond float32) would silently poison every loss
            raise ValueError(f"{path}: {key} has {bad} non-finite value(s) (NaN/Inf, or beyond the "
                             f"float32 range); clean or impute them first")
        return t

    X, y = features(arrays["X"], "X"), _labels(arrays["y"], f"{path}: y")
    if len(X) != len(y):
        raise ValueError(f"{path}: X has {len(X)} rows but y has {len(y)}")
    if "X_test" in arrays:
        Xte, yte = features(arrays["X_test"], "X_test"), _labels(arrays["y_test"], f"{path}: y_test")
        if Xte.shape[1:] != X.shape[1:] or len(Xte) != len(yte):
            raise ValueError(f"{path}: X_test {tuple(Xte.shape)} / y_test {tuple(yte.shape)} do not "
                             f"match X {tuple(X.shape)}")
        Xtr, ytr = X, y
    else:
        Xtr, ytr, Xte, yte = _split(X, y, _check_fraction(test_fraction), seed)
    unlabelled = None
    if "X_unlabelled" in arrays:
        unlabelled = features(arrays["X_unlabelled"], "X_unlabelled")
        if unlabelled.shape[1:] != X.shape[1:]:
            raise ValueError(f"{path}: X_unlabelled rows {tuple(unlabelled.shape[1:])} differ from "
                             f"X rows {tuple(X.shape[1:])}")
    num_classes = int(max(ytr.max().item() if len(ytr) else -1, yte.max().item() if len(yte) else -1)) + 1
    distinct = len(torch.cat([ytr, yte]).unique())
    if num_classes > max(1000, 10 * distinct):  # ids, not indices: every model would have C outputs
        raise ValueError(f"{path}: the labels reach {num_classes - 1} but only {distinct} distinct "
                         f"values occur: labels must be class indices 0..C-1 (every model gets "
                         f"{num_classes} outputs); remap them, e.g. numpy.unique(y, "
                         "return_inverse=True)[1]")
    return DataSplits(TensorDataset(Xtr, ytr), TensorDataset(Xte, yte), input_shape=tuple(X.shape[1:]),
                      num_classes=num_classes, name="npz",
                      meta={"path": str(path), "scaling": "none (values used as stored)",
                            "seed": seed, "split": "given" if "X_test" in arrays else "random"},
                      unlabelled=unlabelled)
