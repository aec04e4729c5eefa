"""Ship the student: ONNX (run in onnxruntime) and torch.export (.pt2) artefacts of plain ops."""
import pytest
import torch
from torch import nn

import mimic_fast as mf
from mimic_fast import cli
from mimic_fast import train as T
from mimic_fast.export import export_student, latency, load_exported
from mimic_fast.testing import assert_close


def _student():
    torch.manual_seed(0)
    return mf.nn.WideShallowStudent(12, 5, 40, 3, activation="gelu", bias=(True, False)).eval()


class Wrapped(nn.Module):
    """A user's model with a fused student inside (after fuse_student)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(2.0))
        self.body = nn.Sequential(nn.Linear(12, 3, bias=False), nn.Linear(3, 40), nn.Tanh(),
                                  nn.Linear(40, 5))

    def forward(self, x):
        return self.body(x * self.scale).log_softmax(-1)


def _fused_wrapped():
    torch.manual_seed(1)
    model, report = mf.convert.fuse_student(Wrapped().eval(), report=True)
    assert report.fused
    return model


@pytest.mark.parametrize("make", [_student, _fused_wrapped])
def test_torch_export_pt2_runs_plain_ops(tmp_path, make):
    model = make()
    path = export_student(model, tmp_path / "s.pt2", "torch-export")
    program = torch.export.load(path)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert not any("mimic_fast" in t for t in targets) and any("linear" in t for t in targets)
    for B in (1, 7, 256):  # the batch dimension stays dynamic
        x = torch.randn(B, 12)
        with torch.no_grad():
            assert_close(program.module()(x), model(x), f"pt2 at batch {B}")


@pytest.mark.parametrize("make", [_student, _fused_wrapped])
def test_onnx_runs_in_onnxruntime(tmp_path, make):
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = make()
    path = export_student(model, tmp_path / "s.onnx", "onnx")
    proto = onnx.load(str(path))
    assert {n.domain for n in proto.graph.node} <= {"", "ai.onnx"}  # standard ops only
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for B in (1, 33):
        x = torch.randn(B, 12)
        (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            assert_close(torch.from_numpy(got), model(x), f"onnxruntime at batch {B}")


def test_export_errors_and_latency(tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        export_student(_student(), tmp_path / "s", "tflite")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match="input_shape"):
        export_student(conv, tmp_path / "c.pt2", "torch-export")
    export_student(conv, tmp_path / "c.pt2", "torch-export", input_shape=(1, 5, 5))
    model = _student()
    path = export_student(model, tmp_path / "s.pt2", "torch-export")
    rows = latency(model, path, "torch-export", batch_sizes=(1, 4))
    assert [r["batch"] for r in rows] == [1, 4] and all(r["fused_s"] > 0 < r["exported_s"]
                                                        for r in rows)
    assert model.W.requires_grad and isinstance(model, mf.nn.WideShallowStudent)  # not unfused
    assert callable(load_exported(path, "torch-export"))


@pytest.mark.parametrize("command", ["export", "import-logits"])
def test_new_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0 and f"usage: mimic-fast {command}" in capsys.readouterr().out


def test_cli_export(tmp_path, capsys):
    model = _student()
    T.save_model(tmp_path / "student.pt", model, {"class": "WideShallowStudent", "kwargs": dict(
        in_features=12, num_classes=5, hidden=40, bottleneck=3, activation="gelu",
        bias=(True, False))})
    out = tmp_path / "s.pt2"
    assert cli.main(["export", "--model", str(tmp_path / "student.pt"), "--format", "torch-export",
                     "--out", str(out), "--latency"]) == 0
    printed = capsys.readouterr().out
    assert "batch    1" in printed and "batch  256" in printed and "exported" in printed
    x = torch.randn(3, 12)
    with torch.no_grad():
        assert_close(torch.export.load(out).module()(x), model(x), "CLI-exported student")
    assert cli.main(["export", "--model", str(tmp_path / "nope.pt"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_onnx_is_one_file_that_runs_alone(tmp_path):
    """The .onnx copied alone to another folder runs: no hidden .onnx.data sidecar."""
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    model = _student()
    (tmp_path / "a").mkdir()
    path = export_student(model, tmp_path / "a" / "s.onnx", "onnx")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["s.onnx"]
    (tmp_path / "b").mkdir()
    alone = tmp_path / "b" / "s.onnx"
    alone.write_bytes(path.read_bytes())
    session = ort.InferenceSession(str(alone), providers=["CPUExecutionProvider"])
    x = torch.randn(4, 12)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(got), model(x), "the .onnx alone")


def test_onnx_over_the_limit_writes_and_names_both_files(tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from mimic_fast import export as E

    monkeypatch.setattr(E, "ONNX_INLINE_LIMIT", 0)  # stands in for a > 2 GB model
    with pytest.warns(UserWarning, match=r"s\.onnx\.data; ship both"):
        export_student(_student(), tmp_path / "s.onnx", "onnx")  # checked beside its .data
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.onnx", "s.onnx.data"]


def test_export_paths_and_input_shape_errors(tmp_path):
    model = _student()
    with pytest.raises(ValueError, match=r"must end in \.pt2"):
        export_student(model, tmp_path / "s.torch-export", "torch-export")
    assert not any(tmp_path.iterdir())
    path = export_student(model, tmp_path / "new" / "dir" / "s.pt2", "torch-export")  # created
    assert path.is_file()
    with pytest.raises(ValueError, match=r"first linear layer takes 12 features") as e:
        export_student(model, tmp_path / "x.pt2", "torch-export", input_shape=(3, 8, 8))
    assert "\x1b" not in str(e.value)
    export_student(model, tmp_path / "y.pt2", "torch-export", input_shape=(1, 12))  # fits


def test_cli_export_errors_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "fn_teacher.py").write_text("def make():\n    return lambda x: x[:, :5]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = _student()
    T.save_model(tmp_path / "student.pt", model, {"class": "WideShallowStudent", "kwargs": dict(
        in_features=12, num_classes=5, hidden=40, bottleneck=3, activation="gelu",
        bias=(True, False))})
    for argv, says in [
            (["--model", "fn_teacher:make", "--out", str(tmp_path / "f.onnx")], "not an nn.Module"),
            (["--model", str(tmp_path / "student.pt"), "--input-shape", "3,8,8", "--format",
              "torch-export", "--out", str(tmp_path / "s.pt2")], "takes 12 features"),
            (["--model", str(tmp_path / "student.pt"), "--format", "torch-export", "--out",
              str(tmp_path / "s.torch-export")], "must end in .pt2")]:
        assert cli.main(["export", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("mimic-fast export: error: ") and says in err, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("format", ["torch-export", "onnx"])
def test_export_to_a_file_object_is_checked_and_loads(tmp_path, format):
    """A writable file object gets the same checked file a path gets (it was written in place and
    never checked: torch-export failed on its own check, ONNX treated the object as a file name)."""
    if format == "onnx":
        pytest.importorskip("onnxscript")
        pytest.importorskip("onnxruntime")
    import io

    model = _student()
    buf = io.BytesIO()
    assert export_student(model, buf, format) is buf
    path = tmp_path / ("s.pt2" if format == "torch-export" else "s.onnx")
    path.write_bytes(buf.getvalue())
    x = torch.randn(7, 12)
    with torch.no_grad():
        assert_close(load_exported(path, format)(x), model(x), f"{format} from a file object")
    with open(tmp_path / "f", "wb") as f:  # a real file object too
        export_student(model, f, format)
    assert (tmp_path / "f").read_bytes()[:2] == buf.getvalue()[:2]
