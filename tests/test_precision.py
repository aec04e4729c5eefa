"""Mixed precision in the pipeline (--precision fp32|bf16): float32 master weights and optimizer
state, forward and loss under bfloat16 autocast (the fused op taking bf16 operands), evaluation under
the same autocast, the precision recorded in every file, and a resume that applies another one."""
import json
import os
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mimic_fast as mf
from mimic_fast import cli, demo
from mimic_fast import functional as MF
from mimic_fast import train as T
from mimic_fast.files import load_checkpoint, save_checkpoint
from mimic_fast.ops import cpu as cpu_ops
from mimic_fast.sweep import SweepConfig

D, C, N = 8, 3, 64
KW = dict(batch_size=16, progress=False)


def _xy(n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _distill_set(n=N, scale=2.0):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, D, generator=g), torch.randn(n, C, generator=g) * scale)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


def _student():
    torch.manual_seed(3)
    return mf.nn.WideShallowStudent(D, C, hidden=32, bottleneck=4)


def _lines(out):
    with open(os.path.join(out, T.METRICS)) as f:
        return [json.loads(line) for line in f]


def _grad_dtypes(model):
    """Every gradient's dtype as autograd hands it to its parameter."""
    seen = set()
    for p in model.parameters():
        p.register_hook(lambda g: seen.add(g.dtype))
    return seen


def _optimizer_dtypes(out, kind):
    state = load_checkpoint(os.path.join(out, T.CHECKPOINT), kind)["optimizer"]["state"]
    return {v.dtype for s in state.values() for v in s.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point()}


# ------------------------------------------------------------------------------ the allowed values

def test_one_list_of_precisions_for_configs_and_commands():
    assert T.PRECISIONS == ("fp32", "bf16")
    for bad in ("fp16", "bfloat16", None):
        with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
            T.TrainConfig(precision=bad).validate()
        with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
            SweepConfig(precision=bad).resolved().validate()
        with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
            demo.run_demo("unused", demo.DemoConfig(precision=bad), log=lambda *a: None)
    assert not os.path.exists("unused")
    assert T.TrainConfig().precision == SweepConfig().precision == demo.DemoConfig().precision == "fp32"


@pytest.mark.parametrize("command,required", [
    ("train-teacher", ["--dataset", "digits", "--out", "o"]),
    ("distill", ["--dataset", "digits", "--logits", "l", "--out", "o"]),
    ("sweep", []),
    ("demo", []),
])
def test_every_command_parses_precision(command, required, capsys):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0].choices[command]
    action = next(a for a in sub._actions if a.dest == "precision")
    assert tuple(action.choices) == T.PRECISIONS  # the one list, not a copy
    assert parser.parse_args([command, *required, "--precision", "bf16"]).precision == "bf16"
    default = parser.parse_args([command, *required]).precision
    assert default == ("fp32" if command != "demo" else None)  # demo: None keeps its config's
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, *required, "--precision", "fp16"])
    assert e.value.code == 2 and "invalid choice: 'fp16'" in capsys.readouterr().err


def test_a_device_without_autocast_is_refused_naming_the_precision():
    if torch.amp.is_autocast_available("meta"):
        pytest.skip("this torch has autocast on the meta device")
    with pytest.raises(ValueError, match="precision bf16 runs under torch.autocast.*meta"):
        T.autocast("bf16", torch.device("meta"))
    assert isinstance(T.autocast("fp32", torch.device("meta")), type(T.autocast("fp32", "cpu")))


# ------------------------------------------------------------------------------ what runs in bf16

@pytest.mark.parametrize("precision,activations", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_teacher_steps_and_evaluation_run_under_autocast_over_fp32_master_weights(
        tmp_path, precision, activations):
    model = _mlp()
    seen = {True: set(), False: set()}  # training mode -> dtypes of every Linear's output
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.register_forward_hook(lambda mod, i, o: seen[mod.training].add(o.dtype))
    grads = _grad_dtypes(model)
    out = str(tmp_path / "run")
    res = T.train_teacher(model, _xy(), _xy(32), out_dir=out, epochs=2, lr=0.1, precision=precision,
                          **KW)
    assert seen == {True: {activations}, False: {activations}}  # training steps and evaluation
    assert grads == {torch.float32}
    assert {p.dtype for p in res.model.parameters()} == {torch.float32}
    assert _optimizer_dtypes(out, "teacher") == {torch.float32}  # SGD momentum buffers
    assert [line["precision"] for line in _lines(out)] == [precision] * 2
    assert res.config.precision == precision
    assert load_checkpoint(os.path.join(out, T.CHECKPOINT), "teacher")["config"]["precision"] == precision


def test_fused_distill_gets_bf16_operands_and_fp32_gradients(tmp_path, monkeypatch):
    operands = []
    real = MF.MimicLossFunction

    class Spy:
        @staticmethod
        def apply(x, U, V, b1, W, b2, t, *rest):
            operands.append({x.dtype, U.dtype, V.dtype, b1.dtype, W.dtype, b2.dtype})
            return real.apply(x, U, V, b1, W, b2, t, *rest)

    monkeypatch.setattr(MF, "MimicLossFunction", Spy)
    student = _student()
    grads = _grad_dtypes(student)
    out = str(tmp_path / "run")
    res = T.distill(student, _distill_set(), out_dir=out, epochs=2, optimizer="adam", lr=0.01,
                    precision="bf16", **KW)
    assert len(operands) == 2 * 4 and all(o == {torch.bfloat16} for o in operands)
    assert grads == {torch.float32}
    assert {p.dtype for p in res.model.parameters()} == {torch.float32}
    assert _optimizer_dtypes(out, "distill") == {torch.float32}  # Adam's moments
    lines = _lines(out)
    assert [line["precision"] for line in lines] == ["bf16", "bf16"]
    assert all(torch.isfinite(torch.tensor(line["loss"])) for line in lines)


def test_bf16_training_follows_the_fp32_run_closely():
    """Not a different algorithm: the bf16 run ends near the fp32 one (bf16 rounds to ~3 digits)."""
    a = T.distill(_student(), _distill_set(), epochs=3, lr=0.01, **KW)
    b = T.distill(_student(), _distill_set(), epochs=3, lr=0.01, precision="bf16", **KW)
    assert abs(a.final["loss"] - b.final["loss"]) < 0.02 * a.final["loss"]
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert not torch.equal(p, q), name  # bf16 really ran
        torch.testing.assert_close(q, p, rtol=0.05, atol=0.01, msg=name)


def test_a_nonfinite_loss_still_stops_a_bf16_run(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"diverged: the loss is (nan|inf) at epoch 1"):
        T.distill(_student(), _distill_set(scale=1e3), out_dir=out, epochs=3, lr=5.0,
                  precision="bf16", **KW)
    assert not os.path.exists(os.path.join(out, T.CHECKPOINT))


# ------------------------------------------------------------------------------ resume

def test_resume_applies_another_precision_and_records_it(tmp_path):
    out = str(tmp_path / "run")
    T.distill(_student(), _distill_set(), out_dir=out, epochs=1, **KW)
    with pytest.warns(UserWarning, match="precision 'fp32' -> 'bf16'"):
        T.distill(_student(), _distill_set(), out_dir=out, epochs=2, resume=True, precision="bf16",
                  **KW)
    ckpt = load_checkpoint(os.path.join(out, T.CHECKPOINT), "distill")
    assert ckpt["config"]["precision"] == "bf16"
    assert ckpt["resumes"] == [{"epoch": 1, "changed": {"epochs": [1, 2], "precision": ["fp32", "bf16"]}}]
    assert [line["precision"] for line in _lines(out)] == ["fp32", "bf16"]
    assert [h["precision"] for h in ckpt["history"]] == ["fp32", "bf16"]


def test_a_checkpoint_from_before_the_option_resumes_as_fp32(tmp_path):
    out = str(tmp_path / "run")
    T.distill(_student(), _distill_set(), out_dir=out, epochs=1, **KW)
    path = os.path.join(out, T.CHECKPOINT)
    ckpt = load_checkpoint(path, "distill")
    del ckpt["config"]["precision"]
    save_checkpoint(path, **{k: v for k, v in ckpt.items() if k not in ("format", "sha256")})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        T.distill(_student(), _distill_set(), out_dir=out, epochs=1, resume=True, **KW)
    assert not caught  # nothing changed: it was a float32 run
    with pytest.warns(UserWarning, match="precision 'fp32' -> 'bf16'"):
        T.distill(_student(), _distill_set(), out_dir=out, epochs=2, resume=True, precision="bf16",
                  **KW)


# ------------------------------------------------------------------------------ the commands

def test_train_teacher_and_distill_in_bf16_record_it_everywhere(tmp_path, capsys):
    data = ["--dataset", "digits", "--label-fraction", "0.2"]
    fast = ["--epochs", "1", "--no-progress", "--precision", "bf16"]
    teacher, logits, student = (str(tmp_path / n) for n in ("teacher", "logits", "student"))
    assert cli.main(["train-teacher", *data, "--model", "dnn-2k", "--hidden", "16", "--out", teacher,
                     "--batch-size", "64", *fast]) == 0
    assert "(bf16); wrote" in capsys.readouterr().out
    _, payload = T.load_model(os.path.join(teacher, "teacher.pt"))
    assert payload["precision"] == "bf16" and payload["history"][0]["precision"] == "bf16"
    assert cli.main(["collect-logits", *data, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--out", logits, "--n-generated", "50", "--dtype", "float32",
                     "--no-progress"]) == 0
    assert cli.main(["distill", *data, "--logits", logits, "--hidden", "64", "--bottleneck", "8",
                     "--out", student, "--batch-size", "128", *fast]) == 0
    printed = capsys.readouterr().out
    assert "(bf16); wrote" in printed
    (line,) = _lines(student)
    assert line["precision"] == "bf16" and 0 < line["loss"] < float("inf")
    assert 0 <= line["test_accuracy"] <= 1
    _, payload = T.load_model(os.path.join(student, "student.pt"))
    assert payload["precision"] == "bf16"
    assert load_checkpoint(os.path.join(student, T.CHECKPOINT), "distill")["config"]["precision"] == "bf16"


def test_demo_in_bf16_says_what_ran_in_which_precision(tmp_path):
    cfg = demo.DemoConfig.quick_preset()
    cfg.teacher_epochs, cfg.label_epochs, cfg.mimic_epochs, cfg.n_generated = 1, 1, 1, 50
    cfg.precision = "bf16"
    printed = []
    result = demo.run_demo(str(tmp_path / "demo"), cfg, log=printed.append)
    saved = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert saved["config"]["precision"] == "bf16"
    p = saved["precision"]
    assert p["precision"] == "bf16" and "bfloat16 autocast" in p["training"]
    assert "bfloat16 autocast" in p["evaluation"] and "float32" in p["logits"]
    assert p["fused_op"] == {"backend": result["backend"], "dtype": "bfloat16",
                             "path": cpu_ops.compute_path(torch.bfloat16)[1]}
    assert saved["runs"][0]["run_s"] > 0 and saved["run_s_mean"] > 0
    text = "\n".join(printed)
    assert "precision bf16" in text and cpu_ops.compute_path(torch.bfloat16)[1] in text
