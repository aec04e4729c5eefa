"""Bring your own logits: LogitStore.from_array, `mimic-fast import-logits`, (x, t, y) items."""
import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import mimic_fast as mf
from mimic_fast import cli
from mimic_fast import train as T
from mimic_fast.data import LogitDataset, LogitStore, load_dataset
from mimic_fast.testing import assert_close

N, D, C = 50, 6, 3


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, D, generator=g)
    y = torch.randint(0, C, (N,), generator=g)
    y[::3] = -1  # unlabelled rows
    return X, y, np.random.default_rng(0).normal(size=(N, C)).astype(np.float32)


def test_from_array_writes_a_verified_store(tmp_path):
    X, y, logits = _data()
    ds = TensorDataset(X, y)
    store = LogitStore.from_array(tmp_path / "s", logits, ds, source="mine.npy")
    assert store.complete and store.verify() == [] and store.header["dtype"] == "float32"
    assert np.array_equal(store.logits, logits)
    assert "mine.npy" in store.header["teacher"] and "sha256" in store.header["teacher"]
    reopened = LogitStore.open(tmp_path / "s", ds)  # an ordinary store: fingerprint checked
    assert np.array_equal(reopened.logits, logits)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        LogitStore.from_array(tmp_path / "s", logits, ds)
    half = LogitStore.from_array(tmp_path / "s", torch.from_numpy(logits), ds, dtype=torch.float16,
                                 overwrite=True)
    assert half.header["dtype"] == "float16"
    assert np.array_equal(half.logits, logits.astype(np.float16))
    with pytest.raises(ValueError, match="other data"):
        LogitStore.open(tmp_path / "s", TensorDataset(X + 1))


def test_from_array_refuses_bad_arrays(tmp_path):
    X, y, logits = _data()
    ds = TensorDataset(X)
    with pytest.raises(ValueError, match="has 49 rows but the dataset has 50"):
        LogitStore.from_array(tmp_path / "a", logits[:-1], ds)
    with pytest.raises(TypeError, match="2-D floating-point"):
        LogitStore.from_array(tmp_path / "b", logits.astype(np.int64), ds)
    bad = logits.copy()
    bad[7, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        LogitStore.from_array(tmp_path / "c", bad, ds)
    with pytest.raises(ValueError, match="overflow"):
        LogitStore.from_array(tmp_path / "d", logits * 1e6, ds, dtype=torch.float16)


def test_x_t_y_items_mix_hard_labels(tmp_path):
    X, y, logits = _data()
    ds = TensorDataset(X, y)
    store = LogitStore.from_array(tmp_path / "s", logits, ds)
    three = LogitDataset(ds, store, with_labels=True, with_index=False)
    assert three.fields == ("x", "logits", "y") and len(three[4]) == 3 and three[3][2] == -1
    four = LogitDataset(ds, store, with_labels=True)
    no_labels = LogitDataset(ds, store)
    kw = dict(alpha=0.4, epochs=2, batch_size=25, lr=0.05, progress=False)
    runs = []
    for data in (three, four, TensorDataset(X, torch.from_numpy(logits), y)):
        torch.manual_seed(0)
        runs.append(T.distill(mf.nn.WideShallowStudent(D, C, 16, 2), data, **kw))
    for r in runs[1:]:  # (x, t, y), (x, t, i, y) and a plain TensorDataset train the same way
        for key in ("loss", "soft_loss", "hard_loss"):
            assert r.final[key] == pytest.approx(runs[0].final[key], rel=1e-6), key
    with pytest.raises(ValueError, match="with_labels=True"):
        T.distill(mf.nn.WideShallowStudent(D, C, 16, 2), no_labels, **kw)
    with pytest.raises(TypeError, match="integer class index"):
        T.distill(mf.nn.WideShallowStudent(D, C, 16, 2),
                  TensorDataset(X, torch.from_numpy(logits), y.float()), **kw)


def test_cli_import_logits_then_distill(tmp_path, capsys):
    splits = load_dataset("digits", seed=0)
    n = len(splits.train)
    w = np.random.default_rng(1).normal(size=(64, 10)).astype(np.float32)
    logits = splits.train.tensors[0].reshape(n, -1).numpy() @ w
    np.save(tmp_path / "l.npy", logits)
    out = tmp_path / "imported"
    args = ["import-logits", "--dataset", "digits", "--logits", str(tmp_path / "l.npy"), "--out",
            str(out)]
    assert cli.main(args) == 0
    assert "verified" in capsys.readouterr().out
    store = LogitStore.open(out / "logits")
    assert np.array_equal(store.logits, logits)
    assert cli.main(args) == 2  # an existing store is kept
    err = capsys.readouterr().err
    assert "rerun with --overwrite" in err and "overwrite=True" not in err
    np.save(tmp_path / "short.npy", logits[:10])
    assert cli.main([*args[:3], "--logits", str(tmp_path / "short.npy"), "--out",
                     str(tmp_path / "x")]) == 2
    assert "has shape (10, 10) but the transfer set" in capsys.readouterr().err
    assert not (tmp_path / "x" / "transfer.pt").exists()  # refused before anything is written
    # a NaN is named by file and exact row; float16 overflow says which flag to use
    bad = logits.copy()
    bad[5, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    assert cli.main([*args[:3], "--logits", str(tmp_path / "nan.npy"), "--out",
                     str(tmp_path / "n")]) == 2
    err = capsys.readouterr().err
    assert f"--logits {tmp_path / 'nan.npy'}: row 5 holds NaN or Inf (1 such rows)" in err
    assert not (tmp_path / "n" / "transfer.pt").exists()
    np.save(tmp_path / "big.npy", logits * 1e5)
    assert cli.main([*args[:3], "--logits", str(tmp_path / "big.npy"), "--dtype", "float16",
                     "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "store float32 (--dtype float32)" in err and "dtype=torch" not in err
    assert not (tmp_path / "b" / "transfer.pt").exists()
    # the import refuses exactly what the cast would turn into Inf, as collection does
    edge = logits.astype(np.float64)
    edge[3, 0] = 65519.0  # rounds to float16's max, 65504
    np.save(tmp_path / "edge.npy", edge)
    assert cli.main([*args[:3], "--logits", str(tmp_path / "edge.npy"), "--dtype", "float16",
                     "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    assert LogitStore.open(tmp_path / "e" / "logits").logits[3, 0] == 65504
    edge[3, 0] = 65520.0  # rounds to Inf
    np.save(tmp_path / "edge.npy", edge)
    assert cli.main([*args[:3], "--logits", str(tmp_path / "edge.npy"), "--dtype", "float16",
                     "--out", str(tmp_path / "e2")]) == 2
    assert "row 3 holds |logit| 6.55e+04, more than float16 can store (65504)" in \
        capsys.readouterr().err
    with pytest.raises(ValueError, match="overflow"):
        LogitStore.from_array(tmp_path / "e3", edge, TensorDataset(splits.train.tensors[0]),
                              dtype=torch.float16)
    student = tmp_path / "student"
    assert cli.main(["distill", "--dataset", "digits", "--logits", str(out), "--hidden", "32",
                     "--bottleneck", "4", "--epochs", "1", "--out", str(student),
                     "--no-progress"]) == 0
    assert json.loads(open(os.path.join(student, "metrics.jsonl")).readline())["epoch"] == 1
