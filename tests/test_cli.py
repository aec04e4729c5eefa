import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mimic_fast as mf
from mimic_fast import cli

COMMANDS = ["demo", "train-teacher", "collect-logits", "distill", "bench", "info"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))


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
    # what the accuracies' reproducibility depends on is recorded (threads: the run's, not torch's)
    from mimic_fast import _env

    env = result["environment"]
    assert set(_env.REPRODUCE) <= set(env) and env["threads"] == 1
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert "1 CPU thread(s)" in capsys.readouterr().out
    # the same command on the same machine gives the same accuracies and step counts
    assert cli.main(["demo", "--quick", "--out", str(tmp_path / "again"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "demo.json").read_text())
    for key in ("teacher", "student_labels", "student_mimic"):
        a, b = result["runs"][0][key], again["runs"][0][key]
        assert (a["accuracy"], a.get("curve"), a.get("final_soft_loss")) == \
            (b["accuracy"], b.get("curve"), b.get("final_soft_loss")), key
    assert _env.differences(env, again["environment"]) == []
    printed = capsys.readouterr().out
    assert "by mimicry" in printed and "on labels only" in printed and "demo.json" in printed
    # the bar chart's axis starts at a labelled baseline (issue 20: it started at 87% unsaid)
    import matplotlib.pyplot as plt

    from mimic_fast import demo

    fig = demo.figure(result)
    try:
        bars = fig.axes[0]
        low = bars.get_ylim()[0]
        assert low == 0 or f"axis from {low:g}, not 0" in bars.get_ylabel()
        fig2 = demo.figure({**result, "summary": {k: {**v, "accuracy_mean": 0.9, "accuracy_std": 0.01}
                                                  for k, v in result["summary"].items()}})
        assert fig2.axes[0].get_ylim()[0] == 84 and "axis from 84, not 0" in fig2.axes[0].get_ylabel()
        plt.close(fig2)
    finally:
        plt.close(fig)


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


# ----------------------------------------------------------------------------------------------
# issue 20: a newcomer's first hour
# ----------------------------------------------------------------------------------------------
def _parser_calls(path):
    """(line, whether allow_abbrev=False is passed) of every ArgumentParser / add_parser call."""
    import ast

    tree = ast.parse(Path(path).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                node.func.attr in ("ArgumentParser", "add_parser"):
            off = any(k.arg == "allow_abbrev" and isinstance(k.value, ast.Constant) and
                      k.value.value is False for k in node.keywords)
            yield node.lineno, off


def test_every_parser_refuses_abbreviations():
    """argparse's prefix matching took `demo --seed 1` as `--seeds 1` and `--epoch`, `--bottle` as
    the full options: every parser and subparser of the package and its scripts turns it off."""
    root = Path(ROOT)
    files = [*root.glob("mimic_fast/**/*.py"), *root.glob("scripts/*.py"), *root.glob("benchmarks/*.py")]
    calls = [(f"{p.relative_to(root)}:{line}", off) for p in files for line, off in _parser_calls(p)]
    assert len(calls) >= 20
    assert [where for where, off in calls if not off] == []


@pytest.mark.parametrize("argv, usage, wrong", [
    (["demo", "--seed", "1", "--quick"], "usage: mimic-fast demo", "--seed 1"),
    (["distill", "--dataset", "digits", "--logits", "x", "--out", "y", "--epoch", "1"],
     "usage: mimic-fast distill", "--epoch 1"),
    (["distill", "--dataset", "digits", "--logits", "x", "--out", "y", "--bottle", "4"],
     "usage: mimic-fast distill", "--bottle 4"),
    (["distill", "--dataset", "digits", "--logits", "x", "--out", "y", "--hiden", "3"],
     "usage: mimic-fast distill", "--hiden 3"),
    (["sweep", "--hid", "8"], "usage: mimic-fast sweep", "--hid 8"),
])
def test_abbreviations_and_typos_are_refused_under_the_commands_usage(argv, usage, wrong, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.startswith(usage) and f"mimic-fast {argv[0]}: error: unrecognized arguments: {wrong}" in err


def test_demo_and_sweep_own_parsers_refuse_abbreviations():
    from mimic_fast import demo, sweep
    for main, argv in ((demo.main, ["--seed", "1"]), (sweep.main, ["--hid", "8"])):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2


def test_training_options_show_their_help_and_defaults(capsys):
    for command, defaults in (("train-teacher", ("(default 30)", "(default 128)")),
                              ("distill", ("(default 20)", "(default 256)"))):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for option, text in (("--epochs EPOCHS", defaults[0]), ("--batch-size BATCH_SIZE", defaults[1]),
                             ("--momentum MOMENTUM", "(default 0.9"), ("--gamma GAMMA", "(default 0.1)")):
            assert text in out.rsplit(f"{option} ", 1)[1][:120], option  # in its own help


def test_every_command_hides_its_bars_with_no_progress(capsys, monkeypatch):
    """`demo` had --progress (off by default) where every other command has --no-progress."""
    seen = {}
    monkeypatch.setattr(cli, "run_demo", lambda out, cfg, progress: seen.setdefault("p", progress))
    assert cli.main(["demo", "--quick", "--no-progress"]) == 0 and seen.pop("p") is False
    assert cli.main(["demo", "--quick"]) == 0 and seen.pop("p") is True
    assert cli.main(["demo", "--quick", "--progress"]) == 0 and seen.pop("p") is True  # old spelling
    for command in ("demo", "train-teacher", "collect-logits", "distill", "sweep"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        out = capsys.readouterr().out
        assert "--no-progress" in out and "--progress " not in out.replace("--no-progress", "")


def test_an_interrupt_says_whether_there_is_anything_to_resume(tmp_path, capsys, monkeypatch):
    from mimic_fast import pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(pipeline.T, "train_teacher", interrupted)
    argv = ["train-teacher", "--dataset", "digits", "--model", "dnn-2k", "--hidden", "4", "--out",
            str(tmp_path / "t"), "--epochs", "1", "--no-progress"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "no epoch had finished, so there is nothing to resume" in err and "--resume" not in err
    (tmp_path / "t" / "checkpoint.pt").write_bytes(b"")
    assert cli.main(argv) == 130
    assert f"completed epochs are kept in {tmp_path / 't' / 'checkpoint.pt'}: rerun with --resume" \
        in capsys.readouterr().err


def test_export_latency_names_its_threads_and_times_one_thread_by_default(tmp_path, capsys,
                                                                          monkeypatch):
    """--latency at torch's default threads reported 15-62 ms for what takes ~0.8 ms on one thread:
    by default it now times one thread and the default, each row naming its count."""
    kw = {"in_features": 64, "num_classes": 10, "hidden": 32, "bottleneck": 8}
    mf.files.save_model(tmp_path / "s.pt", mf.nn.WideShallowStudent(**kw),
                        {"class": "WideShallowStudent", "kwargs": kw})
    seen = []

    def latency(model, path, fmt, input_shape=None):
        seen.append(torch.get_num_threads())
        return [{"batch": 1, "fused_s": 1e-3, "exported_s": 2e-3}]
    monkeypatch.setattr(cli, "latency", latency)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # torch's default here, whatever the machine
    try:
        base = ["export", "--model", str(tmp_path / "s.pt"), "--format", "torch-export", "--latency"]
        assert cli.main([*base, "--out", str(tmp_path / "a.pt2")]) == 0
        out = capsys.readouterr().out
        assert seen == [1, 2] and torch.get_num_threads() == 2  # restored
        assert "1 thread   batch    1" in out and "2 threads  batch    1" in out
        seen.clear()
        assert cli.main([*base, "--out", str(tmp_path / "b.pt2"), "--threads", "2"]) == 0
        assert seen == [2] and "1 thread " not in capsys.readouterr().out
    finally:
        torch.set_num_threads(threads)


def test_an_onnx_export_prints_no_torch_future_warning(tmp_path):
    pytest.importorskip("onnxscript")
    import warnings

    student = mf.nn.WideShallowStudent(64, 10, hidden=32, bottleneck=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mf.export.export_student(student, tmp_path / "s.onnx", "onnx")
    assert [str(w.message) for w in caught if w.category is FutureWarning] == []


def test_a_factory_in_the_current_folder_loads_through_the_console_script(tmp_path):
    """`--teacher mypkg.models:load` failed with `No module named 'mypkg'` under the console script
    (its sys.path has no current folder) while `python -m mimic_fast` found it. The folder is
    appended, not prepended: a local file named like an installed module does not shadow it."""
    script = Path(sys.executable).parent / "mimic-fast"
    assert script.exists(), "the package's console script (pip install -e .) is missing"
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "models.py").write_text(
        "import torch\n\ndef load():\n    torch.manual_seed(0)\n    return torch.nn.Linear(64, 10)\n")
    (tmp_path / "tabnanny.py").write_text("def load():\n    raise SystemExit('the local file ran')\n")
    base = [str(script), "collect-logits", "--dataset", "digits", "--no-progress"]
    proc = subprocess.run([*base, "--teacher", "mypkg.models:load", "--out", "c"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "c" / "logits" / "header.json").exists()
    proc = subprocess.run([*base, "--teacher", "tabnanny:load", "--out", "d"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "'tabnanny' has no attribute 'load'" in proc.stderr
    assert "the local file ran" not in proc.stderr + proc.stdout


def test_the_teacher_help_says_where_a_factory_is_imported_from(capsys):
    with pytest.raises(SystemExit):
        cli.main(["collect-logits", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "taking no arguments" in out and "the current folder is appended to the import path" in out
