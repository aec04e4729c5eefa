"""Issue 20: a full disk, a file-size limit and an address-space limit are one error line, never a
SIGBUS, an abort or a traceback, and leave the files that were there intact.

Each case runs `mimic-fast` (or the store) in a subprocess under the limit: RLIMIT_FSIZE (with
SIGXFSZ ignored, writes past it fail with EFBIG, as writes to a full disk fail with ENOSPC),
RLIMIT_AS, and a real full file system (a small tmpfs mounted in a private mount namespace with
`unshare`; where that is not allowed, the preallocation that turns the full disk into an OSError is
checked directly).
"""
import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import mimic_fast as mf
from mimic_fast.data import collect_logits
from mimic_fast.data.store import HEADER_NAME
from mimic_fast.files import save_model
from mimic_fast.pipeline import load_data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
DATA = ["--dataset", "digits", "--label-fraction", "0.2"]

LIMITED = textwrap.dedent("""
    import resource, signal, sys
    kind, limit = sys.argv[1], int(sys.argv[2])
    from mimic_fast import cli                      # imports first: the limit is for the command
    if kind != "as-cold":                           # torch.optim's lazy import of torch._dynamo too
        import torch._dynamo
    if kind == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    else:  # "as": this much address space beyond what the process maps now
        size = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (size + limit, size + limit))
    sys.exit(cli.main(sys.argv[3:]))
""")


def _limited(kind, limit, *argv, cwd=None):
    return subprocess.run([sys.executable, "-c", LIMITED, kind, str(limit), *map(str, argv)],
                          capture_output=True, text=True, env=ENV, cwd=cwd, timeout=300)


def _one_line(proc, command):
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert len(err.splitlines()) == 1 and err.startswith(f"mimic-fast {command}: error: "), err
    return err


def test_a_checkpoint_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """torch.save reported the failed write as `RuntimeError: [enforce fail ...] unexpected pos`."""
    out = tmp_path / "t"
    proc = _limited("fsize", 100_000, "train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "256",
                    "--out", out, "--epochs", "1", "--no-progress")
    err = _one_line(proc, "train-teacher")
    assert f"{out / 'checkpoint.pt'}: File too large" in err and "unexpected pos" not in err
    assert not (out / "checkpoint.pt").exists() and not (out / "teacher.pt").exists()
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]  # no temp file left


def test_a_transfer_set_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    teacher = tmp_path / "teacher.pt"
    model = mf.models.build_model("dnn-2k", in_features=64, num_classes=10, hidden=(8,))
    save_model(teacher, model, {"name": "dnn-2k", "kwargs": {"in_features": 64, "num_classes": 10,
                                                             "hidden": [8]}},
               data=load_data("digits", None, 0, 0.2).recipe)
    out = tmp_path / "c"
    proc = _limited("fsize", 100_000, "collect-logits", *DATA, "--teacher", teacher, "--out", out,
                    "--no-progress")
    err = _one_line(proc, "collect-logits")
    assert f"{out / 'transfer.pt'}: File too large" in err
    assert not (out / "transfer.pt").exists()


def _student_file(path, hidden=2048):
    torch.manual_seed(0)
    kw = {"in_features": 64, "num_classes": 10, "hidden": hidden, "bottleneck": 32}
    save_model(path, mf.nn.WideShallowStudent(**kw), {"class": "WideShallowStudent", "kwargs": kw})
    return path


def test_an_export_that_cannot_be_written_keeps_the_old_file(tmp_path):
    """torch-export aborted the process (`terminate called`, rc 134) from torch's zip writer."""
    fmt, name = "torch-export", "s.pt2"
    model = _student_file(tmp_path / "student.pt")
    out = tmp_path / name
    mf.export.export_student(mf.files.load_model(model)[0], out, fmt)
    old = out.read_bytes()
    proc = _limited("fsize", 200_000, "export", "--model", model, "--format", fmt, "--out", out,
                    "--overwrite")
    err = _one_line(proc, "export")
    assert f"{out}: File too large" in err
    assert out.read_bytes() == old  # the old file, whole
    torch.export.load(out)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temp folder left


def test_an_allocation_beyond_the_address_space_is_one_line(tmp_path):
    """The optimizer's or the gradients' allocation failed with a RuntimeError traceback: the model
    (600 MB) fits in the 900 MB allowed, its gradients and momentum do not."""
    out = tmp_path / "d"
    logits = tmp_path / "logits"
    teacher = tmp_path / "teacher"
    from mimic_fast import cli
    assert cli.main(["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "8", "--out", str(teacher),
                     "--epochs", "1", "--no-progress"]) == 0
    assert cli.main(["collect-logits", *DATA, "--teacher", str(teacher / "teacher.pt"), "--out",
                     str(logits), "--no-progress"]) == 0
    proc = _limited("as", 900 * 2**20, "distill", "--dataset", "digits", "--logits", logits,
                    "--hidden", 10_000_000, "--bottleneck", 4, "--out", out, "--epochs", 1,
                    "--no-progress")
    err = _one_line(proc, "distill")
    assert "memory" in err and ("--hidden" in err or "--batch-size" in err)
    assert not (out / "student.pt").exists() and not (out / "checkpoint.pt").exists()
    # torch._dynamo not yet imported when the limit is set: imported after a model that filled the
    # address space (by the optimizer, lazily) it failed as "SystemError: error return without
    # exception set" in 3 of 4 runs; pipeline.build_checked imports it before the model
    for i in range(2):
        proc = _limited("as-cold", 900 * 2**20, "distill", "--dataset", "digits", "--logits",
                        logits, "--hidden", 10_000_000, "--bottleneck", 4, "--out", out / str(i),
                        "--epochs", 1, "--no-progress")
        assert "memory" in _one_line(proc, "distill")


def _unshare_tmpfs():
    try:
        proc = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


FULL_DISK = textwrap.dedent("""
    import errno, os, sys, torch
    from torch.utils.data import TensorDataset
    from mimic_fast.data import collect_logits
    path = sys.argv[1]
    x = torch.randn(20000, 4, generator=torch.Generator().manual_seed(0))
    try:  # 20000 x 100 float16 rows = 4 MB on a 1 MB file system
        collect_logits(torch.nn.Linear(4, 100), TensorDataset(x), path, progress=False)
    except OSError as e:
        print("OSError", errno.errorcode.get(e.errno), e.filename)
        sys.exit(3)
    print("collected")
""")


@pytest.mark.skipif(not shutil.which("unshare") or not _unshare_tmpfs(),
                    reason="no private mount namespace here to mount a small tmpfs in (the "
                           "preallocation itself is tested below)")
def test_a_full_disk_while_collecting_is_an_oserror_not_a_sigbus(tmp_path):
    """Rows written through a memmap of a sparse file died with SIGBUS (rc 135, no message) when the
    file system filled up; the store's rows are now allocated when its files are created."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (tmp_path / "full.py").write_text(FULL_DISK)
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && {sys.executable} {tmp_path / 'full.py'} "
              f"{mnt / 'store'}; rc=$?; ls -a {mnt / 'store'}; exit $rc")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                          env=ENV, timeout=300)
    assert proc.returncode == 3, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "OSError ENOSPC" in proc.stdout and str(mnt / "store" / "logits.npy") in proc.stdout
    listed = proc.stdout.split()
    assert HEADER_NAME not in listed and not [n for n in listed if n.endswith(".tmp")]


def test_the_store_allocates_its_rows_when_it_creates_its_files(tmp_path, monkeypatch):
    """The same promise wherever the tmpfs cannot be mounted: the rows' space is reserved with
    posix_fallocate before any row is written, and its ENOSPC propagates as an OSError naming the
    file, leaving no header (the store was never created)."""
    calls = []
    real = os.posix_fallocate

    def fallocate(fd, offset, size):
        calls.append(size)
        if size > 100_000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, size)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    x = torch.randn(300, 4)
    store = collect_logits(torch.nn.Linear(4, 10), torch.utils.data.TensorDataset(x),
                           tmp_path / "small", progress=False)
    assert calls == [300 * 10 * 2, 300 * 8]  # logits (float16) and input digests, allocated
    assert store.complete
    with pytest.raises(OSError) as e:
        collect_logits(torch.nn.Linear(4, 100), torch.utils.data.TensorDataset(torch.randn(2000, 4)),
                       tmp_path / "big", progress=False)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "big" / "logits.npy")
    assert not (tmp_path / "big" / HEADER_NAME).exists()
    assert not [n for n in os.listdir(tmp_path / "big") if n.endswith(".tmp")]


def test_an_overwrite_needs_no_room_for_two_stores(tmp_path, monkeypatch):
    """A disk that holds one store holds its replacement: the old rows (unreachable once the header
    is gone) are removed before the new ones are allocated."""
    store_dir = tmp_path / "store"
    x = torch.randn(300, 4)
    collect_logits(torch.nn.Linear(4, 10), torch.utils.data.TensorDataset(x), store_dir,
                   progress=False)
    real = os.posix_fallocate

    def used():
        return sum(f.stat().st_size for f in store_dir.iterdir() if f.is_file())
    capacity = used() + 1024  # a disk with room for one store (and its small files)

    def fallocate(fd, offset, size):
        if used() + size > capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, offset, size)
    monkeypatch.setattr(os, "posix_fallocate", fallocate)
    torch.manual_seed(1)
    store = collect_logits(torch.nn.Linear(4, 10), torch.utils.data.TensorDataset(x), store_dir,
                           progress=False, overwrite=True)
    assert store.complete and len(store) == 300


def test_a_model_too_large_to_build_is_not_called_a_damaged_file(tmp_path, monkeypatch):
    """load_model turns a file whose spec cannot be rebuilt into a one-line ValueError; a failed
    allocation into one naming the file as too large for memory (not as damaged: the fuzz found it
    worded without the file); a bug in a model class keeps its traceback."""
    from mimic_fast import files

    path = tmp_path / "m.pt"
    files.save_model(path, torch.nn.Linear(2, 2), {"name": "dnn", "kwargs": {}})
    for error, expected in ((MemoryError(), ValueError),
                            (RuntimeError("DefaultCPUAllocator: can't allocate memory"), ValueError),
                            (AttributeError("a bug in a model class"), AttributeError),
                            (TypeError("unexpected keyword 'x'"), ValueError)):
        def build(spec, error=error):
            raise error
        monkeypatch.setattr(files, "build_from_spec", build)
        with pytest.raises(expected) as e:
            files.load_model(str(path))
        if isinstance(error, TypeError):
            assert "cannot be rebuilt from its spec (TypeError: unexpected keyword 'x')" in str(e.value)
        elif expected is ValueError:
            assert str(e.value).startswith(f"the model in {path} does not fit in memory") and \
                "cannot be rebuilt" not in str(e.value)


def test_a_write_error_names_the_file_it_is_about(tmp_path):
    """atomic_write_bytes names the target for its temp file's errors, leaves an error about another
    file (one the writer reads) naming that file, and never prints '[Errno None]'."""
    from mimic_fast._io import atomic_write_bytes

    target, missing = tmp_path / "out.bin", tmp_path / "nowhere" / "in.bin"

    def reads_a_missing_file(f):
        f.write(open(missing, "rb").read())
    with pytest.raises(FileNotFoundError) as e:
        atomic_write_bytes(target, reads_a_missing_file)
    assert e.value.filename == str(missing) and not target.exists()

    def full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, full)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(target)

    def plain(f):
        raise OSError("the device went away")
    with pytest.raises(OSError) as e:
        atomic_write_bytes(target, plain)
    assert str(e.value) == f"{target}: the device went away" and "Errno None" not in str(e.value)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]
