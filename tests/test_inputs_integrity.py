"""Nothing served wrong, nothing run from a file (issue 19): readers hold the store, runs bind to
their exact inputs, no write lands through a link or over an input, every file of ours is verified
and loaded without pickle. One test per reproduction of the issue, each refused or made impossible."""
import fcntl
import os
import shutil
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

from mimic_fast import cli
from mimic_fast import train as T
from mimic_fast._io import LOCK_NAME, LockedError, reader_lock, writer_lock
from mimic_fast.data import LogitDataset, LogitStore, collect_logits, teacher_fingerprint
from mimic_fast.data.datasets import load_dataset
from mimic_fast.data.identity import content_digest
from mimic_fast.files import (load_checkpoint, load_model, load_transfer, read_json, save_model,
                              write_json)
from mimic_fast.models import DNN
from mimic_fast.nn import WideShallowStudent

REPO = str(Path(__file__).resolve().parents[1])
DATA = ["--dataset", "digits", "--label-fraction", "0.2"]
FAST = ["--epochs", "1", "--no-progress"]
ENV = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
       "OMP_NUM_THREADS": "1"}


def _run(capsys, *argv):
    """(exit code, stderr) of one command; it printed no traceback."""
    code = cli.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


def _one_error(err, command, *says):
    line = "\n".join(x for x in err.strip().splitlines() if ": warning: " not in x.lower())
    assert line.startswith(f"mimic-fast {command}: error: ") and len(line.splitlines()) == 1, err
    for s in says:
        assert s in line, (s, line)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Two tiny teachers (split seed 0, 20% labelled) and the first one's logits."""
    root = tmp_path_factory.mktemp("inputs")
    for name, seed in (("t1", 0), ("t2", 1)):
        assert cli.main(["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "16", "--out",
                         str(root / name), "--batch-size", "64", "--seed", str(seed), *FAST]) == 0
    assert cli.main(["collect-logits", *DATA, "--teacher", str(root / "t1" / "teacher.pt"),
                     "--out", str(root / "L"), "--dtype", "float32", "--no-progress"]) == 0
    return root


def _copy_logits(made, dest):
    shutil.copytree(made / "L", dest)
    return dest


def _collect(made, out, teacher="t2", *extra):
    return ["collect-logits", *DATA, "--teacher", made / teacher / "teacher.pt", "--out", out,
            "--dtype", "float32", "--no-progress", *extra]


def _distill(logits, out, *extra):
    return ["distill", "--dataset", "digits", "--logits", logits, "--hidden", "16", "--bottleneck",
            "4", "--out", out, "--batch-size", "128", "--no-progress", "--schedule", "none", *extra]


def _digest(folder):
    return LogitStore.open(Path(folder) / "logits").digest


# ---------------------------------------------------------------------------------------------
# 1. a running distill cannot be switched to another teacher's logits
# ---------------------------------------------------------------------------------------------
def test_collect_overwrite_is_refused_while_distill_reads_then_waits_for_it(made, tmp_path, capsys):
    logits = _copy_logits(made, tmp_path / "L")
    before, transfer_bytes = _digest(logits), (logits / "transfer.pt").read_bytes()
    student = tmp_path / "S"
    proc = subprocess.Popen([sys.executable, "-m", "mimic_fast", *map(str, _distill(
        logits, student, "--epochs", "12"))], env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT)
    try:
        holder = logits / "logits" / f"{LOCK_NAME}.{proc.pid}"  # distill holds the store shared
        deadline = time.monotonic() + 120
        while not holder.exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline, "distill took no reader lock in 120 s"
            time.sleep(0.02)
        code, err = _run(capsys, *_collect(made, logits, "t2", "--overwrite"))
        _one_error(err, "collect-logits", f"is being read by pid {proc.pid}", "--wait")
        assert code == 2 and _digest(logits) == before  # nothing written: store and transfer.pt
        assert (logits / "transfer.pt").read_bytes() == transfer_bytes
        assert proc.poll() is None  # refused while distill was still reading
        # --wait: the overwrite waits for the reader, then goes ahead
        code, err = _run(capsys, *_collect(made, logits, "t2", "--overwrite", "--wait"))
        assert code == 0, err
        assert proc.wait(timeout=120) == 0, proc.stdout.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = _digest(logits)
    assert after != before
    _, payload = load_model(student / "student.pt")  # it trained on the old store, all of it
    assert payload["inputs"]["logit_store"] == before and len(payload["history"]) == 12


def test_a_logit_dataset_holds_the_store_until_closed_also_across_dataloader_workers(tmp_path):
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(0))
    store = collect_logits(torch.nn.Linear(6, 3), TensorDataset(x), tmp_path / "s", batch_size=16,
                           progress=False)
    lock_file = tmp_path / "s" / LOCK_NAME

    def a_writer_may_lock():  # another open file description: flock conflicts as between processes
        fd = os.open(lock_file, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    dataset = LogitDataset(TensorDataset(x), store)
    assert not a_writer_may_lock()
    with pytest.raises(LockedError, match=f"being read by this process \\(pid {os.getpid()}\\)"):
        collect_logits(torch.nn.Linear(6, 3), TensorDataset(x), tmp_path / "s", overwrite=True,
                       progress=False)
    # forked DataLoader workers inherit the descriptor; their exit must not drop the lock
    T.distill(torch.nn.Linear(6, 3), dataset, epochs=1, batch_size=16, num_workers=2,
              progress=False)
    assert not a_writer_may_lock()
    dataset.close()
    assert a_writer_may_lock()
    with pytest.raises(ValueError, match="closed"):
        dataset[0]
    with LogitDataset(TensorDataset(x), tmp_path / "s") as again:
        assert not a_writer_may_lock() and again.identity == {"logit_store": store.digest}
    assert a_writer_may_lock()


def test_a_store_rewritten_after_it_was_opened_is_refused_by_its_readers(tmp_path):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(0))
    opened = collect_logits(torch.nn.Linear(6, 3), TensorDataset(x), tmp_path / "s", progress=False)
    row5 = opened[5].clone()
    collect_logits(torch.nn.Linear(6, 3), TensorDataset(x), tmp_path / "s", overwrite=True,
                   progress=False)
    assert torch.equal(opened[5], row5)  # new files renamed into place: the old mapping is intact
    with pytest.raises(ValueError, match="changed since it was opened"):
        LogitDataset(TensorDataset(x), opened)
    import pickle  # a spawned DataLoader worker reopens the store by path
    with pytest.raises(ValueError, match="changed since it was opened"):
        pickle.loads(pickle.dumps(opened)).logits


def test_reader_and_writer_locks_between_processes(tmp_path):
    holder = textwrap.dedent("""
        import os, sys, time
        from mimic_fast._io import reader_lock, writer_lock
        lock = (writer_lock if sys.argv[2] == "write" else reader_lock)(sys.argv[1], "store")
        with lock:
            open(sys.argv[1] + ".busy", "w").close()
            print("held", flush=True)
            time.sleep(float(sys.argv[3]))
            os.remove(sys.argv[1] + ".busy")  # the last thing it does while it holds the lock
    """)
    script = tmp_path / "holder.py"
    script.write_text(holder)
    folder = tmp_path / "f"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "read", "60"], env=ENV,
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with reader_lock(folder, "store"):  # readers share
            pass
        with pytest.raises(LockedError, match=f"store {folder} is being read by pid {proc.pid}"):
            writer_lock(folder, "store").acquire()
        proc.send_signal(signal.SIGKILL)  # the OS drops a killed reader's lock
        proc.wait()
        with writer_lock(folder, "store", wait=True):
            assert sorted(os.listdir(folder)) == [LOCK_NAME, f"{LOCK_NAME}.{os.getpid()}"]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    proc = subprocess.Popen([sys.executable, str(script), str(folder), "write", "1.5"], env=ENV,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline() == b"held\n"
    with pytest.raises(LockedError, match=f"being written by another process \\(pid {proc.pid}"):
        reader_lock(folder, "store").acquire()
    with reader_lock(folder, "store", wait=True):  # waits for the writer
        assert not os.path.exists(f"{folder}.busy")
    proc.wait()


# ---------------------------------------------------------------------------------------------
# 2. a resume is bound to the exact store and transfer set it trained on
# ---------------------------------------------------------------------------------------------
def test_resume_after_recollect_or_a_rebuilt_transfer_set_is_refused_naming_both(made, tmp_path,
                                                                                 capsys):
    logits = _copy_logits(made, tmp_path / "L")
    old = _digest(logits)
    old_transfer = load_transfer(logits / "transfer.pt", "")[1].get("transfer_sha256")
    student = tmp_path / "S"
    assert _run(capsys, *_distill(logits, student, "--epochs", "1"))[0] == 0
    assert _run(capsys, *_collect(made, logits, "t2", "--overwrite"))[0] == 0  # another teacher
    new = _digest(logits)
    code, err = _run(capsys, *_distill(logits, student, "--epochs", "2", "--resume"))
    _one_error(err, "distill", f"logit store sha256 {old}", f"logit store sha256 {new}",
               "collected or built again")
    assert code == 2 and len(load_checkpoint(student / T.CHECKPOINT, "distill")["history"]) == 1
    # the same teacher over a rebuilt transfer set (other generated rows)
    assert _run(capsys, *_collect(made, logits, "t1", "--overwrite", "--n-generated", "20",
                                  "--method", "noise"))[0] == 0
    rebuilt = load_transfer(logits / "transfer.pt", "")[1]["transfer_sha256"]
    code, err = _run(capsys, *_distill(logits, student, "--epochs", "2", "--resume"))
    assert code == 2 and f"transfer set sha256 {old_transfer}" in err
    assert f"transfer set sha256 {rebuilt}" in err
    # the store recollected bit for bit by the first teacher over the first rows: the same inputs
    assert _run(capsys, *_collect(made, logits, "t1", "--overwrite"))[0] == 0
    assert _digest(logits) == old
    assert _run(capsys, *_distill(logits, student, "--epochs", "2", "--resume"))[0] == 0


# ---------------------------------------------------------------------------------------------
# 3. never write through links
# ---------------------------------------------------------------------------------------------
def test_overwrite_refuses_symlinked_files_and_leaves_their_targets_intact(made, tmp_path, capsys):
    orig = _copy_logits(made, tmp_path / "orig")
    saved = {p.name: p.read_bytes() for p in (orig / "logits").iterdir() if p.is_file()}
    ln = tmp_path / "ln"
    (ln / "logits").mkdir(parents=True)
    shutil.copy(orig / "transfer.pt", ln / "transfer.pt")
    shutil.copy(orig / "logits" / "header.json", ln / "logits" / "header.json")
    for name in ("logits.npy", "inputs.npy"):
        (ln / "logits" / name).symlink_to(orig / "logits" / name)
    code, err = _run(capsys, *_collect(made, ln, "t2", "--overwrite"))
    _one_error(err, "collect-logits", f"{ln / 'logits' / 'logits.npy'} is a symbolic link")
    assert code == 2 and (ln / "transfer.pt").read_bytes() == (orig / "transfer.pt").read_bytes()
    assert {p.name: p.read_bytes() for p in (orig / "logits").iterdir() if p.is_file()} == saved
    LogitStore.open(orig / "logits")  # verified
    # a whole linked logits folder, and a linked checkpoint of a run folder, likewise
    (ln / "logits").rename(tmp_path / "gone")
    (ln / "logits").symlink_to(orig / "logits")
    code, err = _run(capsys, *_collect(made, ln, "t2", "--overwrite"))
    _one_error(err, "collect-logits", f"{ln / 'logits'} is a symbolic link")
    run = tmp_path / "run"
    run.mkdir()
    (run / T.CHECKPOINT).symlink_to(made / "t1" / "teacher.pt")
    code, err = _run(capsys, *_distill(orig, run, "--epochs", "1"))
    _one_error(err, "distill", f"{run / T.CHECKPOINT} is a symbolic link")
    assert load_model(made / "t1" / "teacher.pt")  # the link's target is untouched


# ---------------------------------------------------------------------------------------------
# 4. export never over its input, never torn
# ---------------------------------------------------------------------------------------------
def test_export_refuses_its_model_and_existing_files_and_a_killed_export_keeps_the_old(
        made, tmp_path, capsys):
    model = made / "t1" / "teacher.pt"
    good = model.read_bytes()
    for extra in ([], ["--overwrite"]):  # (refused before onnx is needed)
        code, err = _run(capsys, "export", "--model", model, "--format", "onnx", "--out", model,
                         *extra)
        _one_error(err, "export", "is the --model file itself")
    link = tmp_path / "link.pt2"  # the model behind another name is still the model
    link.symlink_to(model)
    _one_error(_run(capsys, "export", "--model", model, "--format", "torch-export", "--out", link,
                    "--overwrite")[1], "export", "is the --model file itself")
    assert model.read_bytes() == good
    out = tmp_path / "s.pt2"
    argv = ["export", "--model", model, "--format", "torch-export", "--out", out]
    assert _run(capsys, *argv)[0] == 0
    first = out.read_bytes()
    _one_error(_run(capsys, *argv)[1], "export", f"--out {out} exists", "--overwrite")
    assert _run(capsys, *argv, "--overwrite")[0] == 0
    # a re-export killed while it writes: the old file stays whole, the temp folder is cleaned
    # up by the next write
    killed = textwrap.dedent("""
        import os, sys, time, torch
        def stuck(program, f, *a, **k):
            (f if hasattr(f, "write") else open(f, "wb")).write(b"half a zip")
            print("writing", flush=True)
            time.sleep(60)
        torch.export.save = stuck
        from mimic_fast import cli
        cli.main(sys.argv[1:])
    """)
    (tmp_path / "killed.py").write_text(killed)
    proc = subprocess.Popen([sys.executable, str(tmp_path / "killed.py"), *map(str, argv),
                             "--overwrite"], env=ENV, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"writing\n"
    finally:
        proc.kill()
        proc.wait()
    assert out.read_bytes() == first or torch.export.load(out)  # old (or an earlier good) export
    torch.export.load(out)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.pt2.")]  # the orphan
    assert _run(capsys, *argv, "--overwrite")[0] == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".s.pt2.")]


# ---------------------------------------------------------------------------------------------
# 5. every file of ours is verified before use; a user's teacher file is known by its sha256
# ---------------------------------------------------------------------------------------------
def _tensor_offsets(path):
    """Byte offsets in the middle of each tensor record of a torch zip (/data/<n> members)."""
    import zipfile

    out = []
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in z.infolist():
            if "/data/" in info.filename and info.file_size:
                f.seek(info.header_offset + 26)
                n, m = np.frombuffer(f.read(4), np.uint16)
                out.append(info.header_offset + 30 + int(n) + int(m) + info.file_size // 2)
    return out


def test_a_flipped_bit_in_any_file_of_ours_is_refused_naming_it(made, tmp_path, capsys):
    logits = _copy_logits(made, tmp_path / "L")
    student = tmp_path / "S"
    assert _run(capsys, *_distill(logits, student, "--epochs", "1"))[0] == 0
    files = {logits / "transfer.pt": lambda p: load_transfer(p, "rebuild it"),
             student / T.CHECKPOINT: lambda p: load_checkpoint(p, "distill"),
             student / "student.pt": load_model,
             made / "t1" / "teacher.pt": load_model}
    for path, load in files.items():
        good = path.read_bytes()
        offsets = _tensor_offsets(path)
        assert offsets
        for pos in offsets + [len(good) // 3, len(good) // 2]:
            damaged = tmp_path / "damaged.pt"
            raw = bytearray(good)
            raw[pos] ^= 0x10
            damaged.write_bytes(bytes(raw))
            try:
                load(damaged)
            except ValueError as e:
                assert str(damaged) in str(e) and "\n" not in str(e)
            else:  # it loaded: then only as the very same content (a byte nothing reads)
                assert pos not in offsets
    # as the CLI meets it: one line naming the file
    raw = bytearray((logits / "transfer.pt").read_bytes())
    raw[_tensor_offsets(logits / "transfer.pt")[0]] ^= 0x01
    (logits / "transfer.pt").write_bytes(bytes(raw))
    code, err = _run(capsys, *_distill(logits, tmp_path / "S2", "--epochs", "1"))
    _one_error(err, "distill", f"{logits / 'transfer.pt'} is damaged", "collect-logits")
    # a sweep's JSON file: one changed digit
    path = tmp_path / "result.json"
    write_json(path, {"format": "x", "test_accuracy": 0.9375})
    path.write_text(path.read_text().replace("0.9375", "0.9376"))
    with pytest.raises(ValueError, match=f"{path} is damaged"):
        read_json(path, "delete it")


class _Scaled(torch.nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.lin = torch.nn.Linear(64, 10)
        torch.nn.init.normal_(self.lin.weight, generator=torch.Generator().manual_seed(0))
        self.scale = scale  # a TorchScript constant: no parameter, no buffer

    def forward(self, x):
        return self.lin(x) * self.scale


def test_a_changed_user_teacher_file_is_noticed_when_its_store_is_reused(tmp_path, capsys):
    teacher = tmp_path / "teacher.ts"
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_Scaled(1.0)), teacher)
    argv = ["collect-logits", *DATA, "--teacher", teacher, "--out", tmp_path / "L", "--no-progress"]
    assert _run(capsys, *argv)[0] == 0
    assert _run(capsys, *argv)[0] == 0  # the same file: reused
    # the same weights, an output 0.05 % larger: under the rerun rows' tolerance, not the same file
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(_Scaled(1.0005)), teacher)
    code, err = _run(capsys, *argv)
    _one_error(err, "collect-logits", "was made with teacher", "teacher files sha256")
    assert code == 2


# ---------------------------------------------------------------------------------------------
# 6. the teacher fingerprint covers every weight
# ---------------------------------------------------------------------------------------------
def test_a_teacher_changed_below_the_old_fingerprint_is_refused(tmp_path):
    torch.manual_seed(0)
    teacher = DNN(8, 3, hidden=(128,))
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(1))
    x[::2, 5] = 0.0  # pixel 5 is off in the rows a reuse reruns (0, 66, 133, 199 -> even ones)
    x[199, 5] = x[133, 5] = 0.0
    store = collect_logits(teacher, TensorDataset(x), tmp_path / "s", progress=False,
                           dtype=torch.float32)
    changed = DNN(8, 3, hidden=(128,))
    changed.load_state_dict(teacher.state_dict())
    # (128, 8): its first 16 values are hidden units 0 and 1; reversing input 5's weights over
    # units 2..127 keeps every tensor's sum and first 16 values (the old fingerprint)
    first = next(changed.parameters())
    with torch.no_grad():
        first[2:, 5] = first[2:, 5].flip(0)
    assert teacher_fingerprint(changed) != teacher_fingerprint(teacher)
    with torch.no_grad():
        differ = (changed.eval()(x) - store.tensor()).abs().amax(1) > 1e-3
    assert differ.sum() > 20  # another teacher for many rows
    with pytest.raises(ValueError, match="was made with teacher"):
        collect_logits(changed, TensorDataset(x), tmp_path / "s", progress=False,
                       dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# 7. no file of ours runs code when loaded; CIFAR batches are unpickled restrictively
# ---------------------------------------------------------------------------------------------
class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file when unpickled


def _plant(path, marker):
    payload = torch.load(path, weights_only=False)
    torch.save({**payload, "extra": _Payload(marker)}, path)


def test_pickle_payloads_in_our_files_are_refused_without_running(made, tmp_path, capsys):
    logits = _copy_logits(made, tmp_path / "L")
    student = tmp_path / "S"
    assert _run(capsys, *_distill(logits, student, "--epochs", "1"))[0] == 0
    teacher = tmp_path / "teacher.pt"
    shutil.copy(made / "t1" / "teacher.pt", teacher)
    marker = tmp_path / "ran"
    cases = [(logits / "transfer.pt", "distill", _distill(logits, tmp_path / "S2", "--epochs", "1")),
             (student / T.CHECKPOINT, "distill", _distill(logits, student, "--epochs", "2",
                                                            "--resume")),
             (student / "student.pt", "export", ["export", "--model", student / "student.pt",
                                                 "--format", "torch-export",
                                                 "--out", tmp_path / "s.pt2"]),
             (teacher, "collect-logits", ["collect-logits", *DATA, "--teacher", teacher, "--out",
                                          tmp_path / "L2", "--no-progress"]),
             (teacher, "sweep", ["sweep", "--out", tmp_path / "sw", "--teacher", teacher,
                                 "--hidden", "8", "--seeds", "1", "--epochs", "1",
                                 "--no-progress"])]
    for path, command, argv in cases:
        good = path.read_bytes()
        _plant(path, marker)
        code, err = _run(capsys, *argv)
        _one_error(err, command, str(path))
        assert code == 2 and not marker.exists(), (command, err)
        path.write_bytes(good)
    # CIFAR's python batches: only what the format holds is ever built
    root = tmp_path / "cifar"
    root.mkdir()
    rng = np.random.default_rng(0)
    import pickle
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 2]}
        if name == "data_batch_1":
            batch[b"extra"] = _Payload(marker)
        (root / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(ValueError, match="data_batch_1 is not a CIFAR-10 python batch.*refers to io.open"):
        load_dataset("cifar10", root=root)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# format versions and the digest itself
# ---------------------------------------------------------------------------------------------
def test_files_of_the_previous_format_are_refused_naming_version_and_remedy(tmp_path):
    kwargs = {"in_features": 4, "num_classes": 2, "hidden": 3, "bottleneck": 2}
    model = WideShallowStudent(**kwargs)
    old = {"format": "mimic_fast.model/1", "spec": {"class": "WideShallowStudent", "kwargs": kwargs},
           "state_dict": model.state_dict()}
    torch.save(old, tmp_path / "teacher.pt")
    with pytest.raises(ValueError, match="format mimic_fast.model/1.*reads mimic_fast.model/2.*"
                                         "train it again"):
        load_model(tmp_path / "teacher.pt")
    # an older checkpoint (numpy RNG arrays: not loadable without pickle) says the same
    torch.save({"format": "mimic_fast.checkpoint/1", "rng": [np.zeros(3)]}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="format mimic_fast.checkpoint/1.*delete it"):
        load_checkpoint(tmp_path / "c.pt", "distill")
    save_model(tmp_path / "new.pt", model, {"class": "x"})
    assert torch.load(tmp_path / "new.pt", weights_only=True)["format"] == "mimic_fast.model/2"


def test_content_digest_tells_every_kind_and_value_apart():
    trees = [1, 1.0, True, "1", b"1", [1], (1,), {"a": 1}, {1: "a"}, None, torch.tensor(1),
             torch.tensor(1.0), torch.tensor([1]), torch.tensor(1, dtype=torch.int32),
             [[1], 2], [1, [2]], {"a": 1, "b": 2}, {"b": 2, "a": 1}, torch.zeros(2, 3),
             torch.zeros(3, 2), torch.tensor(1.0, dtype=torch.bfloat16)]
    digests = [content_digest(t) for t in trees]
    assert len(set(digests)) == len(trees)
    assert content_digest({"x": torch.arange(4.0)[::2]}) == content_digest({"x": torch.tensor(
        [0.0, 2.0])})  # the values, not the storage
    with pytest.raises(TypeError, match="cannot digest a ndarray"):
        content_digest(np.zeros(2))
