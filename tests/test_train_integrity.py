"""Training runs that must not succeed silently: divergence to NaN, nonsense hyper-parameters,
resumes that claim a change they do not make, damaged checkpoints, two writers, orphaned temp files."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import mimic_fast as mf
from mimic_fast import train as T
from mimic_fast._io import LockedError

REPO = str(Path(__file__).resolve().parents[1])
D, C, N = 8, 3, 64


def _xy(n=N):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, D, generator=g)
    return TensorDataset(x, (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long())


def _mlp():
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, C))


def _distill_set(n=N, scale=2.0):
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, D, generator=g), torch.randn(n, C, generator=g) * scale)


def _student():
    torch.manual_seed(3)
    return mf.nn.WideShallowStudent(D, C, hidden=32, bottleneck=4)


def _params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_params(a, b):
    pa, pb = _params(a), _params(b)
    return all(torch.equal(pa[k], pb[k]) for k in pa)


def _no_time(history):
    return [{k: v for k, v in h.items() if k != "time"} for h in history]


def _ckpt(out):
    return torch.load(os.path.join(out, T.CHECKPOINT), weights_only=False)


KW = dict(batch_size=16, progress=False)


# ------------------------------------------------------------------------------ divergence

def test_divergence_stops_before_anything_is_written(tmp_path):
    out = str(tmp_path / "run")
    with pytest.raises(FloatingPointError, match=r"diverged: the loss is (nan|inf) at epoch 1, step \d+ "
                                                 r"of 4 .*nothing was written"):
        T.distill(_student(), _distill_set(scale=1e3), out_dir=out, epochs=3, lr=5.0, **KW)
    assert not os.path.exists(os.path.join(out, T.CHECKPOINT))
    assert not os.path.exists(os.path.join(out, T.METRICS))  # not even the empty file it started


def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real = T._DistillObjective.forward

    def nan_in_epoch_2(self, x, t, y=None):
        loss, stats = real(self, x, t, y)
        nan_in_epoch_2.calls += 1
        return (loss * float("nan") if nan_in_epoch_2.calls == 4 + 3 else loss), stats
    nan_in_epoch_2.calls = 0
    monkeypatch.setattr(T._DistillObjective, "forward", nan_in_epoch_2)
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, step 3 of 4 \(global step 7\)"
                                                 r".*checkpoint of epoch 1 .* is kept"):
        T.distill(_student(), _distill_set(), out_dir=out, epochs=3, **KW)
    assert _ckpt(out)["epoch"] == 1
    assert [json.loads(line)["epoch"] for line in open(os.path.join(out, T.METRICS))] == [1]


def test_one_default_lr_for_python_and_cli(tmp_path):
    from mimic_fast import cli

    parser = cli.build_parser()
    for command, kind in (("distill", "distill"), ("train-teacher", "teacher")):
        sub = parser._subparsers._group_actions[0].choices[command]
        assert sub.get_default("lr") is None  # resolved by train.DEFAULT_LR, not a second copy
    T.distill(_student(), _distill_set(), out_dir=str(tmp_path / "d"), epochs=1, **KW)
    T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path / "t"), epochs=1, **KW)
    assert _ckpt(tmp_path / "d")["config"]["lr"] == T.DEFAULT_LR["distill"] == 0.01
    assert _ckpt(tmp_path / "t")["config"]["lr"] == T.DEFAULT_LR["teacher"] == 0.05


def test_metrics_are_valid_json_lines(tmp_path):
    empty_test = TensorDataset(torch.zeros(0, D), torch.zeros(0, dtype=torch.long))
    T.train_teacher(_mlp(), _xy(), empty_test, out_dir=str(tmp_path), epochs=2, **KW)

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")
    lines = [json.loads(line, parse_constant=refuse) for line in open(tmp_path / T.METRICS)]
    assert [line["test_accuracy"] for line in lines] == [None, None]  # accuracy of no rows: null


@pytest.mark.parametrize("option,value,message", [
    ("momentum", 5.0, r"momentum must be in \[0, 1\)"), ("momentum", -0.1, "momentum"),
    ("gamma", -0.5, r"gamma must be in \(0, 1\]"), ("grad_clip", -1.0, "grad_clip must be >= 0"),
    ("step_epochs", -2, "step_epochs must be an int >= 0"), ("weight_decay", -1e-4, "weight_decay"),
    ("lr", float("nan"), "lr must be a finite number"), ("lr", 0.0, "lr must be > 0"),
    ("num_workers", -1, "num_workers"), ("seed", 1.5, "seed must be an int"),
])
def test_nonsense_hyperparameters_are_refused(tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), epochs=1, **{option: value}, **KW)
    assert not os.path.exists(tmp_path / T.CHECKPOINT)


def test_unknown_backend_is_refused_at_construction():
    with pytest.raises(ValueError, match="unknown backend 'cuda2'"):
        mf.nn.WideShallowStudent(D, C, hidden=8, bottleneck=2, backend="cuda2")


# ------------------------------------------------------------------------------ honest resume

def test_resume_applies_changed_lr_momentum_and_weight_decay(tmp_path):
    out = str(tmp_path / "run")
    base = dict(epochs=2, lr=0.1, schedule="none", **KW)
    T.train_teacher(_mlp(), _xy(), out_dir=out, **base)
    kept = T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path / "ref"), **{**base, "epochs": 3})
    with pytest.warns(UserWarning, match=r"lr 0.1 -> 0.02; momentum 0.9 -> 0.0; weight_decay 0.0 -> 0.01"):
        res = T.train_teacher(_mlp(), _xy(), out_dir=out, resume=True,
                              **{**base, "epochs": 3, "lr": 0.02, "momentum": 0.0, "weight_decay": 0.01})
    group = _ckpt(out)["optimizer"]["param_groups"][0]
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"]) == (0.02, 0.0, 0.01,
                                                                                        False)
    assert res.history[2]["lr"] == 0.02 and res.history[1]["lr"] == 0.1
    assert not _same_params(res.model, kept.model)  # the change did something
    assert _ckpt(out)["resumes"] == [{"epoch": 2, "changed": {"epochs": [2, 3], "lr": [0.1, 0.02],
                                                              "momentum": [0.9, 0.0],
                                                              "weight_decay": [0.0, 0.01]}}]


@pytest.mark.parametrize("schedule", [dict(schedule="none"),
                                      dict(schedule="step", step_epochs=1, gamma=0.5)])
def test_longer_epochs_on_resume_equals_an_uninterrupted_run(tmp_path, schedule):
    kw = dict(lr=0.1, optimizer="adam", **schedule, **KW)
    full = T.distill(_student(), _distill_set(), out_dir=str(tmp_path / "full"), epochs=4, **kw)
    T.distill(_student(), _distill_set(), out_dir=str(tmp_path / "b"), epochs=2, **kw)
    with pytest.warns(UserWarning, match="epochs 2 -> 4"):
        longer = T.distill(_student(), _distill_set(), out_dir=str(tmp_path / "b"), epochs=4,
                           resume=True, **kw)
    assert _same_params(full.model, longer.model)
    assert _no_time(full.history) == _no_time(longer.history)


def test_longer_cosine_run_follows_the_new_schedule_and_never_rises_past_its_end(tmp_path):
    kw = dict(lr=0.1, **KW)
    full = T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path / "full"), epochs=4, **kw)
    short = T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path / "b"), epochs=2, **kw)
    assert short.history[-1]["lr"] == 0.0  # the 2-epoch cosine ends at 0
    with pytest.warns(UserWarning, match=r"cosine schedule is rebuilt for 4 epochs: epochs 3\.\. follow "
                                         r"it, epochs 1\.\.2 followed the 2-epoch one"):
        longer = T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path / "b"), epochs=4, resume=True, **kw)
    assert [h["lr"] for h in longer.history[2:]] == [h["lr"] for h in full.history[2:]]
    assert T.lr_factor("cosine", 50, 40) == 0.0  # past its end the schedule stays at 0


@pytest.mark.parametrize("change,listed", [
    (dict(batch_size=32), "batch_size 16 -> 32"), (dict(schedule="step"), "schedule 'cosine' -> 'step'"),
    (dict(optimizer="adam"), "optimizer 'sgd' -> 'adam'"), (dict(seed=4), "seed 0 -> 4"),
    (dict(batch_size=32, gamma=0.5), "batch_size, gamma"),
])
def test_resume_refuses_changes_it_cannot_apply(tmp_path, change, listed):
    out = str(tmp_path / "run")
    T.train_teacher(_mlp(), _xy(), out_dir=out, epochs=1, **KW)
    before = open(os.path.join(out, T.CHECKPOINT), "rb").read()
    with pytest.raises(ValueError, match=f"cannot resume .*{listed}"):
        T.train_teacher(_mlp(), _xy(), out_dir=out, resume=True, epochs=2, **{**KW, **change})
    assert open(os.path.join(out, T.CHECKPOINT), "rb").read() == before


def test_resume_refuses_another_data_recipe_or_model_spec(tmp_path):
    recipe = {"dataset": "digits", "split_seed": 0, "label_fraction": 0.2, "train_rows": "a",
              "test_rows": "b", "data": "/old/place"}
    spec = {"name": "dnn-2k", "kwargs": {"dropout": 0.1}}
    T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), epochs=1, data=recipe, spec=spec, **KW)
    with pytest.raises(ValueError, match=r"data split_seed 0 -> 3, data test_rows 'b' -> 'c'"):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), resume=True, epochs=2, spec=spec,
                        data={**recipe, "split_seed": 3, "test_rows": "c"}, **KW)
    with pytest.raises(ValueError, match="model spec"):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), resume=True, epochs=2, data=recipe,
                        spec={"name": "dnn-2k", "kwargs": {"dropout": 0.5}}, **KW)
    # the same rows read from a moved file resume (the change is recorded)
    with pytest.warns(UserWarning, match="data"):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), resume=True, epochs=2, spec=spec,
                        data={**recipe, "data": "/new/place"}, **KW)


def test_resume_with_fewer_epochs_than_done_is_refused(tmp_path):
    T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), epochs=2, **KW)
    with pytest.raises(ValueError, match="2 epochs done but epochs=1"):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), resume=True, epochs=1, **KW)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_checkpoint_is_a_clear_error(tmp_path, damage):
    path = tmp_path / T.CHECKPOINT
    T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), epochs=1, **KW)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(b"\x80\x02garbage" * 10)
    else:
        torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match=f"{path}.*(truncated or damaged|not a mimic_fast training "
                                         "checkpoint)"):
        T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), resume=True, epochs=2, **KW)


# ------------------------------------------------------------------------------ writers and temp files

HOLDER = textwrap.dedent("""
    import sys, time
    from mimic_fast._io import writer_lock
    with writer_lock(sys.argv[1], "run folder"):
        print("held", flush=True)
        time.sleep(60)
""")


def test_second_training_run_in_the_same_folder_is_refused(tmp_path):
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"held\n"
        with pytest.raises(LockedError, match=f"pid {proc.pid}"):
            T.train_teacher(_mlp(), _xy(), out_dir=str(out), epochs=1, **KW)
        assert not os.path.exists(out / T.CHECKPOINT)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while True:  # the killed holder's lock is released by the OS: the run now goes ahead
        try:
            T.train_teacher(_mlp(), _xy(), out_dir=str(out), epochs=1, **KW)
            break
        except LockedError:
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert os.path.exists(out / T.CHECKPOINT)


def test_orphaned_temp_files_are_removed_by_the_next_write(tmp_path):
    orphan = tmp_path / f".{T.CHECKPOINT}.k1ll3d.tmp"  # what a kill between write and rename leaves
    orphan.write_bytes(b"x" * 1000)
    other = tmp_path / ".notes.txt.abc.tmp"  # another file's temp: not ours to remove
    other.write_bytes(b"y")
    T.train_teacher(_mlp(), _xy(), out_dir=str(tmp_path), epochs=1, **KW)
    assert not orphan.exists() and other.exists()
    assert not [f for f in os.listdir(tmp_path) if f.startswith(f".{T.CHECKPOINT}.")]


def test_a_live_writers_temp_file_is_never_removed_a_dead_ones_is(tmp_path):
    """Issue 20: sweep shards writing sweep.png together failed because one's orphan clean-up
    removed the other's temp file mid-write. Temp names carry the writer's pid: only those of
    processes that are gone (and of older versions, which carried none) are orphans."""
    import mimic_fast._io as io_

    target = tmp_path / "sweep.png"
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    try:
        mine = tmp_path / f".sweep.png.{live.pid}-{io_._HOST}.ab12_cd3.tmp"  # a shard writing it
        gone = tmp_path / f".sweep.png.{dead.pid}-{io_._HOST}.zz99_xy1.tmp"  # a killed shard's
        away = tmp_path / f".sweep.png.{dead.pid}-0123abcd.qq11_rr2.tmp"  # another host's: unknown
        other = tmp_path / f".sweep.png.json.{dead.pid}-{io_._HOST}.aa00_bb1.tmp"  # another file's
        for p in (mine, gone, away, other):
            p.write_bytes(b"partial")
        io_.atomic_write_bytes(target, lambda f: f.write(b"png"))
        assert target.read_bytes() == b"png"
        assert mine.exists() and away.exists() and other.exists() and not gone.exists()
    finally:
        live.kill()
        live.wait()


def test_a_temp_files_owner_is_named_by_host_and_pid_namespace(monkeypatch):
    """Two containers sharing a folder under one host name number their processes apart: a pid
    from another PID namespace must not be judged dead (its temp removed mid-write) by ours."""
    import mimic_fast._io as io_

    monkeypatch.setattr(io_.os, "readlink", lambda p: "pid:[4026531836]")
    here = io_._host_id()
    monkeypatch.setattr(io_.os, "readlink", lambda p: "pid:[4026532999]")
    assert io_._host_id() != here  # another namespace: its temps are kept, as another host's

    def no_procfs(p):
        raise FileNotFoundError(p)
    monkeypatch.setattr(io_.os, "readlink", no_procfs)
    assert len(io_._host_id()) == 8  # no procfs: the host name alone, still a valid owner id
