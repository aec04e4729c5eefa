"""The pipeline commands refuse mistakes that used to pass silently (another split seed or label
fraction, test rows in the transfer set) and turn every user-side failure into one error line."""
import errno
import os
import shutil

import numpy as np
import pytest
import torch

import mimic_fast as mf
from mimic_fast import cli
from mimic_fast.files import load_transfer, save_transfer

DATA = ["--dataset", "digits", "--label-fraction", "0.2"]
FAST = ["--epochs", "1", "--no-progress"]


def _run(capsys, *argv):
    """(exit code, the stderr text) of one command; asserts it printed no traceback."""
    code = cli.main(list(argv))
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny teacher (split seed 0, 20% labelled) and its logits, made once for this module."""
    root = tmp_path_factory.mktemp("pipeline")
    teacher, logits = str(root / "teacher"), str(root / "logits")
    assert cli.main(["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "16", "--out", teacher,
                     "--batch-size", "64", *FAST]) == 0
    assert cli.main(["collect-logits", *DATA, "--teacher", os.path.join(teacher, "teacher.pt"),
                     "--out", logits, "--dtype", "float32", "--no-progress"]) == 0
    return root, os.path.join(teacher, "teacher.pt"), logits


def _distill(logits, out, *extra):
    return ["distill", "--dataset", "digits", "--logits", logits, "--hidden", "16", "--bottleneck", "4",
            "--out", str(out), "--batch-size", "128", *FAST, *extra]


def test_distill_refuses_another_split_seed_or_label_fraction(pipeline, tmp_path, capsys):
    _, _, logits = pipeline
    code, err = _run(capsys, *_distill(logits, tmp_path / "a", "--split-seed", "3"))
    assert code == 2 and "split_seed: 0 in" in err and "3 here" in err
    assert "test_rows" in err  # seed 3 has another test split: its rows would be trained on
    code, err = _run(capsys, *_distill(logits, tmp_path / "b", "--label-fraction", "0.5"))
    assert code == 2 and "label_fraction: 0.2 in" in err and "0.5 here" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    # left unset, both are inherited, and student.pt records what was used
    code, _ = _run(capsys, *_distill(logits, tmp_path / "c"))
    assert code == 0
    _, payload = mf.train.load_model(str(tmp_path / "c" / "student.pt"))
    assert payload["data"]["split_seed"] == 0 and payload["data"]["label_fraction"] == 0.2


def test_collect_logits_refuses_a_split_the_teacher_was_not_trained_on(pipeline, tmp_path, capsys):
    _, teacher, _ = pipeline
    code, err = _run(capsys, "collect-logits", "--dataset", "digits", "--split-seed", "5",
                     "--teacher", teacher, "--out", str(tmp_path / "c"), "--no-progress")
    assert code == 2 and "split_seed: 0 in" in err and "5 here" in err
    assert not (tmp_path / "c").exists()


def _npz_with_test_rows_in_unlabelled(path):
    r = np.random.default_rng(0)
    X = r.normal(size=(60, 5)).astype(np.float32)
    Xt = r.normal(size=(20, 5)).astype(np.float32)
    np.savez(path, X=X, y=(X[:, 0] > 0).astype(np.int64), X_test=Xt, y_test=(Xt[:, 0] > 0).astype(np.int64),
             X_unlabelled=np.concatenate([r.normal(size=(10, 5)), Xt[:3]]).astype(np.float32))
    return str(path)


def test_test_rows_never_reach_a_transfer_set_without_the_opt_in(tmp_path, capsys):
    data = ["--dataset", "npz", "--data", _npz_with_test_rows_in_unlabelled(tmp_path / "d.npz")]
    teacher = tmp_path / "t"
    assert cli.main(["train-teacher", *data, "--model", "dnn-2k", "--hidden", "4", "--out", str(teacher),
                     "--batch-size", "16", *FAST]) == 0
    args = ["collect-logits", *data, "--teacher", str(teacher / "teacher.pt"), "--no-progress"]
    code, err = _run(capsys, *args, "--out", str(tmp_path / "refused"))
    assert code == 2 and "3 rows of the transfer set are test rows (first: row 70, from the " \
                         "training split (X) or X_unlabelled)" in err
    assert not (tmp_path / "refused" / "logits").exists()
    code, err = _run(capsys, *args, "--out", str(tmp_path / "allowed"), "--allow-test-rows")
    assert code == 0 and "collect-logits: warning: 3 transfer rows are test rows" in err
    saved = torch.load(tmp_path / "allowed" / "transfer.pt", weights_only=False)
    assert saved["allow_test_rows"] and saved["test_rows_in_transfer"] == 3


def test_test_rows_repeated_in_x_itself_are_named_as_such(tmp_path, capsys):
    r = np.random.default_rng(0)
    X = r.normal(size=(60, 5)).astype(np.float32)
    Xt = np.concatenate([X[:2], r.normal(size=(18, 5))]).astype(np.float32)  # X_test repeats X
    path = str(tmp_path / "d.npz")
    np.savez(path, X=X, y=(X[:, 0] > 0).astype(np.int64), X_test=Xt,
             y_test=(Xt[:, 0] > 0).astype(np.int64))
    data = ["--dataset", "npz", "--data", path]
    code, err = _run(capsys, "train-teacher", *data, "--model", "dnn-2k", "--hidden", "4", "--out",
                     str(tmp_path / "t"), "--batch-size", "16", *FAST)
    assert code == 0 and "train-teacher: warning: 2 labelled training rows equal test rows" in err
    code, err = _run(capsys, "collect-logits", *data, "--teacher", str(tmp_path / "t" / "teacher.pt"),
                     "--out", str(tmp_path / "c"), "--no-progress")
    assert code == 2 and "2 rows of the transfer set are test rows (first: row 0, from the training " \
                         "split itself (X repeats rows of X_test))" in err
    assert "X_unlabelled must not" not in err


def test_a_moved_data_file_is_the_same_data(tmp_path, capsys):
    """collect-logits reuses its transfer set when the npz only moved, as distill and resume do
    (the recipe's row fingerprints, not the path, say whether it is the same data)."""
    r = np.random.default_rng(1)
    X, Xt = r.normal(size=(60, 5)).astype(np.float32), r.normal(size=(20, 5)).astype(np.float32)
    path = tmp_path / "d.npz"
    np.savez(path, X=X, y=(X[:, 0] > 0).astype(np.int64), X_test=Xt,
             y_test=(Xt[:, 0] > 0).astype(np.int64))
    assert cli.main(["train-teacher", "--dataset", "npz", "--data", str(path), "--model", "dnn-2k",
                     "--hidden", "4", "--out", str(tmp_path / "t"), "--batch-size", "16", *FAST]) == 0
    collect = ["collect-logits", "--dataset", "npz", "--teacher", str(tmp_path / "t" / "teacher.pt"),
               "--out", str(tmp_path / "c"), "--no-progress"]
    assert _run(capsys, *collect, "--data", str(path))[0] == 0
    moved = tmp_path / "moved.npz"
    os.rename(path, moved)
    code, err = _run(capsys, *collect, "--data", str(moved))
    assert code == 0, err
    code, err = _run(capsys, "distill", "--dataset", "npz", "--data", str(moved), "--logits",
                     str(tmp_path / "c"), "--hidden", "8", "--bottleneck", "2", "--out",
                     str(tmp_path / "s"), *FAST)
    assert code == 0, err


def test_damaged_inputs_are_one_error_line(pipeline, tmp_path, capsys):
    _, teacher, logits = pipeline
    copy = tmp_path / "logits"
    shutil.copytree(logits, copy)
    store = copy / "logits" / "logits.npy"
    raw = bytearray(store.read_bytes())
    raw[-3] ^= 0x40  # one flipped bit in the last row
    store.write_bytes(bytes(raw))
    code, err = _run(capsys, *_distill(str(copy), tmp_path / "s"))
    assert code == 2 and "checksum mismatch in chunk" in err and "--overwrite" in err
    # re-running collect-logits refuses it too, and --overwrite (now a CLI option) repairs it
    collect = ["collect-logits", *DATA, "--teacher", teacher, "--out", str(copy), "--dtype", "float32",
               "--no-progress"]
    code, err = _run(capsys, *collect)
    assert code == 2 and "checksum mismatch" in err
    assert _run(capsys, *collect, "--overwrite")[0] == 0
    assert _run(capsys, *_distill(str(copy), tmp_path / "s"))[0] == 0
    # a truncated logits.npy and a truncated transfer.pt name the file
    with open(store, "r+b") as f:
        f.truncate(os.path.getsize(store) - 100)
    code, err = _run(capsys, *_distill(str(copy), tmp_path / "s2"))
    assert code == 2 and f"{store}: it is" in err and "truncated or padded" in err
    transfer = copy / "transfer.pt"
    transfer.write_bytes(transfer.read_bytes()[:500])
    code, err = _run(capsys, *_distill(str(copy), tmp_path / "s3"))
    assert code == 2 and f"{transfer} is not a mimic_fast transfer set, or it is truncated" in err


def test_resume_from_a_garbage_checkpoint_is_one_error_line(pipeline, tmp_path, capsys):
    _, _, logits = pipeline
    out = tmp_path / "s"
    assert _run(capsys, *_distill(logits, out))[0] == 0
    (out / "checkpoint.pt").write_bytes(b"PK\x03\x04garbage")
    code, err = _run(capsys, *_distill(logits, out, "--resume", "--epochs", "2"))
    assert code == 2 and "checkpoint.pt is not a mimic_fast training checkpoint" in err


def test_divergence_and_nonsense_options_fail_without_writing_a_model(pipeline, tmp_path, capsys):
    _, _, logits = pipeline
    code, err = _run(capsys, *_distill(logits, tmp_path / "m", "--momentum", "5"))
    assert code == 2 and "momentum must be in [0, 1)" in err
    code, err = _run(capsys, *_distill(logits, tmp_path / "d", "--lr", "1e4"))
    assert code == 2 and "diverged" in err and "at epoch 1, step" in err
    assert not (tmp_path / "d" / "student.pt").exists() and not (tmp_path / "d" / "checkpoint.pt").exists()
    assert "nothing was written" in err and not (tmp_path / "d" / "metrics.jsonl").exists()
    # an option the architecture lacks, and a model too large to allocate: one line each
    code, err = _run(capsys, "distill", "--dataset", "digits", "--logits", logits, "--student",
                     "dnn-2k", "--hidden", "64", "--bottleneck", "4", "--out", str(tmp_path / "k"), *FAST)
    assert code == 2 and "does not take one of the options --hidden 64, --bottleneck 4" in err
    assert "'bottleneck'" in err
    code, err = _run(capsys, *_distill(logits, tmp_path / "h", "--hidden", str(10**12)))
    assert code == 2 and "does not fit in memory" in err and "smaller --hidden" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("code_,strerror,hint", [
    (errno.EROFS, "Read-only file system", "the file system is read-only"), (errno.ENOSPC, "No space left on device",
                                                          "the disk is full"),
    (errno.EACCES, "Permission denied", "check the permissions")])
def test_os_errors_of_the_output_folder_are_one_error_line(tmp_path, capsys, monkeypatch, code_,
                                                           strerror, hint):
    import mimic_fast._io as io

    def refuse(*a, dir=None, **k):
        raise OSError(code_, strerror, dir)
    monkeypatch.setattr(io.tempfile, "mkstemp", refuse)
    code, err = _run(capsys, "train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "4", "--out",
                     str(tmp_path / "t"), *FAST)
    assert code == 2 and err.count("\n") == 1
    assert f"mimic-fast train-teacher: error: {tmp_path / 't'}: {strerror} ({hint}" in err


def test_bad_environment_variable_and_bench_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CPU_CHUNK_H", "abc")
    code, err = _run(capsys, "info")
    assert code == 2 and "MIMIC_FAST_CPU_CHUNK_H='abc' must be a positive integer" in err
    monkeypatch.delenv("MIMIC_FAST_CPU_CHUNK_H")
    code, err = _run(capsys, "bench", "compare", str(tmp_path / "old.json"), str(tmp_path / "new.json"))
    assert code == 2 and f"{tmp_path / 'old.json'}: No such file or directory" in err
    monkeypatch.chdir(tmp_path)  # outside the repository: no benchmarks/results here
    code, err = _run(capsys, "bench", "--report", "--no-plots")
    assert code == 2 and err.startswith("mimic-fast bench: error: ")


def test_resume_on_another_split_is_refused(pipeline, tmp_path, capsys):
    root, _, _ = pipeline
    run = tmp_path / "teacher"
    shutil.copytree(root / "teacher", run)
    code, err = _run(capsys, "train-teacher", "--dataset", "digits", "--label-fraction", "0.2",
                     "--split-seed", "3", "--model", "dnn-2k", "--hidden", "16", "--out", str(run),
                     "--batch-size", "64", "--resume", "--epochs", "2", "--no-progress")
    assert code == 2 and "cannot resume" in err and "data split_seed 0 -> 3" in err


def test_huge_store_opt_outs_still_check_a_sample(pipeline, tmp_path, capsys):
    _, _, logits = pipeline
    copy = tmp_path / "logits"
    shutil.copytree(logits, copy)
    store = copy / "logits" / "logits.npy"
    raw = bytearray(store.read_bytes())
    raw[-3] ^= 0x40
    store.write_bytes(bytes(raw))
    fast = ["--no-verify", "--check-inputs", "sample"]
    assert _run(capsys, *_distill(str(copy), tmp_path / "s", *fast))[0] == 0  # damage unnoticed, as documented
    transfer, saved = load_transfer(copy / "transfer.pt", "")
    transfer.x[[0, -1]] = transfer.x[[-1, 0]]  # first and last rows: always in the sample
    save_transfer(copy / "transfer.pt", transfer, saved["recipe"])  # a valid file, other rows
    code, err = _run(capsys, *_distill(str(copy), tmp_path / "s2", *fast))
    assert code == 2 and "sampled rows differ" in err


def make_wide_input_teacher():  # collect-logits --teacher test_cli_errors:make_wide_input_teacher
    return torch.nn.Linear(12, 10)


def make_seven_class_teacher():
    return torch.nn.Linear(64, 7)


def test_every_ensemble_member_is_checked_not_only_the_first(pipeline, tmp_path, capsys):
    _, teacher, _ = pipeline
    script = str(tmp_path / "ts.pt")  # TorchScript: records no data recipe
    torch.jit.save(torch.jit.script(torch.nn.Linear(64, 10)), script)
    base = ["collect-logits", "--dataset", "digits", "--label-fraction", "0.2", "--no-progress"]
    # the first member has no recipe: the second (split seed 0) is still checked against seed 3
    code, err = _run(capsys, *base, "--split-seed", "3", "--teacher", script, teacher,
                     "--out", str(tmp_path / "a"))
    assert code == 2 and "split_seed: 0 in" in err and "3 here" in err
    assert not (tmp_path / "a").exists()
    # reversed: the recipe is inherited from the first, and the unchecked member is named
    code, err = _run(capsys, *base, "--teacher", teacher, script, "--out", str(tmp_path / "b"))
    assert code == 0
    warnings = [line for line in err.splitlines() if "records no data recipe" in line]
    assert len(warnings) == 1 and script in warnings[0]


def test_a_teacher_of_other_inputs_or_classes_is_refused_before_writing(tmp_path, capsys):
    base = ["collect-logits", "--dataset", "digits", "--no-progress", "--out", str(tmp_path / "c")]
    code, err = _run(capsys, *base, "--teacher", "test_cli_errors:make_wide_input_teacher")
    assert code == 2 and len([line for line in err.splitlines() if ": error:" in line]) == 1
    assert "teacher test_cli_errors:make_wide_input_teacher fails on a --dataset row of shape (64,)" in err
    code, err = _run(capsys, *base, "--teacher", "test_cli_errors:make_seven_class_teacher")
    assert code == 2 and "outputs 7 logits per row but the dataset has 10 classes" in err
    assert not (tmp_path / "c").exists()
