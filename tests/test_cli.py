import json
import os
import subprocess
import sys

import pytest
import torch

import mimic_fast as mf
from mimic_fast import cli

COMMANDS = ["demo", "train-teacher", "collect-logits", "distill", "bench", "info"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mimic-fast " + command in out


def test_top_level_help_lists_every_command_via_python_m():
    root = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "mimic_fast", "--help"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout


def test_info_prints_backends(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "backend" in out


def test_bench_without_the_bench_package_says_so(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mimic_fast.bench", None)  # import now raises ImportError
    assert cli.main(["bench", "ops"]) == 2
    assert "mimic_fast.bench could not be imported" in capsys.readouterr().err


def test_demo_quick_writes_json_and_png(tmp_path, capsys):
    out = tmp_path / "demo"
    threads = torch.get_num_threads()
    assert cli.main(["demo", "--quick", "--out", str(out)]) == 0
    assert torch.get_num_threads() == threads  # the demo's thread setting does not leak
    result = json.loads((out / "demo.json").read_text())
    assert set(result["summary"]) == {"teacher", "student_labels", "student_mimic"}
    for row in result["summary"].values():
        assert 0.0 <= row["accuracy_mean"] <= 1.0 and row["params"] > 0 and row["samples_per_s"] > 0
    assert result["summary"]["student_labels"]["params"] == result["summary"]["student_mimic"]["params"]
    assert len(result["runs"]) == 1 and result["config"]["quick"]
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "by mimicry" in printed and "on labels only" in printed and "demo.json" in printed


def test_pipeline_train_collect_distill(tmp_path, capsys):
    data = ["--dataset", "digits", "--label-fraction", "0.2"]
    fast = ["--epochs", "2", "--no-progress"]
    teacher, logits, student = (str(tmp_path / n) for n in ("teacher", "logits", "student"))
    assert cli.main(["train-teacher", *data, "--model", "dnn-2k", "--hidden", "32,32", "--out", teacher,
                     "--batch-size", "32", *fast]) == 0
    assert {"teacher.pt", "checkpoint.pt", "metrics.jsonl"} <= set(os.listdir(teacher))
    # an existing run is refused without --resume, and kept
    assert cli.main(["train-teacher", *data, "--model", "dnn-2k", "--hidden", "32,32", "--out", teacher,
                     *fast]) == 2
    assert "--resume" in capsys.readouterr().err
    assert cli.main(["collect-logits", *data, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--teacher", os.path.join(teacher, "teacher.pt"), "--out", logits,
                     "--n-generated", "100", "--dtype", "float32", "--no-progress"]) == 0
    transfer = torch.load(os.path.join(logits, "transfer.pt"), weights_only=False)
    n_labelled = int((transfer["labels"] >= 0).sum())
    assert len(transfer["x"]) == 1437 + 100 and 0.15 < n_labelled / 1437 < 0.25
    assert cli.main(["distill", *data, "--logits", logits, "--hidden", "64", "--bottleneck", "8",
                     "--alpha", "0.5", "--out", student, "--batch-size", "128", *fast]) == 0
    lines = [json.loads(x) for x in open(os.path.join(student, "metrics.jsonl"))]
    assert [x["epoch"] for x in lines] == [1, 2]
    assert all(k in lines[-1] for k in ("soft_loss", "hard_loss", "loss", "test_accuracy", "lr", "time"))
    model, payload = mf.train.load_model(os.path.join(student, "student.pt"))
    assert isinstance(model, mf.nn.WideShallowStudent) and model.hidden == 64
    assert payload["alpha"] == 0.5
    # resume of a finished run: nothing left to do, same result
    assert cli.main(["distill", *data, "--logits", logits, "--hidden", "64", "--bottleneck", "8",
                     "--alpha", "0.5", "--out", student, "--batch-size", "128", "--resume", *fast]) == 0
    # a transfer set made with other options is refused, not overwritten
    assert cli.main(["collect-logits", *data, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--out", logits, "--n-generated", "7", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "made from another data recipe (n_generated: 100 in" in err and "7 here" in err


def test_missing_data_path_is_a_clear_error(capsys):
    assert cli.main(["train-teacher", "--dataset", "npz", "--out", "unused", "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err


def _tiny_image_npz(path, n=48):
    import numpy as np

    r = np.random.default_rng(0)
    X = r.normal(size=(n, 1, 6, 6)).astype(np.float32)
    np.savez(path, X=X, y=(X[:, 0, 0, 0] > 0).astype(np.int64),
             X_unlabelled=r.normal(size=(8, 1, 6, 6)).astype(np.float32))
    return str(path)


def test_pipeline_on_image_npz_with_a_wide_shallow_student(tmp_path, capsys):
    data = ["--dataset", "npz", "--data", _tiny_image_npz(tmp_path / "img.npz")]
    fast = ["--epochs", "1", "--no-progress", "--batch-size", "16"]
    teacher, logits, student = (str(tmp_path / n) for n in ("teacher", "logits", "student"))
    assert cli.main(["train-teacher", *data, "--channels", "2", "--hidden", "4", "--out", teacher,
                     *fast]) == 0
    assert cli.main(["collect-logits", *data, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--out", logits, "--n-generated", "8", "--method", "shift", "--no-progress"]) == 0
    # snn-mimic-* is a WideShallowStudent: it takes flat rows only
    assert cli.main(["distill", *data, "--logits", logits, "--hidden", "16", "--bottleneck", "4",
                     "--out", student, *fast]) == 0, capsys.readouterr().err
    model, _ = mf.train.load_model(os.path.join(student, "student.pt"))
    assert model(torch.zeros(2, 36)).shape == (2, 2)
    # logits of other data than --dataset: a clear error, not a shape error deep in a kernel
    capsys.readouterr()
    assert cli.main(["distill", "--dataset", "digits", "--logits", logits, "--out",
                     str(tmp_path / "s2"), *fast]) == 2
    err = capsys.readouterr().err
    assert "36 features" in err and "64 features" in err


def test_bad_teacher_or_device_fails_cleanly_before_writing(tmp_path, capsys):
    out = tmp_path / "c"
    args = ["collect-logits", "--dataset", "digits", "--out", str(out), "--no-progress"]
    assert cli.main([*args, "--teacher", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt does not exist" in capsys.readouterr().err
    (tmp_path / "foreign.pt").write_bytes(b"PK\x03\x04 not a model")
    assert cli.main([*args, "--teacher", str(tmp_path / "foreign.pt")]) == 2
    assert "not a mimic_fast model file" in capsys.readouterr().err
    assert not out.exists()  # nothing written before the teacher was known to load
    assert cli.main(["train-teacher", "--dataset", "digits", "--out", str(tmp_path / "t"),
                     "--device", "foo", "--epochs", "1", "--no-progress"]) == 2
    assert "device must be" in capsys.readouterr().err
