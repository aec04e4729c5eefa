import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import mimic_fast as mf
from mimic_fast.testing import assert_close
from mimic_fast import train as T
from mimic_fast.distributed import default_device

D, C, N = 8, 3, 64


def _xy(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return TensorDataset(x, y)


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, C))


def _distill_set(n=N, labelled_every=3):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(n, D, generator=g)
    t = torch.randn(n, C, generator=g) * 2
    y = torch.where(torch.arange(n) % labelled_every == 0, t.argmax(-1), torch.full((n,), -1))
    return TensorDataset(x, t, torch.arange(n), y)


def _student(hidden=32, k=4):
    torch.manual_seed(3)
    return mf.nn.WideShallowStudent(D, C, hidden=hidden, bottleneck=k)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _strip_time(lines):
    return [{k: v for k, v in line.items() if k != "time"} for line in lines]


class Crashing(Dataset):
    """Raises KeyboardInterrupt on the `after`-th item fetch: a run interrupted mid-epoch."""

    def __init__(self, base, after):
        self.base, self.after, self.calls = base, after, 0

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.calls += 1
        if self.calls > self.after:
            raise KeyboardInterrupt("simulated interruption")
        return self.base[i]


OPTS = dict(epochs=2, batch_size=16, lr=0.1, progress=False)


def test_distill_resume_equals_uninterrupted(tmp_path):
    # the fused mimic path, Adam and a mixed loss: every piece of state must be restored
    data = _distill_set()
    kw = dict(alpha=0.4, optimizer="adam", lr=0.01, epochs=3, batch_size=16, progress=False)
    full = T.distill(_student(), data, out_dir=str(tmp_path / "a"), **kw)
    with pytest.raises(KeyboardInterrupt):
        T.distill(_student(), Crashing(data, 2 * N + 5), out_dir=str(tmp_path / "b"), **kw)
    resumed = T.distill(_student(), data, out_dir=str(tmp_path / "b"), resume=True, **kw)
    assert resumed.resumed_from == 2
    for k, v in _params(full.model).items():
        assert torch.equal(v, _params(resumed.model)[k]), k
    assert _strip_time(full.history) == _strip_time(resumed.history)


def test_resume_after_crash_mid_epoch_equals_uninterrupted(tmp_path):
    data, test = _xy(), _xy(32, seed=5)
    full = T.train_teacher(_mlp(), data, test, out_dir=str(tmp_path / "a"), **OPTS)
    # crash in the middle of epoch 2 (epoch 1 fetched N items)
    out_b = str(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        T.train_teacher(_mlp(), Crashing(data, N + 20), test, out_dir=out_b, **OPTS)
    assert [h["epoch"] for h in _lines(os.path.join(out_b, T.METRICS))] == [1]
    resumed = T.train_teacher(_mlp(), data, test, out_dir=out_b, resume=True, **OPTS)
    assert resumed.resumed_from == 1
    a, b = _params(full.model), _params(resumed.model)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _strip_time(_lines(os.path.join(out_b, T.METRICS))) == \
        _strip_time(_lines(os.path.join(tmp_path / "a", T.METRICS)))
    assert all(k in full.final for k in ("epoch", "loss", "train_accuracy", "test_accuracy", "lr", "time"))


def test_crash_between_checkpoint_and_metrics_line_is_repaired(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = T._append_metrics
    calls = []

    def crash_on_second(out_dir, line):
        calls.append(line["epoch"])
        if len(calls) == 2:
            raise KeyboardInterrupt("after the checkpoint of epoch 2, before its metrics line")
        real(out_dir, line)

    monkeypatch.setattr(T, "_append_metrics", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        T.train_teacher(_mlp(), _xy(), out_dir=out, **{**OPTS, "epochs": 3})
    monkeypatch.setattr(T, "_append_metrics", real)
    assert len(_lines(os.path.join(out, T.METRICS))) == 1
    res = T.train_teacher(_mlp(), _xy(), out_dir=out, resume=True, **{**OPTS, "epochs": 3})
    assert res.resumed_from == 2
    assert [h["epoch"] for h in _lines(os.path.join(out, T.METRICS))] == [1, 2, 3]


def test_existing_checkpoint_is_never_overwritten(tmp_path):
    out = str(tmp_path / "run")
    T.train_teacher(_mlp(), _xy(), out_dir=out, **{**OPTS, "epochs": 1})
    before = open(os.path.join(out, T.CHECKPOINT), "rb").read()
    with pytest.raises(FileExistsError, match="resume"):
        T.train_teacher(_mlp(), _xy(), out_dir=out, **{**OPTS, "epochs": 1})
    assert open(os.path.join(out, T.CHECKPOINT), "rb").read() == before
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


@pytest.mark.parametrize("optimizer,state_key", [("sgd", "momentum_buffer"), ("adam", "exp_avg")])
def test_optimizer_options(tmp_path, optimizer, state_key):
    out = str(tmp_path / optimizer)
    lr = 0.1 if optimizer == "sgd" else 0.01
    res = T.train_teacher(_mlp(), _xy(), out_dir=out, optimizer=optimizer, lr=lr, schedule="step",
                          step_epochs=2, gamma=0.5, epochs=4, batch_size=16, progress=False)
    ckpt = torch.load(os.path.join(out, T.CHECKPOINT), weights_only=False)
    assert ckpt["config"]["optimizer"] == optimizer
    assert state_key in next(iter(ckpt["optimizer"]["state"].values()))
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    # step schedule: lr halves every 2 epochs (logged after the epoch's last step)
    assert [h["lr"] for h in res.history] == pytest.approx([lr, lr / 2, lr / 2, lr / 4])


def test_bad_options_raise():
    with pytest.raises(ValueError, match="optimizer"):
        T.train_teacher(_mlp(), _xy(), optimizer="rmsprop", progress=False)
    with pytest.raises(ValueError, match="schedule"):
        T.train_teacher(_mlp(), _xy(), schedule="linear", progress=False)
    with pytest.raises(TypeError, match="epochz"):
        T.train_teacher(_mlp(), _xy(), epochz=3, progress=False)
    xt = TensorDataset(torch.randn(8, D), torch.randn(8, C))
    with pytest.raises(ValueError, match="alpha"):
        T.distill(_student(), xt, alpha=0.5, progress=False)
    with pytest.raises(ValueError, match="loss"):
        T.distill(_student(), xt, loss="l1", progress=False)
    with pytest.raises(ValueError, match="fused"):
        T.distill(_mlp(), xt, fused=True, progress=False)


@pytest.mark.parametrize("soft", ["mse", "kd"])
def test_mixed_loss_logs_soft_and_hard_separately(soft):
    data = _distill_set()
    student = _student()
    init = copy.deepcopy(student)
    alpha = 0.3
    # one batch per epoch: epoch 1's logged values are those of the initial model
    res = T.distill(student, data, loss=soft, alpha=alpha, temperature=2.0, epochs=2, batch_size=N,
                    lr=0.05, progress=False)
    x, t, _, y = data.tensors
    with torch.no_grad():
        s = init(x)
        exp_soft = F.mse_loss(s, t) if soft == "mse" else mf.kd_loss(s, t, 2.0)
        lab = y >= 0
        exp_hard = F.cross_entropy(s[lab], y[lab])
    first = res.history[0]
    assert first["soft_loss"] == pytest.approx(float(exp_soft), rel=1e-5)
    assert first["hard_loss"] == pytest.approx(float(exp_hard), rel=1e-5)
    assert first["loss"] == pytest.approx((1 - alpha) * float(exp_soft) + alpha * float(exp_hard), rel=1e-5)
    assert res.history[1]["loss"] < first["loss"]


def test_soft_only_logs_no_hard_loss():
    res = T.distill(_student(), _distill_set(), epochs=1, batch_size=16, progress=False)
    assert "hard_loss" not in res.final and res.final["soft_loss"] == pytest.approx(res.final["loss"])


def test_fused_path_equals_unfused(monkeypatch):
    data = _distill_set()
    calls = []
    real = mf.nn.WideShallowStudent.mimic_loss

    def spy(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    monkeypatch.setattr(mf.nn.WideShallowStudent, "mimic_loss", spy)
    kw = dict(epochs=2, batch_size=16, lr=0.05, progress=False, alpha=0.25)
    fused = T.distill(_student(), data, fused=None, **kw)
    n_fused = len(calls)
    unfused = T.distill(_student(), data, fused=False, **kw)
    assert n_fused == 2 * (N // 16) and len(calls) == n_fused  # default is fused; fused=False is not
    for hf, hu in zip(fused.history, unfused.history):
        for key in ("loss", "soft_loss", "hard_loss"):
            assert hf[key] == pytest.approx(hu[key], rel=1e-5, abs=1e-7), key
    for k, v in _params(fused.model).items():
        assert_close(v, _params(unfused.model)[k], name=k)


def test_distill_learns_teacher_and_evaluates(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, D, generator=g)
    teacher = nn.Linear(D, C)
    with torch.no_grad():
        t = teacher(x)
    data = TensorDataset(x, t)
    test = TensorDataset(x[:64], t[:64].argmax(-1))
    res = T.distill(_student(64, 8), data, test, epochs=6, batch_size=32, lr=0.2, progress=False,
                    out_dir=str(tmp_path))
    assert res.history[-1]["soft_loss"] < 0.3 * res.history[0]["soft_loss"]
    assert res.final["test_accuracy"] > 0.8
    assert len(_lines(tmp_path / T.METRICS)) == 6


def test_save_and_load_model_roundtrip(tmp_path):
    student = _student()
    spec = {"class": "WideShallowStudent",
            "kwargs": dict(in_features=D, num_classes=C, hidden=32, bottleneck=4)}
    path = tmp_path / "student.pt"
    T.save_model(path, student, spec, note="x")
    loaded, payload = T.load_model(path)
    assert payload["note"] == "x"
    x = torch.randn(5, D)
    assert torch.equal(loaded(x), student(x))


def test_bad_device_is_a_clear_error():
    with pytest.raises(ValueError, match="device must be"):
        default_device("foo")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            T.train_teacher(_mlp(), _xy(), device="cuda", epochs=1, progress=False)
    else:
        with pytest.raises(ValueError, match="does not exist"):
            default_device(f"cuda:{torch.cuda.device_count()}")


def test_resume_with_another_model_size_is_a_clear_error(tmp_path):
    T.distill(_student(hidden=32), _distill_set(), out_dir=str(tmp_path), epochs=1, batch_size=16,
              progress=False)
    with pytest.raises(ValueError, match="does not fit"):
        T.distill(_student(hidden=48), _distill_set(), out_dir=str(tmp_path), resume=True, epochs=1,
                  batch_size=16, progress=False)


def test_load_model_missing_or_foreign_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        T.load_model(tmp_path / "nope.pt")
    (tmp_path / "x.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a mimic_fast model file"):
        T.load_model(tmp_path / "x.pt")


def test_rng_restore_skips_gpus_this_machine_lacks(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, i: calls.append(i))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: calls.extend(range(len(states))))
    state = {"python": __import__("random").getstate(), "numpy": __import__("numpy").random.get_state(),
             "torch": torch.get_rng_state(), "cuda": [torch.zeros(8, dtype=torch.uint8)] * 2}
    T._set_rng_state(state)  # saved on 2 GPUs, restored on 1
    assert calls == [0]
