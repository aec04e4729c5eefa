"""`mimic-fast sweep`: resumable runs, shards, the report, honest comparisons, user npz files.

Tiny grids (widths 8 and 16, 2 epochs) on digits with a small given teacher, so that the sweeps of
this file take seconds; the default sweep's own numbers are in the README (measured separately).
"""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from mimic_fast import cli, sweep
from mimic_fast import train as T
from mimic_fast.data import input_digests, labelled_split, load_dataset, state_hash
from mimic_fast.data.recipe import data_recipe
from mimic_fast.files import read_json, write_json
from mimic_fast.models import DNN

TIMINGS = {"train_s", "train_s_mean", "throughput", "invocation"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(sweep.__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))


def _quiet(*a):
    pass


def _timeless(obj):
    """The report without anything measured in seconds (or the command line of the process)."""
    if isinstance(obj, dict):
        return {k: _timeless(v) for k, v in obj.items() if k not in TIMINGS}
    if isinstance(obj, list):
        return [_timeless(v) for v in obj]
    return obj


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    """A small DNN teacher trained on the sweep's labelled digits rows (split seed 0, 15%)."""
    splits = load_dataset("digits", seed=0)
    X, y = splits.train.tensors
    lab, _ = labelled_split(y, 0.15, 0)
    torch.manual_seed(0)
    model = DNN(64, 10, hidden=(64,), dropout=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the sweep does: two threads on a busy 2-core machine are ~30x slower
    try:
        res = T.train_teacher(model, TensorDataset(X[lab], y[lab]), None, epochs=30, batch_size=32,
                              lr=0.05, progress=False)
    finally:
        torch.set_num_threads(threads)
    path = str(tmp_path_factory.mktemp("teacher") / "teacher.pt")
    spec = {"name": "dnn-2k", "kwargs": {"in_features": 64, "num_classes": 10, "hidden": (64,),
                                         "dropout": 0.0}}
    data = data_recipe(splits, "digits", 0, 0.15)
    T.save_model(path, res.model, spec, data=data)
    return path


def _config(teacher_file, **kw):
    base = dict(teacher=(teacher_file,), hidden=(8, 16), seeds=2, epochs=2, n_generated=200,
                throughput_time=0.01, throughput_batches=(1, 16))
    return sweep.SweepConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def full_run(teacher_file, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sweep-full"))
    return out, sweep.run(_config(teacher_file), out, progress=False, log=_quiet)


def test_shards_partition_the_grid():
    runs = sweep.grid(sweep.SweepConfig(hidden=(8, 16, 32), bottleneck=(4, 8), seeds=3))
    assert len(runs) == len(set(runs)) == 3 * 2 * 3 * 2
    parts = [sweep.shard(runs, f"{i}/4") for i in range(4)]
    assert sorted(r.name for p in parts for r in p) == sorted(r.name for r in runs)
    assert sum(len(p) for p in parts) == len(runs)
    for bad in ("4/4", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ValueError, match="shard"):
            sweep.shard(runs, bad)


def test_full_run_writes_every_point_table_and_figure(full_run):
    out, result = full_run
    assert result["missing"] == []
    points = {(p["hidden"], p["mode"]): p for p in result["points"]}
    assert set(points) == {(h, m) for h in (8, 16) for m in ("labels", "mimic")}
    for p in points.values():
        assert p["seeds"] == [0, 1] and len(p["accuracy"]) == 2
        assert 0 <= p["accuracy_mean"] <= 1 and p["accuracy_std"] >= 0
        assert p["throughput"]["1"] > 0 and p["throughput"]["16"] > 0
    assert points[(8, "labels")]["params"] == 64 * 32 + 32 * 8 + 8 + 8 * 10 + 10
    on_disk = read_json(os.path.join(out, "sweep.json"), "")
    assert on_disk["command"].startswith("mimic-fast sweep ") and "--teacher" in on_disk["command"]
    assert on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["teacher"]["params"] > 0 and 0 < on_disk["teacher"]["test_accuracy"] <= 1
    assert open(os.path.join(out, "sweep.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = open(os.path.join(out, "sweep.md")).read()
    assert "| 32L-8 |" in table and "| 32L-16 |" in table and "by mimicry" in table
    assert "4,000" not in table and "200 generated" in table  # the composition is the real one


def test_honest_comparison_labels_and_mimic_share_everything_but_the_targets(full_run, teacher_file):
    out, result = full_run
    splits = load_dataset("digits", seed=0)
    rows = result["transfer"]["rows"]
    for h in (8, 16):
        for seed in (0, 1):
            folder = os.path.join(out, "points", f"conv0-k32-h{h}")
            lab = read_json(os.path.join(folder, f"labels-seed{seed}", "result.json"), "")
            mim = read_json(os.path.join(folder, f"mimic-seed{seed}", "result.json"), "")
            for key in ("spec", "init_sha256", "steps", "training", "train_rows", "params"):
                assert lab[key] == mim[key], key
            assert lab["steps"] == 2 * math.ceil(rows / 128)  # epochs x batches of the transfer set
            assert lab["training"]["optimizer"] == "adam" and lab["training"]["schedule"] == "cosine"
            # the recorded init hash is the seed's fresh student, and training moved away from it
            torch.manual_seed(seed)
            fresh, _ = sweep._student(sweep.Run(0, 32, h, "labels", seed), sweep.SweepConfig(), splits)
            assert lab["init_sha256"] == state_hash(fresh)
            loaded = [T.load_model(os.path.join(folder, f"{m}-seed{seed}", "student.pt"))
                      for m in ("labels", "mimic")]
            assert len({state_hash(m) for m, _ in loaded} | {lab["init_sha256"]}) == 3
            assert all(p["data"]["label_fraction"] == 0.15 and p["data"]["split_seed"] == 0
                       for _, p in loaded)  # each student.pt records the data recipe it used


def test_a_sweeps_out_is_an_ordinary_pipeline_folder(full_run, tmp_path, capsys):
    """distill --logits OUT trains on a sweep's transfer set and store as on collect-logits' own
    (the one transfer.pt schema: the split and label fraction are inherited from it)."""
    out, result = full_run
    student = str(tmp_path / "student")
    assert cli.main(["distill", "--dataset", "digits", "--logits", out, "--hidden", "16",
                     "--bottleneck", "4", "--epochs", "1", "--batch-size", "128", "--out", student,
                     "--no-progress"]) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "--split-seed 0 (recorded in" in printed and "--label-fraction 0.15 (recorded in" in printed
    model, payload = T.load_model(os.path.join(student, "student.pt"))
    assert payload["transfer"]["n_generated"] == 200 and payload["transfer"]["method"] == "munge"
    assert payload["transfer"]["train_rows"] == payload["data"]["train_rows"]
    # another split than the sweep's is refused, as for any collect-logits folder
    assert cli.main(["distill", "--dataset", "digits", "--logits", out, "--split-seed", "1",
                     "--out", str(tmp_path / "s1"), "--epochs", "1", "--no-progress"]) == 2
    assert "made from another data recipe (split_seed: 0 in" in capsys.readouterr().err


def test_the_test_split_never_enters_the_transfer_set(full_run):
    out, result = full_run
    splits = load_dataset("digits", seed=0)
    saved = torch.load(os.path.join(out, "transfer.pt"), weights_only=False)
    X_train, X_test = splits.train.tensors[0], splits.test.tensors[0]
    test = input_digests(splits.test)
    assert not np.isin(input_digests(TensorDataset(saved["x"])), test).any()
    assert result["transfer"]["test_rows"] == 0
    # the non-generated rows are exactly the training split, each once
    real = saved["x"][saved["sources"] < 2]
    assert len(real) == len(X_train)
    assert sorted(map(bytes, real.numpy())) == sorted(map(bytes, X_train.numpy()))
    assert result["transfer"]["composition"] == {"labelled": 216, "unlabelled": 1221, "generated": 200}
    # the check does count rows it is given
    mixed = TensorDataset(torch.cat([saved["x"][:5], X_test[3:5]]))
    assert np.isin(input_digests(mixed), test).sum() == 2


def test_killed_sweep_resumes_to_the_same_report(full_run, teacher_file, tmp_path, monkeypatch):
    out = str(tmp_path / "sweep")
    calls = {"n": 0}
    append = T._append_metrics

    def dies_on_third_epoch(out_dir, line):
        append(out_dir, line)  # the checkpoint of this epoch is already written
        calls["n"] += 1
        if calls["n"] == 3:  # run 1 done (2 epochs), run 2 stopped after its first epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(T, "_append_metrics", dies_on_third_epoch)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(_config(teacher_file), out, progress=False, log=_quiet)
    epochs_after = {"n": 0}

    def counts(out_dir, line):
        append(out_dir, line)
        epochs_after["n"] += 1

    monkeypatch.setattr(T, "_append_metrics", counts)
    points = os.path.join(out, "points", "conv0-k32-h8")
    assert os.path.isfile(os.path.join(points, "labels-seed0", "result.json"))
    assert os.path.isfile(os.path.join(points, "mimic-seed0", T.CHECKPOINT))
    assert not os.path.exists(os.path.join(points, "mimic-seed0", "result.json"))
    resumed = sweep.run(_config(teacher_file), out, progress=False, log=_quiet)
    assert _timeless(resumed) == _timeless(full_run[1])
    assert epochs_after["n"] == 8 * 2 - 3  # nothing done before the kill was trained again
    history = [json.loads(line) for line in open(os.path.join(points, "mimic-seed0", T.METRICS))]
    assert [h["epoch"] for h in history] == [1, 2]


def test_shards_together_equal_one_run(full_run, teacher_file, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    first = sweep.run(_config(teacher_file), out, "0/3", progress=False, log=_quiet)
    assert len(first["missing"]) == 8 - 3
    sweep.run(_config(teacher_file), out, "1/3", progress=False, log=_quiet)
    sweep.run(_config(teacher_file), out, "2/3", progress=False, log=_quiet)
    assert cli.main(["sweep", "--report", "--out", out]) == 0
    gathered = read_json(os.path.join(out, "sweep.json"), "")
    assert gathered["missing"] == []
    assert _timeless(gathered) == _timeless(full_run[1])
    assert "| 32L-16 |" in capsys.readouterr().out


def test_changed_recipe_or_unfair_runs_are_refused(full_run, teacher_file, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    sweep.run(_config(teacher_file, hidden=(8,), seeds=1), out, progress=False, log=_quiet)
    argv = ["sweep", "--out", out, "--teacher", teacher_file, "--hidden", "8", "--seeds", "1",
            "--epochs", "2", "--n-generated", "200", "--no-progress"]
    assert cli.main(argv + ["--lr", "0.01"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimic-fast sweep: error:") and "lr 0.001 -> 0.01" in err
    assert len(err.splitlines()) == 1
    # other timed batch sizes would leave earlier runs without a figure for them (a KeyError in the
    # report): refused like the recipe
    assert cli.main(argv + ["--throughput-batches", "1,64"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimic-fast sweep: error:") and "throughput_batches" in err, err
    # a hand-made sweep-config.json (consistent with its sha256) is refused on the sweep's path too,
    # not only by --report (its grid was read with int() before anything checked it)
    config_path = os.path.join(out, sweep.CONFIG_NAME)
    good = read_json(config_path, "")
    for bad_hidden in ([None], "8"):
        write_json(config_path, {**good, "config": {**good["config"], "hidden": bad_hidden}})
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mimic-fast sweep: error:") and "not a valid sweep file" in err, err
        assert len(err.splitlines()) == 1
    write_json(config_path, good)
    # a result whose mimic run took other steps than its labels run cannot enter a report
    path = os.path.join(out, "points", "conv0-k32-h8", "mimic-seed0", "result.json")
    result = read_json(path, "")
    result["steps"] += 1
    write_json(path, result)  # consistent with its checksum, but unfair
    assert cli.main(["sweep", "--report", "--out", out]) == 2
    assert "differ in steps" in capsys.readouterr().err
    assert cli.main(["sweep", "--report", "--out", str(tmp_path / "nothing")]) == 2
    assert "no sweep in" in capsys.readouterr().err
    assert cli.main(["sweep", "--out", out, "--shard", "2/2"]) == 2
    assert "shard" in capsys.readouterr().err


def test_precision_is_part_of_the_recipe_and_recorded(teacher_file, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    result = sweep.run(_config(teacher_file, hidden=(8,), seeds=1, precision="bf16"), out,
                       progress=False, log=_quiet)
    assert result["training"]["precision"] == "bf16" and result["teacher"]["precision"] == "bf16"
    for mode in ("labels", "mimic"):
        run = read_json(os.path.join(out, "points", "conv0-k32-h8", f"{mode}-seed0", "result.json"), "")
        assert run["precision"] == run["training"]["precision"] == "bf16"
        assert [json.loads(line)["precision"] for line in
                open(os.path.join(out, "points", "conv0-k32-h8", f"{mode}-seed0", T.METRICS))] == \
            ["bf16", "bf16"]
    assert "precision bf16" in open(os.path.join(out, "sweep.md")).read()
    assert "--precision bf16" in result["command"]
    # another precision on the same OUT would mix two kinds of runs in one report: refused
    argv = ["sweep", "--out", out, "--teacher", teacher_file, "--hidden", "8", "--seeds", "1",
            "--epochs", "2", "--n-generated", "200", "--no-progress"]
    assert cli.main(argv) == 2
    assert "precision 'bf16' -> 'fp32'" in capsys.readouterr().err


def test_teacher_of_another_recipe_is_refused_and_unset_options_inherit_its_own(teacher_file,
                                                                                 tmp_path):
    with pytest.raises(ValueError, match="split_seed: 0 in .*teacher.pt, 1 here"):
        sweep.run(_config(teacher_file, split_seed=1), str(tmp_path / "s"), progress=False, log=_quiet)
    with pytest.raises(ValueError, match="label_fraction: 0.15 in .*teacher.pt, 0.5 here"):
        sweep.run(_config(teacher_file, label_fraction=0.5), str(tmp_path / "s"), progress=False,
                  log=_quiet)
    assert not os.path.exists(str(tmp_path / "s" / "transfer.pt"))  # refused before writing
    model, payload = T.load_model(teacher_file)
    other = str(tmp_path / "t30.pt")
    T.save_model(other, model, payload["spec"],
                 data=data_recipe(load_dataset("digits", seed=2), "digits", 2, 0.3))
    cfg = sweep.SweepConfig(teacher=(other,)).resolved()
    assert (cfg.split_seed, cfg.label_fraction) == (2, 0.3)
    assert sweep.command_line(cfg) == f"mimic-fast sweep --teacher {other}"


def _blobs(n, g, centres):
    y = torch.randint(0, len(centres), (n,), generator=g)
    return (centres[y] + 0.7 * torch.randn(n, centres.shape[1], generator=g)).numpy(), y.numpy()


def test_sweep_on_a_user_npz_trains_its_own_teacher(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(3, 12, generator=g)
    X, y = _blobs(240, g, centres)
    X_test, y_test = _blobs(90, g, centres)
    X_unl, _ = _blobs(120, g, centres)
    path = str(tmp_path / "mine.npz")
    np.savez(path, X=X, y=y, X_test=X_test, y_test=y_test, X_unlabelled=X_unl)
    out = str(tmp_path / "sweep")
    argv = ["sweep", "--dataset", "npz", "--data", path, "--train-teacher", "--teacher-members", "2",
            "--teacher-epochs", "3", "--hidden", "8,32", "--seeds", "1", "--epochs", "1",
            "--n-generated", "60", "--throughput-time", "0.01", "--out", out, "--no-progress"]
    assert cli.main(argv) == 0
    result = read_json(os.path.join(out, "sweep.json"), "")
    assert result["data"]["dataset"] == "npz" and result["data"]["label_fraction"] == 1.0
    assert result["transfer"]["composition"] == {"labelled": 240, "unlabelled": 120, "generated": 60}
    assert result["transfer"]["test_rows"] == 0
    assert result["teacher"]["kind"] == "trained" and result["teacher"]["members"] == 2
    assert result["teacher"]["spec"]["members"][0]["name"] == "dnn-2k"  # flat rows: a DNN teacher
    assert len(result["teacher"]["member_accuracy"]) == 2
    assert {(p["hidden"], p["mode"]) for p in result["points"]} == {
        (h, m) for h in (8, 32) for m in ("labels", "mimic")}
    assert all(p["params"] == 12 * 32 + 32 * p["hidden"] + p["hidden"] + p["hidden"] * 3 + 3
               for p in result["points"])
    assert "--dataset npz" in result["command"] and "mine.npz" in result["command"]
    # its teacher members are ordinary teacher.pt files, and OUT an ordinary collect-logits folder
    member = os.path.join(out, "teacher", "member-0", "teacher.pt")
    capsys.readouterr()
    assert cli.main(["collect-logits", "--dataset", "npz", "--data", path, "--teacher", member,
                     "--out", str(tmp_path / "c"), "--no-progress"]) == 0, capsys.readouterr().err
    assert "--label-fraction 1.0 (recorded in" in capsys.readouterr().out
    assert cli.main(["distill", "--dataset", "npz", "--data", path, "--logits", out, "--hidden", "8",
                     "--bottleneck", "2", "--epochs", "1", "--out", str(tmp_path / "s"),
                     "--no-progress"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    # a file whose unlabelled rows repeat test rows is refused: they would leak into the transfer set
    bad = str(tmp_path / "leaky.npz")
    np.savez(bad, X=X, y=y, X_test=X_test, y_test=y_test, X_unlabelled=np.concatenate([X_unl, X_test[:4]]))
    assert cli.main([*argv[:4], bad, *argv[5:-3], "--out", str(tmp_path / "leak"), "--no-progress"]) == 2
    assert "4 rows of the transfer set are test rows (first: row 360, from the training split (X) " \
           "or X_unlabelled)" in capsys.readouterr().err
    assert not os.path.exists(str(tmp_path / "leak" / "transfer.pt"))  # nothing kept from it


def test_sweep_help(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["sweep", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: mimic-fast sweep" in out and "--shard" in out and "--report" in out


def test_conv_students_on_images_with_an_ensemble_teacher(teacher_file, tmp_path):
    cfg = _config(teacher_file, hidden=(8, 8), conv_layers=(1,), conv_channels=4, seeds=1, epochs=1,
                  teacher=(teacher_file, teacher_file))
    result = sweep.run(cfg, str(tmp_path / "s"), progress=False, log=_quiet)
    single = T.load_model(teacher_file)[0]
    assert result["teacher"]["members"] == 2 and result["teacher"]["kind"] == "checkpoint"
    assert result["teacher"]["params"] == 2 * sum(p.numel() for p in single.parameters())
    assert [(p["point"], p["mode"]) for p in result["points"]] == [
        ("conv1-k32-h8", "labels"), ("conv1-k32-h8", "mimic")]
    # conv 3x3 (1 -> 4 channels), pool 2: 4 x 4 x 4 = 64 features into the 32L-8 head
    assert result["points"][0]["params"] == (9 * 4 + 4) + 64 * 32 + 32 * 8 + 8 + 8 * 10 + 10


def test_command_line_round_trips(teacher_file):
    cfg = _config(teacher_file, teacher_channels=(4, 8), label_fraction=0.3, conv_layers=(0, 1),
                  lr=0.002, precision="bf16").resolved()
    line = sweep.command_line(cfg)
    parser = cli.build_parser()
    args = parser.parse_args(shlex.split(line)[1:])
    assert sweep.config_from_args(args).resolved() == cfg


def test_config_recipe_excludes_only_placement():
    cfg = sweep.SweepConfig().resolved()
    assert cfg.label_fraction == 0.15
    assert replace(cfg, hidden=(1,), seeds=5, device="cpu").recipe() == cfg.recipe()
    assert replace(cfg, lr=0.5).recipe() != cfg.recipe()
    assert sweep.command_line(cfg) == "mimic-fast sweep"


def test_data_rewritten_under_the_same_path_is_refused_not_mixed(tmp_path, capsys):
    """The npz rewritten in place: the old transfer set, teacher member, teacher.json and finished
    runs were made from other rows and must not be reused (the options name the data by path)."""
    g = torch.Generator().manual_seed(0)
    centres = 2 * torch.randn(3, 12, generator=g)
    path, out = str(tmp_path / "sw.npz"), str(tmp_path / "SW")

    def write():
        X, y = _blobs(120, g, centres)
        X_test, y_test = _blobs(40, g, centres)
        np.savez(path, X=X, y=y, X_test=X_test, y_test=y_test)

    argv = ["sweep", "--dataset", "npz", "--data", path, "--seeds", "1", "--epochs", "1",
            "--teacher-members", "1", "--teacher-epochs", "2", "--n-generated", "20",
            "--throughput-time", "0.01", "--out", out, "--no-progress"]
    write()
    assert cli.main(argv + ["--hidden", "8"]) == 0
    write()  # new X, X_test and y_test under the same name
    capsys.readouterr()
    assert cli.main(argv + ["--hidden", "8,16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimic-fast sweep: error:") and len(err.splitlines()) == 1
    assert "sweep-config.json was made from another data recipe" in err and "train_rows" in err
    assert "test_rows" in err and "the data changed" in err
    assert not os.path.isdir(os.path.join(out, "points", "conv0-k32-h16"))  # nothing trained
    # each reused file is checked by itself too: without the config, transfer.pt refuses ...
    os.remove(os.path.join(out, sweep.CONFIG_NAME))
    assert cli.main(argv + ["--hidden", "8"]) == 2
    assert "transfer.pt was made from another data recipe" in capsys.readouterr().err
    # ... and without it, the teacher member trained on the old rows
    os.remove(os.path.join(out, "transfer.pt"))
    assert cli.main(argv + ["--hidden", "8"]) == 2
    assert "member-0/teacher.pt was made from another data recipe" in capsys.readouterr().err


def test_damaged_files_of_a_sweep_are_named(teacher_file, tmp_path, capsys):
    out = str(tmp_path / "sweep")
    sweep.run(_config(teacher_file, hidden=(8,), seeds=1), out, progress=False, log=_quiet)
    argv = ["sweep", "--out", out, "--teacher", teacher_file, "--hidden", "8", "--seeds", "1",
            "--epochs", "2", "--n-generated", "200", "--throughput-batches", "1,16", "--no-progress"]
    result = os.path.join(out, "points", "conv0-k32-h8", "mimic-seed0", "result.json")
    for damaged, remedy in ((result, "delete its folder"),
                            (os.path.join(out, "teacher.json"), "delete it"),
                            (os.path.join(out, sweep.CONFIG_NAME), "use another --out")):
        good = open(damaged).read()
        open(damaged, "w").write(good[: len(good) // 2])
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("mimic-fast sweep: error:") and len(err.splitlines()) == 1
        assert f"{damaged} is damaged" in err and remedy in err
        open(damaged, "w").write(good)
    transfer = os.path.join(out, "transfer.pt")
    good = open(transfer, "rb").read()
    open(transfer, "wb").write(good[: len(good) // 2])  # truncated: no torch traceback
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimic-fast sweep: error:") and f"{transfer} is not a" in err
    assert len(err.splitlines()) == 1


def test_a_changed_teacher_file_says_what_sweep_can_do(teacher_file, tmp_path, capsys):
    mine = str(tmp_path / "teacher.pt")
    model, payload = T.load_model(teacher_file)
    T.save_model(mine, model, payload["spec"], data=payload["data"])
    out = str(tmp_path / "sweep")
    sweep.run(_config(mine, hidden=(8,), seeds=1), out, progress=False, log=_quiet)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # retrained under the same name
    T.save_model(mine, model, payload["spec"], data=payload["data"])
    assert cli.main(["sweep", "--out", out, "--teacher", mine, "--hidden", "8", "--seeds", "1",
                     "--epochs", "2", "--n-generated", "200", "--throughput-batches", "1,16",
                     "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "was made with teacher" in err and f"delete {os.path.join(out, 'logits')}" in err
    assert "--overwrite" not in err and "overwrite=True" not in err  # sweep has neither
    # done as told: the finished mimic run trained on the old logits and is not mixed in
    old = read_json(os.path.join(out, "points", "conv0-k32-h8", "mimic-seed0", "result.json"), "")
    shutil.rmtree(os.path.join(out, "logits"))
    argv = ["sweep", "--out", out, "--teacher", mine, "--hidden", "8", "--seeds", "1", "--epochs",
            "2", "--n-generated", "200", "--throughput-batches", "1,16", "--no-progress"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimic-fast sweep: error:") and len(err.splitlines()) == 1
    assert f"was trained on logit store sha256 {old['inputs']['logit_store']}" in err
    assert f"delete {out}/points" in err
    shutil.rmtree(os.path.join(out, "points"))
    assert cli.main(argv) == 0


def test_two_grids_on_one_out_record_a_command_that_reproduces_every_point(teacher_file, tmp_path,
                                                                           capsys):
    """Issue 20: a second sweep with another grid on the same --out recorded only its own grid, so
    its command could not reproduce the report's points. The recorded grid is now the union."""
    out = str(tmp_path / "sweep")
    sweep.run(_config(teacher_file, hidden=(8,), seeds=1), out, progress=False, log=_quiet)
    result = sweep.run(_config(teacher_file, hidden=(16,), bottleneck=(32,), seeds=2), out,
                       progress=False, log=_quiet)
    assert {p["hidden"] for p in result["points"]} == {8, 16}
    assert result["config"]["hidden"] == [8, 16] and result["config"]["seeds"] == 2
    assert "--hidden 8,16" in result["command"] and "--seeds" not in result["command"]
    assert result["missing"] == ["conv0-k32-h8/labels-seed1", "conv0-k32-h8/mimic-seed1"]
    # the recorded command is the union's: it trains the missing runs and reproduces every point
    args = cli.build_parser().parse_args(shlex.split(result["command"])[1:])
    assert sweep.config_from_args(args).resolved() == sweep.SweepConfig(
        **{**_config(teacher_file).__dict__, "hidden": (8, 16), "seeds": 2}).resolved()
    again = sweep.run(sweep.config_from_args(args), out, progress=False, log=_quiet)
    assert again["missing"] == [] and again["command"] == result["command"]


def test_parallel_shards_on_one_out_never_collide(teacher_file, tmp_path):
    """Issue 20: `sweep --shard 0/2 & sweep --shard 1/2` on one --out failed one shard in 2 of 4
    tries (one shard's temp file of sweep.png removed by the other's orphan clean-up, and the report
    written by both at once). Two tries, each two processes started together on a one-point grid
    (one run each: they finish and write the report together); the clean-up's own rule is tested
    deterministically in test_train_integrity."""
    argv = ["-m", "mimic_fast", "sweep", "--teacher", teacher_file, "--hidden", "8", "--seeds",
            "1", "--epochs", "1", "--n-generated", "0", "--throughput-time", "0.01",
            "--throughput-batches", "1", "--no-progress"]
    for attempt in range(2):
        out = str(tmp_path / f"try{attempt}")
        procs = [subprocess.Popen([sys.executable, *argv, "--out", out, "--shard", f"{i}/2"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=ENV) for i in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-2000:]
        report = read_json(os.path.join(out, "sweep.json"), "")
        assert report["missing"] == [] and len(report["points"]) == 2
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def test_the_figures_right_panel_has_a_legend_and_width_labels(full_run):
    """Issue 20: the right panel (accuracy vs inference speed) had neither a legend nor H labels."""
    import matplotlib.pyplot as plt

    from mimic_fast import sweep_report

    fig = sweep_report.figure(full_run[1])
    try:
        left, right = fig.axes
        for ax in (left, right):
            assert ax.get_legend() is not None
            assert [t.get_text() for t in ax.get_legend().get_texts() if "mimicry" in t.get_text()]
            assert {t.get_text() for t in ax.texts} >= {"H=8", "H=16"}
            if ax.get_ylim()[0] > 0:
                assert "axis from" in ax.get_ylabel()
    finally:
        plt.close(fig)
