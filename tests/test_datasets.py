"""Loaders on tiny files written here in the real formats, and clear errors for bad paths."""
import pickle

import numpy as np
import pytest
import torch

from mimic_fast.data.datasets import load_dataset


def test_digits_scaled_stratified_and_seeded():
    s = load_dataset("digits", seed=0, test_fraction=0.25)
    X, y = s.train.tensors
    assert X.dtype == torch.float32 and y.dtype == torch.int64 and X.shape[1] == 64
    assert s.input_shape == (1, 8, 8) and s.num_classes == 10 and s.in_features == 64
    assert len(s.train) + len(s.test) == 1797 and abs(len(s.test) - 0.25 * 1797) < 1
    assert X.min() >= 0 and X.max() <= 1 and X.max() == 1
    assert torch.bincount(s.test.tensors[1], minlength=10).min() >= 40  # stratified
    again, other = load_dataset("digits", seed=0, test_fraction=0.25), load_dataset("digits", seed=1)
    assert torch.equal(again.train.tensors[0], X) and not torch.equal(other.train.tensors[0][:50], X[:50])


def _write_batch(path, images, labels, **extra):
    with open(path, "wb") as f:
        pickle.dump({b"batch_label": b"fake", b"data": images, b"labels": list(labels),
                     b"filenames": [b"x.png"] * len(labels), **extra}, f)


def _fake_cifar(root, per_batch=4):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    imgs = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch)
        _write_batch(root / name, data, labels)
        imgs[name] = (data, labels)
    return imgs


def test_cifar10_real_format(tmp_path):
    imgs = _fake_cifar(tmp_path / "cifar-10-batches-py")
    s = load_dataset("cifar10", root=tmp_path)  # the parent of cifar-10-batches-py also works
    X, y = s.train.tensors
    assert X.shape == (20, 3, 32, 32) and s.test.tensors[0].shape == (4, 3, 32, 32)
    assert s.input_shape == (3, 32, 32) and s.num_classes == 10 and s.classes[0] == "airplane"
    assert y.tolist() == np.concatenate([imgs[f"data_batch_{i}"][1] for i in range(1, 6)]).tolist()
    # Row layout: 1024 red, then green, then blue values, row-major 32x32; then per-channel scaling.
    raw = imgs["data_batch_2"][0][1]  # train row 5
    mean, std = s.meta["mean"], s.meta["std"]
    for c, (r, col) in [(0, (0, 0)), (1, (3, 7)), (2, (31, 30))]:
        expected = (raw[c * 1024 + r * 32 + col] / 255.0 - mean[c]) / std[c]
        assert abs(X[5, c, r, col].item() - expected) < 1e-5
    assert torch.allclose(X.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


def test_cifar10_missing_and_malformed(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_dataset("cifar10", root=tmp_path / "nope")
    root = tmp_path / "c"
    _fake_cifar(root)
    (root / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_dataset("cifar10", root=root)
    with open(root / "data_batch_3", "wb") as f:
        pickle.dump({b"pixels": np.zeros((2, 3072), np.uint8)}, f)
    with pytest.raises(ValueError, match=r"data_batch_3.*b'data'.*pixels"):
        load_dataset("cifar10", root=root)
    _write_batch(root / "data_batch_3", np.zeros((2, 1024), np.uint8), [0, 1])
    with pytest.raises(ValueError, match=r"\(N, 3072\) uint8"):
        load_dataset("cifar10", root=root)
    (root / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="data_batch_3"):
        load_dataset("cifar10", root=root)
    with pytest.raises(ValueError, match="root="):
        load_dataset("cifar10")


def test_npz_split_given_test_and_unlabelled(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 7)), rng.integers(0, 4, size=50)
    np.savez(tmp_path / "a.npz", X=X, y=y)
    s = load_dataset("npz", root=tmp_path / "a.npz", seed=3, test_fraction=0.2)
    assert (len(s.train), len(s.test)) == (40, 10) and s.input_shape == (7,) and s.num_classes == 4
    both = torch.cat([s.train.tensors[0], s.test.tensors[0]])
    assert sorted(map(tuple, both.tolist())) == sorted(map(tuple, X.astype(np.float32).tolist()))
    assert torch.equal(load_dataset("npz", root=tmp_path / "a.npz", seed=3).test.tensors[0],
                       s.test.tensors[0])
    np.savez(tmp_path / "b.npz", X=X, y=y, X_test=X[:5], y_test=y[:5] + 5, X_unlabelled=X[:9] * 2)
    s = load_dataset("npz", root=tmp_path / "b.npz")
    assert len(s.train) == 50 and len(s.test) == 5 and s.num_classes == int(y[:5].max()) + 6
    assert s.unlabelled.shape == (9, 7) and s.unlabelled.dtype == torch.float32


@pytest.mark.parametrize("arrays, match", [
    ({"X": np.zeros((4, 3))}, r"'X' and 'y'.*\['X'\]"),
    ({"X": np.zeros((4, 3)), "y": np.zeros(3, np.int64)}, "4 rows but y has 3"),
    ({"X": np.zeros((4, 3)), "y": np.array([0.5, 1, 2, 3])}, "integers"),
    ({"X": np.zeros((4, 3)), "y": np.array([0, 1, -1, 2])}, ">= 0"),
    ({"X": np.zeros(4), "y": np.zeros(4, np.int64)}, r"X must be a numeric array \(N, D"),
    ({"X": np.zeros((4, 3)), "y": np.zeros(4, np.int64), "X_test": np.zeros((2, 3))}, "together"),
    ({"X": np.zeros((4, 3)), "y": np.zeros(4, np.int64), "X_unlabelled": np.zeros((2, 5))},
     "X_unlabelled rows"),
    ({"X": np.array([[0, np.nan, 0]] * 4), "y": np.zeros(4, np.int64)}, "X has 4 non-finite"),
    ({"X": np.zeros((4, 3)), "y": np.zeros(4, np.int64), "X_test": np.full((2, 3), np.inf),
      "y_test": np.zeros(2, np.int64)}, "X_test has 6 non-finite"),
])
def test_npz_malformed(tmp_path, arrays, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=match):
        load_dataset("npz", root=tmp_path / "bad.npz")


def test_npz_missing_or_not_npz(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"missing\.npz.*X \(N, D\)"):
        load_dataset("npz", root=tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"hello")
    with pytest.raises(ValueError, match="junk.npz"):
        load_dataset("npz", root=tmp_path / "junk.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(ValueError, match="single array"):
        load_dataset("npz", root=tmp_path / "one.npy")
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("digits", test_fraction=1.5)
