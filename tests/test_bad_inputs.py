"""Issue 20: every bad input a newcomer's trial found is one line on stderr, `mimic-fast <cmd>:
error: ...`, exit 2, and nothing written.

One table: each case makes its bad file(s) in a fresh folder, runs the command in-process, and
asserts the exit status, that stderr is exactly one line starting with the command's prefix (no
traceback), that no warning a plain `python` run would print was raised, that the text says what
the case needs it to say, and that no file anywhere under the case's folder was created, changed
or removed by the command (the output folders it names do not even exist afterwards).
"""
import errno
import io
import json
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mimic_fast import cli, sweep
from mimic_fast.data.identity import content_digest
from mimic_fast.files import DIGEST_KEY, _save, load_transfer, read_json, write_json

DATA = ["--dataset", "digits", "--label-fraction", "0.2"]
FAST = ["--epochs", "1", "--no-progress"]
# warnings a plain `python` run shows (its default filters hide the others)
HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """A tiny teacher, its logits, a student and a one-point sweep, made once for the table."""
    root = tmp_path_factory.mktemp("made")
    teacher, logits, student = (str(root / n) for n in ("teacher", "logits", "student"))
    assert cli.main(["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "16", "--out", teacher,
                     "--batch-size", "64", *FAST]) == 0
    assert cli.main(["collect-logits", *DATA, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--out", logits, "--dtype", "float32", "--no-progress"]) == 0
    assert cli.main(["distill", "--dataset", "digits", "--logits", logits, "--hidden", "16",
                     "--bottleneck", "4", "--out", student, *FAST]) == 0
    cfg = sweep.SweepConfig(teacher=(os.path.join(teacher, "teacher.pt"),), hidden=(8,), seeds=1,
                            epochs=1, n_generated=0, throughput_time=0.01, throughput_batches=(1,))
    sweep.run(cfg, str(root / "sweep"), progress=False, log=lambda *a: None)
    return root


class Case:
    """The bad input of one case, made under `tmp` from the module's files in `made`."""

    def __init__(self, made, tmp):
        self.made, self.tmp = made, tmp
        self.teacher = str(made / "teacher" / "teacher.pt")
        self.student = str(made / "student" / "student.pt")

    def path(self, name):
        return str(self.tmp / name)

    def copy(self, name):
        """A copy of one of the module's folders (logits, student, sweep) under tmp."""
        shutil.copytree(self.made / name, self.tmp / name)
        return str(self.tmp / name)

    def npz(self, name, **arrays):
        np.savez(self.tmp / name, **arrays)
        return str(self.tmp / name)

    def distill(self, logits, *extra):
        return ["distill", "--dataset", "digits", "--logits", logits, "--hidden", "16",
                "--bottleneck", "4", "--out", self.path("out"), *FAST, *extra]

    def train_npz(self, path):
        return ["train-teacher", "--dataset", "npz", "--data", path, "--model", "dnn-2k",
                "--hidden", "4", "--out", self.path("out"), *FAST]


def _xy(n=60, d=5):
    r = np.random.default_rng(0)
    X = r.normal(size=(n, d)).astype(np.float32)
    return X, (X[:, 0] > 0).astype(np.int64)


def _member(array):
    b = io.BytesIO()
    np.lib.format.write_array(b, array, allow_pickle=True)
    return b.getvalue()


def _raw_npz(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return str(path)


# ----------------------------------------------------------------------------------------------
# the cases: name -> (command, what the error line must say, function making the argv)
# ----------------------------------------------------------------------------------------------
CASES = {}


def case(name, command, *says):
    def deco(make):
        CASES[name] = (command, says, make)
        return make
    return deco


@case("npz truncated", "train-teacher", "is not a readable .npz file", "BadZipFile")
def _(c):
    good = Path(c.npz("good.npz", X=_xy()[0], y=_xy()[1]))
    raw = good.read_bytes()
    good.write_bytes(raw[: len(raw) // 2])
    return c.train_npz(str(good))


@case("npz with a bad CRC", "train-teacher", "member X is not a readable array", "Bad CRC-32")
def _(c):
    p = Path(c.npz("crc.npz", X=_xy()[0], y=_xy()[1]))
    raw = bytearray(p.read_bytes())
    raw[200] ^= 0xFF  # inside X's data
    p.write_bytes(bytes(raw))
    return c.train_npz(str(p))


@case("npz of 0 bytes", "train-teacher", "is not a readable .npz file", "EOFError")
def _(c):
    (c.tmp / "zero.npz").write_bytes(b"")
    return c.train_npz(c.path("zero.npz"))


@case("npz with an empty test split", "train-teacher", "X_test must be a numeric array (N, D...) with "
      "N, D >= 1, got (0, 5)")
def _(c):
    X, y = _xy()
    return c.train_npz(c.npz("e.npz", X=X, y=y, X_test=X[:0], y_test=y[:0]))


@case("npz with garbage members", "train-teacher", "member", "is not a readable array")
def _(c):
    return c.train_npz(_raw_npz(c.tmp / "g.npz", {"X.npy": b"garbage", "y.npy": b"\x93NUMPY junk"}))


@case("npz with an object array names the file", "train-teacher", "o.npz: member X is not a "
      "readable array", "Object arrays cannot be loaded")
def _(c):
    X, y = _xy()
    return c.train_npz(_raw_npz(c.tmp / "o.npz", {"X.npy": _member(X.astype(object)),
                                                  "y.npy": _member(y)}))


@case("npz with a huge .npy header names the file", "train-teacher", "h.npz: member X is not a "
      "readable array", "Header info length")
def _(c):
    X, y = _xy()
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (60, 5), }".ljust(199_999) + b"\n"
    big = b"\x93NUMPY\x02\x00" + len(header).to_bytes(4, "little") + header + X.tobytes()
    return c.train_npz(_raw_npz(c.tmp / "h.npz", {"X.npy": big, "y.npy": _member(y)}))


@case("npz labels that are ids, not indices", "train-teacher", "labels must be class indices 0..C-1")
def _(c):
    X, y = _xy()
    return c.train_npz(c.npz("ids.npz", X=X, y=y * 10**12))


@case("import-logits of a 0-byte .npy", "import-logits", "is not a readable .npy file", "EOFError")
def _(c):
    (c.tmp / "z.npy").write_bytes(b"")
    return ["import-logits", *DATA, "--logits", c.path("z.npy"), "--out", c.path("out")]


@case("import-logits of an .npz", "import-logits", "is an .npz archive (arrays ['X', 'y'])")
def _(c):
    return ["import-logits", *DATA, "--logits", c.npz("l.npz", X=_xy()[0], y=_xy()[1]),
            "--out", c.path("out")]


@case("import-logits of a longdouble .npy leaves no transfer.pt", "import-logits",
      "holds float128: expected float16, float32 or float64")
def _(c):
    np.save(c.tmp / "ld.npy", np.zeros((1437, 10), np.longdouble))
    return ["import-logits", *DATA, "--logits", c.path("ld.npy"), "--out", c.path("out")]


@case("import-logits of 1e39 as float32 does not advise float32", "import-logits",
      "row 0 holds |logit| 1e+39, more than float32 can store", "not a teacher's scores")
def _(c):
    np.save(c.tmp / "big.npy", np.full((1437, 10), 1e39))
    return ["import-logits", *DATA, "--logits", c.path("big.npy"), "--dtype", "float32",
            "--out", c.path("out")]


@case("import-logits over a stopped import says incomplete and how to go on", "import-logits",
      "(incomplete (0 of 1437 rows", "rerun with --overwrite to replace it")
def _(c):
    logits = c.copy("logits")
    p = Path(logits) / "logits" / "header.json"
    h = json.loads(p.read_text())
    h.update(committed=0, complete=False, checksums=[], input_checksums=[])
    p.write_text(json.dumps(h))  # what an import stopped before its first chunk leaves
    np.save(c.tmp / "l.npy", np.zeros((1437, 10), np.float32))
    return ["import-logits", *DATA, "--logits", c.path("l.npy"), "--out", logits]


@case("import-logits over a store whose rows' file is gone says it exists (damaged)", "import-logits",
      "a logit store exists at", "(damaged); rerun with --overwrite to replace it")
def _(c):
    logits = c.copy("logits")
    os.remove(Path(logits) / "logits" / "logits.npy")
    np.save(c.tmp / "l.npy", np.zeros((1437, 10), np.float32))
    return ["import-logits", *DATA, "--logits", c.path("l.npy"), "--out", logits]


@case("distill on an incomplete store says how to finish it", "distill",
      "is incomplete: 0 of 1437 rows committed; run the same `mimic-fast collect-logits` command "
      "again to resume it")
def _(c):
    logits = c.copy("logits")
    p = Path(logits) / "logits" / "header.json"
    h = json.loads(p.read_text())
    h.update(committed=0, complete=False, checksums=[], input_checksums=[])
    p.write_text(json.dumps(h))
    return c.distill(logits)


@case("distill on a header with n = 10**400", "distill", "header.json is not a valid logit-store "
      "header: n must be an int in [1, 2**63)")
def _(c):
    logits = c.copy("logits")
    p = Path(logits) / "logits" / "header.json"
    h = json.loads(p.read_text())
    p.write_text(json.dumps(h).replace(f'"n": {h["n"]}', '"n": 1' + "0" * 400))
    return c.distill(logits)


def _transfer_with(c, change):
    logits = c.copy("logits")
    _, payload = load_transfer(Path(logits) / "transfer.pt", "")
    payload = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in payload.items()}
    change(payload)
    _save(payload, Path(logits) / "transfer.pt")  # consistent with its own sha256
    return logits


@case("distill on a transfer.pt without x", "distill", "transfer.pt lacks x")
def _(c):
    return c.distill(_transfer_with(c, lambda p: p.pop("x")))


@case("distill --alpha on float labels", "distill", "labels must be a 1-D integer tensor")
def _(c):
    return c.distill(_transfer_with(c, lambda p: p.update(labels=p["labels"].float() + 0.5)),
                     "--alpha", "0.5")


@case("distill --alpha on a label 99 of 10 classes", "distill", "holds label 99 but --dataset "
      "digits has 10 classes")
def _(c):
    def relabel(p):
        p["labels"][0] = 99
    return c.distill(_transfer_with(c, relabel), "--alpha", "0.5")


@case("distill on logits of 1e25 is not called a divergence", "distill", "reach |logit| 1e+25",
      "overflows float32", "whatever the learning rate")
def _(c):
    np.save(c.tmp / "big.npy", np.full((1437, 10), 1e25, np.float32))
    assert cli.main(["import-logits", *DATA, "--logits", c.path("big.npy"), "--out",
                     c.path("big")]) == 0
    return c.distill(c.path("big"))


@case("distill with another --split-seed", "distill", "split_seed: 0 in")
def _(c):
    return c.distill(str(c.made / "logits"), "--split-seed", "3")


@case("distill --momentum 5", "distill", "momentum must be in [0, 1)")
def _(c):
    return c.distill(str(c.made / "logits"), "--momentum", "5")


@case("distill --alpha 2", "distill", "alpha must be in [0, 1]")
def _(c):
    return c.distill(str(c.made / "logits"), "--alpha", "2")


@case("distill --hidden 10**12", "distill", "does not fit in memory", "smaller --hidden")
def _(c):
    return c.distill(str(c.made / "logits"), "--hidden", str(10**12))


@case("distill over an existing run says --resume, not resume=True", "distill",
      "checkpoint.pt exists: pass --resume to continue that run, or choose another --out")
def _(c):
    student = c.copy("student")
    return ["distill", "--dataset", "digits", "--logits", str(c.made / "logits"), "--hidden", "16",
            "--bottleneck", "4", "--out", student, *FAST]


DEVICE = "cuda:64"  # no CUDA: "not available"; with CUDA: "does not exist" — refused either way


@case("distill --device cuda before anything is written", "distill", "cuda")
def _(c):
    return c.distill(str(c.made / "logits"), "--device", DEVICE)


@case("train-teacher --device cuda before anything is written", "train-teacher", "cuda")
def _(c):
    return ["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "4", "--out", c.path("out"),
            "--device", DEVICE, *FAST]


@case("collect-logits --device cuda before transfer.pt", "collect-logits", "cuda")
def _(c):
    return ["collect-logits", *DATA, "--teacher", c.teacher, "--out", c.path("out"),
            "--device", DEVICE, "--no-progress"]


@case("sweep --device cuda before anything is written", "sweep", "cuda")
def _(c):
    return ["sweep", "--teacher", c.teacher, "--hidden", "8", "--seeds", "1", "--epochs", "1",
            "--out", c.path("out"), "--device", DEVICE, "--no-progress"]


@case("collect-logits --teacher os:system (a factory needing arguments)", "collect-logits",
      "teacher 'os:system': system(command) needs arguments (command)")
def _(c):
    return ["collect-logits", *DATA, "--teacher", "os:system", "--out", c.path("out"),
            "--no-progress"]


@case("collect-logits of a .pt2 with a fixed batch", "collect-logits",
      "traced with a fixed batch of 1", "dynamic batch")
def _(c):
    program = torch.export.export(torch.nn.Linear(64, 10), (torch.randn(1, 64),))
    torch.export.save(program, c.path("fixed.pt2"))
    return ["collect-logits", *DATA, "--teacher", c.path("fixed.pt2"), "--out", c.path("out"),
            "--no-progress"]


@case("collect-logits with a transfer.pt as --teacher", "collect-logits",
      "is a mimic_fast transfer file, not a model")
def _(c):
    return ["collect-logits", *DATA, "--teacher", str(c.made / "logits" / "transfer.pt"),
            "--out", c.path("out"), "--no-progress"]


@case("sweep --hidden 10**12 before anything is written", "sweep", "does not fit in memory")
def _(c):
    return ["sweep", "--teacher", c.teacher, "--hidden", str(10**12), "--seeds", "1",
            "--epochs", "1", "--out", c.path("out"), "--no-progress"]


def _sweep_file(c, name, text):
    out = c.copy("sweep")
    path = Path(out) / name
    path.write_text(text)
    return out


def _with_digest(obj):
    return json.dumps({**obj, DIGEST_KEY: content_digest(obj)})


RESULT = "points/conv0-k32-h8/mimic-seed0/result.json"
for _name, _file in (("sweep-config.json", sweep.CONFIG_NAME), ("result.json", RESULT)):
    for _shape, _text in (("[]", "[]"), ("{}", "{}"), ("{} with its sha256", _with_digest({}))):
        CASES[f"sweep --report on a {_shape} {_name}"] = (
            "sweep", (os.path.basename(_file),), lambda c, f=_file, t=_text: [
                "sweep", "--report", "--out", _sweep_file(c, f, t)])


for _shape, _text in (("[]", "[]"), ("{}", "{}"), ("{} with its sha256", _with_digest({}))):
    def _make(c, t=_text):
        out = _sweep_file(c, "teacher.json", t)
        return ["sweep", "--teacher", c.teacher, "--hidden", "8", "--seeds", "1", "--epochs", "1",
                "--n-generated", "0", "--throughput-time", "0.01", "--throughput-batches", "1",
                "--out", out, "--no-progress"]
    CASES[f"sweep on a {_shape} teacher.json"] = ("sweep", ("teacher.json",), _make)


@case("export --threads -1", "export", "--threads must be >= 0")
def _(c):
    return ["export", "--model", c.student, "--out", c.path("s.onnx"), "--threads", "-1"]


@case("export --model of a transfer.pt is not called a teacher", "export",
      "--model", "is a mimic_fast transfer file, not a model")
def _(c):
    return ["export", "--model", str(c.made / "logits" / "transfer.pt"), "--out", c.path("s.onnx")]


@case("export --model of a text file", "export", "--model")
def _(c):
    (c.tmp / "notes.txt").write_text("not a model")
    return ["export", "--model", c.path("notes.txt"), "--out", c.path("s.onnx")]


if not torch.cuda.is_available():
    @case("bench ops --device cuda", "bench", "--device cuda was given but no CUDA device")
    def _(c):
        return ["bench", "ops", "--device", "cuda"]


def _tree(root):
    """{relative path: (size, mtime) of a file, None for a folder} under root (a folder's own
    mtime changes with the lock holder files of its readers, which leave nothing behind)."""
    out = {}
    for folder, dirs, files in os.walk(root):
        for n in dirs:
            out[os.path.relpath(os.path.join(folder, n), root)] = None
        for n in files:
            st = os.lstat(os.path.join(folder, n))
            out[os.path.relpath(os.path.join(folder, n), root)] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_a_bad_input_is_one_error_line_exit_2_and_nothing_written(name, made, tmp_path, capsys):
    command, says, make = CASES[name]
    argv = make(Case(made, tmp_path))
    before, made_before = _tree(tmp_path), _tree(made)
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = cli.main(argv)
    err = capsys.readouterr().err
    shown = [str(w.message) for w in caught if not issubclass(w.category, HIDDEN)]
    assert code == 2, err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"mimic-fast {command}: error: "), err
    assert not shown, shown
    for text in says:
        assert text in err, err
    # CLI wording: never a keyword argument of ours
    for python in ("resume=True", "wait=True", "overwrite=True", "allow_partial=True", "device='",
                   "dtype=torch"):
        assert python not in err, err
    after = _tree(tmp_path)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}  # nothing created, changed, removed
    assert _tree(made) == made_before
    assert not (tmp_path / "out").exists()


def test_sweep_files_of_the_right_shape_are_accepted(made, tmp_path, capsys):
    """The table's sweep cases fail on their files, not on anything else: the same commands on an
    untouched copy succeed."""
    out = Case(made, tmp_path).copy("sweep")
    assert cli.main(["sweep", "--report", "--out", out]) == 0
    config = read_json(os.path.join(out, sweep.CONFIG_NAME), "")
    write_json(os.path.join(out, sweep.CONFIG_NAME), config)  # rewritten: still valid
    assert cli.main(["sweep", "--report", "--out", out]) == 0


def test_a_full_disk_is_one_line_naming_the_target(tmp_path, capsys, monkeypatch):
    """An OS error while writing is reported naming the file we were writing, not the temp file."""
    import mimic_fast._io as io_

    real = io_._Recorder.write

    def full(self, data):
        self.error = OSError(errno.ENOSPC, "No space left on device")
        raise self.error
    monkeypatch.setattr(io_._Recorder, "write", full)
    code = cli.main(["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "4", "--out",
                     str(tmp_path / "t"), *FAST])
    monkeypatch.setattr(io_._Recorder, "write", real)
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert f"{tmp_path / 't'}{os.sep}" in err and "No space left on device (the disk is full" in err
    assert ".tmp" not in err
