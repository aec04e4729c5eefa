"""Bring your own teacher: every file kind and factory, output selection, plain callables, and the
collect-logits CLI on them."""
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from mimic_fast import cli
from mimic_fast import train as T
from mimic_fast.data import LogitStore, collect_logits, load_dataset
from mimic_fast.files import build_from_spec
from mimic_fast.teachers import Teacher, as_teacher, load_teacher, pick_output
from mimic_fast.testing import assert_close

D, C = 64, 10  # digits


class HFOutput(OrderedDict):
    """A transformers-style ModelOutput: a dict that also has attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DictTeacher(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))

    def forward(self, x):
        logits = self.net(x)
        return HFOutput(logits=logits, hidden=logits.detach() * 0)


class TupleTeacher(DictTeacher):
    def forward(self, x):
        return (self.net(x).relu(), self.net(x))


def make_dict_teacher():  # a package.module:factory target
    torch.manual_seed(7)
    return DictTeacher()


def make_function_teacher():
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(3))
    return lambda x: {"out": [x @ w.t()]}


def not_callable_factory():
    return 42


def _plain():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).eval()


def _files(tmp_path):
    """{kind: (path, reference module)} for each file format a teacher may come in."""
    m = _plain()
    x = torch.randn(2, D)
    paths = {}
    T.save_model(tmp_path / "project.pt", m := build_from_spec(spec := {
        "name": "dnn-2k", "kwargs": {"in_features": D, "num_classes": C, "hidden": (8,)}}), spec)
    paths["mimic_fast model file"] = (tmp_path / "project.pt", m.eval())
    m = _plain()
    torch.save(m, tmp_path / "pickled.pt")
    paths["pickled module"] = (tmp_path / "pickled.pt", m)
    torch.jit.save(torch.jit.script(m), tmp_path / "script.pt")
    paths["TorchScript"] = (tmp_path / "script.pt", m)
    torch.export.save(torch.export.export(m, (x,), dynamic_shapes=({0: torch.export.Dim("b")},)),
                      tmp_path / "program.pt2")
    paths["torch.export program"] = (tmp_path / "program.pt2", m)
    return paths


def test_every_file_kind_loads_and_gives_the_same_logits(tmp_path):
    x = torch.randn(5, D)
    for kind, (path, ref) in _files(tmp_path).items():
        teacher, info = load_teacher(str(path))
        assert info["kind"] == kind and not teacher.training
        assert (info["spec"] is not None) == (kind == "mimic_fast model file")
        with torch.no_grad():
            assert_close(teacher(x), ref(x), f"{kind} logits")
        assert sum(p.numel() for p in teacher.parameters()) > 0, kind  # fingerprintable


def test_factory_and_output_selection():
    x = torch.randn(3, D)
    teacher, info = load_teacher("test_teachers:make_dict_teacher", output="logits")
    assert info["kind"] == "factory"
    ref = make_dict_teacher()
    with torch.no_grad():
        assert_close(teacher(x), ref(x)["logits"], "dict key")
    with pytest.raises(ValueError, match=r"HFOutput with keys \['logits', 'hidden'\].*--teacher-output"):
        load_teacher("test_teachers:make_dict_teacher")[0](x)
    fn, _ = load_teacher("test_teachers:make_function_teacher", output="out.0")
    assert_close(fn(x), make_function_teacher()(x)["out"][0], "dotted path into a plain function")
    tup = as_teacher(TupleTeacher(), output="1")
    assert_close(tup(x), tup.net.net(x), "tuple index")
    assert_close(pick_output(HFOutput(logits=x), "logits"), x, "attribute")
    with pytest.raises(ValueError, match="index 5 does not exist"):
        as_teacher(TupleTeacher(), output="5")(x)
    with pytest.raises(ValueError, match="no key, index or attribute 'probs'"):
        as_teacher(DictTeacher(), output="probs")(x)
    for spec, match in (("test_teachers:not_callable_factory", "returned a int"),
                        ("test_teachers:nope", "has no attribute 'nope'"),
                        ("no_such_package_xyz:f", "cannot import")):
        with pytest.raises(ValueError, match=match):
            load_teacher(spec)
    with pytest.raises(TypeError, match="teacher must be callable"):
        Teacher(3)


def test_state_dict_or_foreign_file_is_refused_with_a_hint(tmp_path):
    torch.save(_plain().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ValueError, match="state dict .* no architecture: pass package.module:factory"):
        load_teacher(str(tmp_path / "sd.pt"))
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="holds a list, not a model"):
        load_teacher(str(tmp_path / "list.pt"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_teacher(str(tmp_path / "missing.pt"))


def test_collect_logits_takes_any_callable(tmp_path):
    X = torch.randn(40, D)
    w = torch.randn(C, D)
    store = collect_logits(lambda x: x @ w.t(), TensorDataset(X), tmp_path / "s", dtype=torch.float32,
                           progress=False)
    assert_close(store.tensor(), X @ w.t(), "logits of a plain function")
    # every lambda has the same name-only id: what tells them apart is their logits
    assert store.header["teacher"] == "function test_collect_logits_takes_any_callable.<locals>.<lambda>"
    again = collect_logits(lambda x: x @ w.t(), TensorDataset(X), tmp_path / "s", dtype=torch.float32,
                           progress=False)  # the same function again: reused
    assert again.header["created"] == store.header["created"]
    changed = r"teacher's logits for dataset rows \[0, 13, 26, 39\] differ .*the teacher changed"
    with pytest.raises(ValueError, match=changed):  # another lambda: the same id, other logits
        collect_logits(lambda x: 2 * x @ w.t(), TensorDataset(X), tmp_path / "s",
                       dtype=torch.float32, progress=False)
    # a module without parameters has nothing to fingerprint either
    collect_logits(Columns(0), TensorDataset(X), tmp_path / "m", progress=False)
    with pytest.raises(ValueError, match=changed):
        collect_logits(Columns(1), TensorDataset(X), tmp_path / "m", progress=False)


class Columns(nn.Module):
    """A parameter-free teacher: C input columns from `start` on."""

    def __init__(self, start):
        super().__init__()
        self.start = start

    def forward(self, x):
        return x[:, self.start:self.start + C]


SCALE = 1.0  # read by make_scaled_teacher: a function teacher whose behaviour changes


def make_scaled_teacher():
    w = torch.randn(C, D, generator=torch.Generator().manual_seed(5))
    return lambda x: SCALE * (x @ w.t())


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_changed_function_teacher_is_refused_not_reused(tmp_path, capsys, monkeypatch, dtype):
    import sys

    argv = ["collect-logits", "--dataset", "digits", "--teacher", "test_teachers:make_scaled_teacher",
            "--dtype", dtype, "--out", str(tmp_path / "L"), "--no-progress"]
    assert cli.main(argv) == 0
    assert cli.main(argv) == 0 and "reusing" in capsys.readouterr().out  # unchanged: reused
    monkeypatch.setattr(sys.modules[__name__], "SCALE", 1.01)  # the user edits the function
    assert cli.main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and err[0].startswith("mimic-fast collect-logits: error: the teacher's")
    assert "differ from those stored" in err[0] and "the teacher changed" in err[0]
    assert "rerun with --overwrite" in err[0]
    assert cli.main(argv + ["--overwrite"]) == 0


def test_cli_collect_logits_with_foreign_teachers(tmp_path, capsys):
    files = _files(tmp_path)
    X = load_dataset("digits", seed=0).train.tensors[0].reshape(-1, D)
    base = ["collect-logits", "--dataset", "digits", "--dtype", "float32", "--no-progress"]
    for i, kind in enumerate(("torch.export program", "TorchScript", "pickled module")):
        path, ref = files[kind]
        out = tmp_path / f"c{i}"
        assert cli.main([*base, "--teacher", str(path), "--out", str(out)]) == 0, capsys.readouterr()
        store = LogitStore.open(out / "logits")
        with torch.no_grad():
            assert_close(store.tensor(), ref(X), f"stored logits of the {kind} teacher")
    out = tmp_path / "hf"
    assert cli.main([*base, "--teacher", "test_teachers:make_dict_teacher", "--out", str(out)]) == 2
    assert "--teacher-output" in capsys.readouterr().err
    assert cli.main([*base, "--teacher", "test_teachers:make_dict_teacher", "--teacher-output",
                     "logits", "--out", str(out)]) == 0
    with torch.no_grad():
        want = make_dict_teacher()(X)["logits"]
    assert np.allclose(LogitStore.open(out / "logits").tensor().numpy(), want.numpy(), atol=1e-5)
    assert os.path.exists(out / "teacher.json")
