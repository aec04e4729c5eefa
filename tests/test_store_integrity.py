"""Damage and mistakes a logit store must refuse instead of serving: corrupted files and headers,
changed / swapped / shuffled inputs, and a second writer (one lock per store)."""
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
from torch.utils.data import TensorDataset

from mimic_fast._io import LockedError, atomic_write_text
from mimic_fast.data import collect_logits
from mimic_fast.data.store import HEADER_NAME, INPUTS_NAME, LOGITS_NAME, LogitDataset, LogitStore

REPO = str(Path(__file__).resolve().parents[1])
N, D, C = 43, 6, 4  # 43 rows in chunks of 8: 6 chunks, the last one short


class Teacher(torch.nn.Module):
    def __init__(self, shift=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = torch.nn.Linear(D, C)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(C, D, generator=g))
            self.lin.bias.fill_(shift)

    def forward(self, x):
        return self.lin(x)


def _data(n=N):
    return TensorDataset(torch.randn(n, D, generator=torch.Generator().manual_seed(1)))


def _collect(path, data=None, **kw):
    return collect_logits(Teacher(), data if data is not None else _data(), path, batch_size=4,
                          chunk_rows=8, progress=False, **kw)


def _edit_header(path, edit):
    h = json.loads((path / HEADER_NAME).read_text())
    edit(h)
    atomic_write_text(path / HEADER_NAME, json.dumps(h))


def _edit_npy(path, name, edit):
    mm = np.lib.format.open_memmap(path / name, mode="r+")
    edit(mm)
    mm.flush()
    del mm


def _flip_bit(mm):
    mm.view(np.uint8).reshape(-1)[mm.nbytes // 2] ^= 1


def _swap_rows(mm):
    mm[[3, 20]] = mm[[20, 3]]


def _truncate(path):
    with open(path / LOGITS_NAME, "r+b") as f:
        f.truncate(os.path.getsize(path / LOGITS_NAME) - 10)


def _flip_magic(path):
    with open(path / LOGITS_NAME, "r+b") as f:
        f.seek(1)
        f.write(b"X")


# (name, damage, the message the refusal must contain)
CORRUPTIONS = [
    ("bit flip", lambda p: _edit_npy(p, LOGITS_NAME, _flip_bit), r"checksum mismatch in chunk 2 "),
    ("last row byte", lambda p: _edit_npy(p, LOGITS_NAME, lambda m: m[-1].view(np.uint8).__setitem__(
        0, m[-1].view(np.uint8)[0] ^ 0xFF)), r"chunk 5 \(rows 40\.\.42\)"),
    ("64 rows zeroed", lambda p: _edit_npy(p, LOGITS_NAME, lambda m: m[:43].__setitem__(..., 0)),
     "checksum mismatch"),
    ("two rows swapped", lambda p: _edit_npy(p, LOGITS_NAME, _swap_rows), r"chunk 0 .*chunk 2 "),
    ("NaN written", lambda p: _edit_npy(p, LOGITS_NAME, lambda m: m.__setitem__((9, 1), np.nan)),
     r"chunk 1 \(rows 8\.\.15\)"),
    ("input digest edited", lambda p: _edit_npy(p, INPUTS_NAME, lambda m: m.__setitem__(30, 7)),
     r"chunk 3 \(rows 24\.\.31\)"),
    ("checksum edited", lambda p: _edit_header(p, lambda h: h["checksums"].__setitem__(4, "0" * 64)),
     r"chunk 4 "),
    ("chunk size edited", lambda p: _edit_header(p, lambda h: h.__setitem__("chunk_rows", 16)),
     "n_chunks is 6 but n=43 rows in chunks of 16 make 3"),
    ("complete but 4 of 6 committed", lambda p: _edit_header(p, lambda h: h.update(committed=4)),
     "complete is true but 4 of 6 chunks are committed"),
    ("no checksums key", lambda p: _edit_header(p, lambda h: h.pop("checksums")),
     "checksums must list 6 sha256"),
    ("header garbage", lambda p: (p / HEADER_NAME).write_text("{ not json"),
     "not a valid logit-store header"),
    ("old format version", lambda p: _edit_header(p, lambda h: h.update(version=1)),
     "format version 1"),
    ("logits.npy truncated", _truncate, r"logits.npy: it is \d+ bytes but .* need \d+"),
    ("logits.npy magic flipped", _flip_magic, r"logits.npy is not a readable \.npy file"),
    ("inputs.npy missing", lambda p: (p / INPUTS_NAME).unlink(), r"inputs.npy is missing"),
]


@pytest.mark.parametrize("name,damage,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_damaged_store_is_refused_where_it_is_used(tmp_path, name, damage, message):
    path = tmp_path / "s"
    clean = _collect(path).tensor()
    damage(path)
    error = FileNotFoundError if "missing" in name else ValueError
    with pytest.raises(error, match=message):
        LogitStore.open(path)
    with pytest.raises(error, match=message):
        LogitDataset(_data(), path)
    with pytest.raises(error, match=message):  # re-running the collection does not reuse it
        _collect(path)
    repaired = _collect(path, overwrite=True)  # what every message tells the user to do
    assert torch.equal(repaired.tensor(), clean)


def _changed(kind):
    x = _data(1200).tensors[0].clone()
    if kind == "swap":
        x[[500, 700]] = x[[700, 500]]
    elif kind == "shuffle":
        rows = torch.arange(100, 1100)
        x[rows] = x[rows[torch.randperm(1000, generator=torch.Generator().manual_seed(3))]]
    else:  # one middle row +1.0
        x[617] += 1.0
    return TensorDataset(x)


@pytest.mark.parametrize("kind,first", [("swap", 500), ("shuffle", None), ("plus_one", 617)])
def test_changed_swapped_or_shuffled_inputs_are_refused(tmp_path, kind, first):
    store = collect_logits(Teacher(), _data(1200), tmp_path / "s", batch_size=128, progress=False)
    bad = _changed(kind)
    pattern = f"dataset row {first} " if first is not None else r"dataset row 1\d\d "
    with pytest.raises(ValueError, match=pattern):
        LogitStore.open(tmp_path / "s", dataset=bad)
    with pytest.raises(ValueError, match=pattern):
        LogitDataset(bad, store)
    with pytest.raises(ValueError, match=pattern):
        collect_logits(Teacher(), bad, tmp_path / "s", batch_size=128, progress=False)
    LogitStore.open(tmp_path / "s", dataset=_data(1200))  # the right data still opens


def test_sampled_input_check_catches_reorders(tmp_path):
    collect_logits(Teacher(), _data(1200), tmp_path / "s", batch_size=128, progress=False)
    x = _data(1200).tensors[0].clone()
    x[[0, -1]] = x[[-1, 0]]  # the first and last rows are always sampled
    with pytest.raises(ValueError, match="sampled rows differ"):
        LogitStore.open(tmp_path / "s", dataset=TensorDataset(x), check_inputs="sample")
    # a shuffle of 1000 of the 1200 rows cannot hide from ~1000 sampled rows
    with pytest.raises(ValueError, match="sampled rows differ"):
        LogitStore.open(tmp_path / "s", dataset=_changed("shuffle"), check_inputs="sample")
    LogitStore.open(tmp_path / "s", dataset=_data(1200), check_inputs="sample")
    with pytest.raises(ValueError, match="check_inputs"):
        LogitStore.open(tmp_path / "s", dataset=_data(1200), check_inputs="some")


WRITER = textwrap.dedent("""
    import sys, time
    import torch
    from torch.utils.data import TensorDataset
    from mimic_fast.data import collect_logits

    class Slow(torch.nn.Module):
        def __init__(self, shift, delay):
            super().__init__()
            self.b = torch.nn.Parameter(torch.full((4,), float(shift)))
            self.delay = delay

        def forward(self, x):
            time.sleep(self.delay)
            return x[:, :4] + self.b

    x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
    collect_logits(Slow(sys.argv[2], float(sys.argv[3])), TensorDataset(x), sys.argv[1], batch_size=4, chunk_rows=8,
                   progress=False)
""")


def test_second_writer_is_refused_and_a_killed_writers_lock_is_taken_over(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, str(script), str(store), "0", "0.05"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not (store / HEADER_NAME).exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "the writer created no store in 60 s"
            time.sleep(0.01)
        x = torch.randn(200, 6, generator=torch.Generator().manual_seed(1))
        # another teacher (the mixing case) and the same one (the SIGBUS case): both refused
        for shift in (1.0, 0.0):
            teacher = torch.nn.Linear(6, 4)
            with pytest.raises(LockedError, match=f"being written by another process \\(pid {proc.pid}"):
                collect_logits(teacher, TensorDataset(x), store, batch_size=4, chunk_rows=8,
                               progress=False, teacher_id=f"shift {shift}")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # the dead writer's lock is the OS's to drop: the next run takes it over and resumes the store
    rerun = subprocess.run([sys.executable, str(script), str(store), "0", "0"], env=env, capture_output=True,
                           timeout=120)
    assert rerun.returncode == 0, rerun.stderr.decode()
    done = LogitStore.open(store, dataset=TensorDataset(x))
    assert done.complete
    assert torch.equal(done.tensor(), x[:, :4].half().float())


def test_atomic_writes_get_the_mode_open_would_give(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:
            f.write("{}")
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "b.json").st_mode) == 0o644


def test_a_refusal_of_the_teachers_output_names_the_teacher(tmp_path):
    """The fuzz of teacher.pt found 'teacher produced NaN/Inf logits' with no file named: the
    caller's name for the teacher (the CLI: its --teacher files) is in every such refusal."""
    X = torch.randn(40, 5)
    with pytest.raises(ValueError, match=r"^--teacher t\.pt gave NaN/Inf logits for dataset row 0"):
        collect_logits(lambda x: torch.full((len(x), 3), float("nan")), TensorDataset(X),
                       tmp_path / "a", progress=False, teacher_name="--teacher t.pt")
    with pytest.raises(ValueError, match=r"^--teacher t\.pt: its logits for dataset row 0 overflow"):
        collect_logits(lambda x: torch.full((len(x), 3), 1e6), TensorDataset(X), tmp_path / "b",
                       progress=False, teacher_name="--teacher t.pt")
    with pytest.raises(ValueError, match=r"^--teacher t\.pt: its output for dataset\[0\] has shape"):
        collect_logits(lambda x: x[0], TensorDataset(X), tmp_path / "c", progress=False,
                       teacher_name="--teacher t.pt")

