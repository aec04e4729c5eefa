"""The teacher-logit store: crash safety (SIGKILL mid-run, then resume), index alignment, identity
checks, checksums, and distributed (2 gloo processes) collection equal to a single process."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mimic_fast._wording import cli_wording
from mimic_fast.data import collect_logits, fingerprint
from mimic_fast.data.collect import CHECKED_ROWS
from mimic_fast.data.store import HEADER_NAME, LOGITS_NAME, LogitDataset, LogitStore

REPO = str(Path(__file__).resolve().parents[1])

# Shared by the parent test and its subprocesses, so both build the very same teacher and data.
# The teacher is elementwise (no matmul), so its logits are bit-identical for any batch split.
WORKER = textwrap.dedent("""
    import sys, time
    import torch
    from torch.utils.data import TensorDataset
    from mimic_fast.data import collect_logits

    N, D, C = {N}, 8, 5

    class Teacher(torch.nn.Module):
        def __init__(self, delay=0.0):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = torch.nn.Parameter(torch.randn(C, generator=g) * 30)
            self.b = torch.nn.Parameter(torch.randn(C, generator=g))
            self.delay, self.rows = delay, 0

        def forward(self, x):
            time.sleep(self.delay)
            self.rows += x.shape[0]
            return x[:, :C] * self.w + self.b

    def data():
        return TensorDataset(torch.randn(N, D, generator=torch.Generator().manual_seed(1)))

    if __name__ == "__main__":
        mode, path = sys.argv[1], sys.argv[2]
        if mode == "slow":
            collect_logits(Teacher(delay=0.05), data(), path, batch_size=4, chunk_rows=8,
                           progress=False)
        else:  # ddp RANK WORLD RENDEZVOUS_FILE
            rank, world, rdv = int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
            torch.distributed.init_process_group("gloo", init_method="file://" + rdv, rank=rank,
                                                 world_size=world)
            try:
                collect_logits(Teacher(), data(), path, batch_size=3, chunk_rows=10, progress=False)
            finally:
                torch.distributed.destroy_process_group()
""")


def _worker(tmp_path, n):
    f = tmp_path / "store_worker.py"
    f.write_text(WORKER.format(N=n))
    spec = importlib.util.spec_from_file_location("store_worker", f)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return f, mod


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _header(path):
    p = Path(path) / HEADER_NAME
    return json.loads(p.read_text()) if p.exists() else None


def test_sigkill_mid_run_then_resume_loses_nothing(tmp_path):
    script, w = _worker(tmp_path, n=200)
    store_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(script), "slow", str(store_dir)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            h = _header(store_dir) if (store_dir / HEADER_NAME).exists() else None
            if h and h["committed"] >= 3:
                break
            if proc.poll() is not None:
                pytest.fail(f"worker exited early: {proc.stdout.read().decode()}")
            time.sleep(0.01)
        else:
            pytest.fail("worker committed no chunk in 60 s")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    h = _header(store_dir)
    assert 3 <= h["committed"] < h["n_chunks"], "the kill must land mid-run"
    committed_rows = h["committed"] * h["chunk_rows"]

    with pytest.raises(ValueError, match="incomplete"):
        LogitStore.open(store_dir)
    partial = LogitStore.open(store_dir, allow_partial=True)
    assert partial.committed_rows == committed_rows
    partial.verify()

    fresh = collect_logits(w.Teacher(), w.data(), tmp_path / "fresh", batch_size=4, chunk_rows=8,
                           progress=False)
    teacher = w.Teacher()
    resumed = collect_logits(teacher, w.data(), store_dir, batch_size=4, chunk_rows=8, progress=False)
    # Only the uncommitted rows were recomputed (and the few rerun to check the teacher is the
    # same): nothing committed was redone or skipped.
    assert teacher.rows == w.N - committed_rows + CHECKED_ROWS
    assert resumed.complete and resumed.header["committed"] == resumed.header["n_chunks"]
    assert torch.equal(resumed.tensor(), fresh.tensor())
    assert resumed.header["checksums"] == fresh.header["checksums"]
    resumed.verify()
    expected = (w.data().tensors[0][:, :w.C] * teacher.w + teacher.b).detach().half().float()
    assert torch.equal(resumed.tensor(), expected)


def test_complete_store_is_reused_and_training_mode_restored(tmp_path):
    _, w = _worker(tmp_path, n=30)
    collect_logits(w.Teacher(), w.data(), tmp_path / "s", batch_size=7, progress=False)
    teacher = w.Teacher()
    teacher.train()
    store = collect_logits(teacher, w.data(), tmp_path / "s", batch_size=7, progress=False)
    # only the few rows that check it is the same teacher are run again
    assert teacher.rows == CHECKED_ROWS and teacher.training and store.complete and len(store) == 30


def test_alignment_under_shuffled_loader(tmp_path):
    torch.manual_seed(0)
    X, y = torch.randn(53, 6), torch.randint(0, 4, (53,))
    teacher = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    ds = TensorDataset(X, y)
    store = collect_logits(teacher, ds, tmp_path / "s", batch_size=8, chunk_rows=16, dtype=torch.float32,
                           progress=False)
    ld = LogitDataset(ds, store, with_labels=True)
    with torch.no_grad():
        ref = teacher(X)
    seen = []
    for num_workers in (0, 1):  # 1: the store is pickled into a worker and reopens its memmap
        for xb, tb, ib, yb in DataLoader(ld, batch_size=7, shuffle=True, num_workers=num_workers):
            assert torch.equal(xb, X[ib]) and torch.equal(yb, y[ib])
            torch.testing.assert_close(tb, ref[ib], rtol=1e-5, atol=1e-6)
            seen.append(ib)
    assert sorted(torch.cat(seen).tolist()) == sorted(list(range(53)) * 2)
    xb, tb, ib, yb = ld.get_batch([5, 0, 52])
    assert torch.equal(xb, X[[5, 0, 52]]) and torch.equal(tb, store.tensor()[[5, 0, 52]])
    assert torch.equal(yb, y[[5, 0, 52]]) and ib.tolist() == [5, 0, 52]


class _XOnly(Dataset):
    """Items are bare tensors and there is no .tensors: the DataLoader path, not the slicing one."""

    def __init__(self, X):
        self.X = X

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i]


def test_generic_dataset_path_matches_tensor_path_and_unlabelled_items(tmp_path):
    _, w = _worker(tmp_path, n=25)
    X = w.data().tensors[0]
    a = collect_logits(w.Teacher(), _XOnly(X), tmp_path / "a", batch_size=4, progress=False)
    b = collect_logits(w.Teacher(), TensorDataset(X), tmp_path / "b", batch_size=4, progress=False)
    c = collect_logits(w.Teacher(), _XOnly(X), tmp_path / "c", batch_size=4, chunk_rows=8,
                       num_workers=1, progress=False)
    assert torch.equal(a.tensor(), b.tensor()) and torch.equal(c.tensor(), b.tensor())
    item = LogitDataset(_XOnly(X), a, with_labels=True)[3]
    assert item[2] == 3 and item[3] == -1 and torch.equal(item[0], X[3])


def test_fingerprint_refusal_and_identity_checks(tmp_path):
    _, w = _worker(tmp_path, n=40)
    ds = w.data()
    collect_logits(w.Teacher(), ds, tmp_path / "s", batch_size=8, progress=False)
    X2 = ds.tensors[0].clone()
    X2[23, 0] += 1.0  # a middle row: the old 66-row fingerprint never read it
    other = TensorDataset(X2)
    assert fingerprint(other) != fingerprint(ds)
    assert fingerprint(TensorDataset(ds.tensors[0].clone(), torch.zeros(40))) == fingerprint(ds)
    with pytest.raises(ValueError, match="dataset row 23 .*1 of 40 rows differ"):
        LogitStore.open(tmp_path / "s", dataset=other)
    with pytest.raises(ValueError, match="rows"):
        LogitStore.open(tmp_path / "s", dataset=TensorDataset(ds.tensors[0][:39]))
    with pytest.raises(ValueError, match="dataset row 23"):
        LogitDataset(other, tmp_path / "s")
    with pytest.raises(ValueError, match="dataset row 23"):
        collect_logits(w.Teacher(), other, tmp_path / "s", progress=False)
    t2 = w.Teacher()
    with torch.no_grad():
        t2.b += 1
    with pytest.raises(ValueError, match="teacher"):
        collect_logits(t2, ds, tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match="dtype"):
        collect_logits(w.Teacher(), ds, tmp_path / "s", dtype=torch.float32, progress=False)
    s = collect_logits(t2, ds, tmp_path / "s", overwrite=True, progress=False)
    assert torch.equal(s.tensor(), (ds.tensors[0][:, :5] * t2.w + t2.b).detach().half().float())
    with pytest.raises(FileNotFoundError, match="no logit store"):
        LogitStore.open(tmp_path / "nowhere")


def test_verify_catches_a_corrupted_row(tmp_path):
    _, w = _worker(tmp_path, n=50)
    store = collect_logits(w.Teacher(), w.data(), tmp_path / "s", batch_size=4, chunk_rows=16,
                           progress=False)
    assert store.verify() == []
    mm = np.lib.format.open_memmap(tmp_path / "s" / LOGITS_NAME, mode="r+")
    mm[37, 2] += np.float16(0.5)
    mm.flush()
    del mm
    with pytest.raises(ValueError, match=r"chunk 2 \(rows 32\.\.47\)"):
        LogitStore.open(tmp_path / "s")  # verified when opened, not only by an explicit verify()
    reopened = LogitStore.open(tmp_path / "s", verify=False)  # the opt-out for huge stores
    with pytest.raises(ValueError, match=r"chunk 2 \(rows 32\.\.47\)"):
        reopened.verify()
    assert reopened.verify(raise_error=False) == [2]


def test_bad_arguments_and_teacher_outputs(tmp_path):
    _, w = _worker(tmp_path, n=10)
    with pytest.raises(ValueError, match="bfloat16"):
        collect_logits(w.Teacher(), w.data(), tmp_path / "a", dtype=torch.bfloat16, progress=False)
    with pytest.raises(ValueError, match="empty"):
        collect_logits(w.Teacher(), TensorDataset(torch.zeros(0, 8)), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="expected logits"):
        collect_logits(torch.nn.Flatten(0), w.data(), tmp_path / "c", progress=False)
    big = w.Teacher()
    with torch.no_grad():
        big.w *= 1e5
    with pytest.raises(ValueError, match="overflow"):
        collect_logits(big, w.data(), tmp_path / "d", progress=False)
    assert collect_logits(big, w.data(), tmp_path / "e", dtype=torch.float32, progress=False).complete


def test_ddp_two_gloo_processes_equal_single_process(tmp_path):
    script, w = _worker(tmp_path, n=37)  # 37 rows, chunks of 10, 2 ranks: uneven shares and tail
    procs = [subprocess.Popen([sys.executable, str(script), "ddp", str(tmp_path / "ddp"), str(r), "2",
                               str(tmp_path / "rdv")], env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT) for r in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=120)[0].decode())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(outs)
    single = collect_logits(w.Teacher(), w.data(), tmp_path / "single", batch_size=3, chunk_rows=10,
                            progress=False)
    ddp = LogitStore.open(tmp_path / "ddp", dataset=w.data())
    assert ddp.header["world_size"] == 2 and ddp.complete
    assert torch.equal(ddp.tensor(), single.tensor())
    assert ddp.header["checksums"] == single.header["checksums"]
    ddp.verify()


class _Crash(Exception):
    pass


@pytest.mark.parametrize("where", ["teacher", "header_replace"])
def test_injected_crash_points_resume_exactly(tmp_path, monkeypatch, where):
    """Deterministic crash points the SIGKILL test can only hit by chance: inside a chunk's rows, and
    between writing the new header and renaming it into place (the old header must win)."""
    import mimic_fast._io as io_mod

    _, w = _worker(tmp_path, n=45)
    teacher = w.Teacher()
    if where == "teacher":
        forward = teacher.forward

        def failing(x):
            if teacher.rows >= 22:  # rows 0..7, 8..15 committed; dies inside chunk 2
                raise _Crash
            return forward(x)
        teacher.forward = failing
    else:
        real_replace, calls = os.replace, []

        def failing_replace(src, dst):
            calls.extend([dst] if str(dst).endswith(HEADER_NAME) else [])  # not the lock owner file
            if len(calls) == 4:  # initial header, chunk 0, chunk 1, then dies committing chunk 2
                raise _Crash
            real_replace(src, dst)
        monkeypatch.setattr(io_mod.os, "replace", failing_replace)
    with pytest.raises(_Crash):
        collect_logits(teacher, w.data(), tmp_path / "s", batch_size=3, chunk_rows=8, progress=False)
    monkeypatch.undo()
    assert _header(tmp_path / "s")["committed"] == 2
    t2 = w.Teacher()
    resumed = collect_logits(t2, w.data(), tmp_path / "s", batch_size=3, chunk_rows=8, progress=False)
    fresh = collect_logits(w.Teacher(), w.data(), tmp_path / "f", batch_size=3, chunk_rows=8,
                           progress=False)
    assert t2.rows == 45 - 16 + CHECKED_ROWS and torch.equal(resumed.tensor(), fresh.tensor())
    resumed.verify()


def test_teacher_in_another_float_dtype_gets_inputs_in_its_dtype(tmp_path):
    # e.g. a half-precision teacher on a GPU fed float32 rows; float64 stands in for it on the CPU
    torch.manual_seed(0)
    teacher = torch.nn.Linear(4, 3).double()
    x = torch.randn(10, 4)
    store = collect_logits(teacher, TensorDataset(x), tmp_path / "s", batch_size=4,
                           dtype=torch.float32, progress=False)
    assert torch.allclose(store.tensor(), teacher(x.double()).float(), atol=1e-6)


def test_non_finite_or_overflowing_logits_name_the_exact_row(tmp_path):
    X = torch.randn(20, 4)

    def nan_at_13(x):
        out = x.clone()
        out[(x == X[13]).all(1)] = float("nan")
        return out
    with pytest.raises(ValueError, match=r"NaN/Inf logits for dataset row 13 \(1 of rows 8\.\.15\)"):
        collect_logits(nan_at_13, TensorDataset(X), tmp_path / "a", batch_size=8, progress=False)

    def big_at_6(x):
        out = x.clone()
        out[(x == X[6]).all(1)] = 1e6
        return out
    with pytest.raises(ValueError, match=r"dataset row 6 overflow torch.float16 .*store float32 "
                                         r"\(dtype=torch\.float32\)") as e:
        collect_logits(big_at_6, TensorDataset(X), tmp_path / "b", batch_size=8, progress=False)
    assert "--dtype" not in str(e.value)  # a library call is told the keyword, the CLI the flag
    with cli_wording(), pytest.raises(ValueError, match=r"store float32 \(--dtype float32\)"):
        collect_logits(big_at_6, TensorDataset(X), tmp_path / "c", batch_size=8, progress=False)


def test_damage_and_reuse_refusals_keep_their_own_remedies(tmp_path):
    X = torch.randn(20, 4)
    collect_logits(lambda x: x, TensorDataset(X), tmp_path / "s", progress=False)
    with pytest.raises(ValueError, match=r"recollect the logits: collect_logits\(\.\.\., overwrite=True\)"):
        LogitStore.open(tmp_path / "s", TensorDataset(X + 1))  # other data
    with pytest.raises(ValueError, match="was made with dtype 'float16' .*; use another path, or "
                                         r"overwrite=True"):
        collect_logits(lambda x: x, TensorDataset(X), tmp_path / "s", dtype=torch.float32,
                       progress=False)
    (tmp_path / "s" / HEADER_NAME).write_text("{")
    with pytest.raises(ValueError, match=r"not a valid logit-store header .*recollect it: "):
        LogitStore.open(tmp_path / "s")
