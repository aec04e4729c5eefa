"""Fuzz every kind of file `mimic-fast` reads with bad contents and count the outcomes (issue 20).

    python scripts/fuzz_inputs.py [--random 3] [--seed 0] [--only KIND ...] [--show]

Files: an npz data set, an .npy of logits (import-logits), a logit store's header.json, logits.npy
and inputs.npy, transfer.pt, checkpoint.pt (distill --resume), student.pt (export --model),
teacher.pt (collect-logits --teacher), a sweep's sweep-config.json, result.json and teacher.json,
and a CIFAR-10 python batch. Each is made good once (a tiny pipeline on digits), then, one trial per
copy, made bad in each of these ways:
  - truncated at a random byte (--random trials per file) and 0 bytes long,
  - the wrong type: random bytes, or a file of another kind in its place,
  - the wrong shape: a file that parses but holds the wrong dimensions, keys or types (our .pt and
    JSON files with a recomputed sha256, so the check behind the checksum is the one tried),
  - huge values: 1e300, 10**400, a label of 10**12, where the format allows them.
The command that reads it runs in this process (cli.main, as `mimic-fast` does). Outcomes: refused
(exit 2 and exactly one line `mimic-fast <cmd>: error: ...` on stderr that names the file or the
folder given to the command), accepted (exit 0: the
change was harmless, e.g. huge weights export fine), or a FAILURE: a traceback (any exception out
of cli.main), another exit status, several error lines, or any stderr line but the command's own
(`mimic-fast <cmd>: error|warning: ...`).
Prints one line per file kind and the totals; exits 1 on any failure.
"""
import argparse
import contextlib
import io
import json
import os
import pickle
import random
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimic_fast import cli, sweep  # noqa: E402
from mimic_fast.data.identity import content_digest  # noqa: E402
from mimic_fast.files import DIGEST_KEY, _save, load_torch_file  # noqa: E402

DATA = ["--dataset", "digits", "--label-fraction", "0.2"]
FAST = ["--epochs", "1", "--no-progress"]


def _quiet(*a):
    pass


def build(work):
    """The good files, made once: {kind: path}, and the folders their commands read."""
    t, lg, st = work / "teacher", work / "logits", work / "student"
    run = [["train-teacher", *DATA, "--model", "dnn-2k", "--hidden", "16", "--out", str(t),
            "--batch-size", "64", *FAST],
           ["collect-logits", *DATA, "--teacher", str(t / "teacher.pt"), "--out", str(lg),
            "--dtype", "float32", "--no-progress"],
           ["distill", "--dataset", "digits", "--logits", str(lg), "--hidden", "16",
            "--bottleneck", "4", "--out", str(st), *FAST]]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for argv in run:
            assert cli.main(argv) == 0, argv
        cfg = sweep.SweepConfig(teacher=(str(t / "teacher.pt"),), hidden=(8,), seeds=1, epochs=1,
                                n_generated=0, throughput_time=0.01, throughput_batches=(1,))
        sweep.run(cfg, str(work / "sweep"), progress=False, log=_quiet)
    r = np.random.default_rng(0)
    X = r.normal(size=(60, 5)).astype(np.float32)
    np.savez(work / "data.npz", X=X, y=(X[:, 0] > 0).astype(np.int64))
    np.save(work / "logits.npy", r.normal(size=(1437, 10)).astype(np.float32))
    cifar = work / "cifar"
    cifar.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": r.integers(0, 256, size=(6, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in r.integers(0, 10, size=6)]}
        with open(cifar / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    return {"teacher": t, "logits": lg, "student": st, "sweep": work / "sweep", "npz": work,
            "cifar": cifar}


class Kind:
    """A file kind: where its good copy is (inside a folder that is copied per trial), the command
    that reads it, and its structured bad versions."""

    def __init__(self, name, folder, rel, command, shapes=(), huges=()):
        self.name, self.folder, self.rel, self.command = name, folder, rel, command
        self.shapes, self.huges = shapes, huges


def _distill(folder, out):
    return ["distill", "--dataset", "digits", "--logits", str(folder), "--hidden", "16",
            "--bottleneck", "4", "--out", str(out), *FAST]


def _pt(path, change):
    """Our .pt file with `change(payload)` applied and its sha256 recomputed."""
    payload = load_torch_file(path, torch.load(path, weights_only=True)["format"], "file", "")
    change(payload)
    _save(payload, path)


def _json(path, change):
    """Our JSON file with `change(obj)` applied and its sha256 recomputed (change may return a new
    object)."""
    obj = json.loads(Path(path).read_text())
    obj.pop(DIGEST_KEY, None)
    new = change(obj)
    obj = obj if new is None else new
    text = json.dumps(obj) if not isinstance(obj, dict) else \
        json.dumps({**obj, DIGEST_KEY: content_digest(obj)})
    Path(path).write_text(text)


def _npz(path, **arrays):
    np.savez(path, **arrays)


def _header(path, change):
    h = json.loads(Path(path).read_text())
    change(h)
    Path(path).write_text(json.dumps(h))


def _npy_member(array):
    b = io.BytesIO()
    np.lib.format.write_array(b, array, allow_pickle=True)
    return b.getvalue()


def _cifar(path, data=None, labels=None):
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels}, f, protocol=2)


def _set(key, value):
    def change(obj):
        obj[key] = value
    return change


def kinds():
    X = np.random.default_rng(1).normal(size=(60, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    u8 = np.zeros((6, 3072), np.uint8)
    t16 = torch.zeros(16, 64)
    return [
        Kind("npz", "npz", "data.npz",
             lambda d: ["train-teacher", "--dataset", "npz", "--data", str(d / "data.npz"),
                        "--model", "dnn-2k", "--hidden", "4", "--out", str(d / "out"), *FAST],
             shapes=[lambda p: _npz(p, X=X[:, 0], y=y), lambda p: _npz(p, X=X, y=y[:10]),
                     lambda p: _npz(p, X=X, y=y.reshape(6, 10)), lambda p: _npz(p, X=X),
                     lambda p: _npz(p, X=X, y=y, X_test=X[:, :3], y_test=y),
                     lambda p: _npz(p, X=X[:0], y=y[:0]), lambda p: _npz(p, X=X.astype(str), y=y),
                     lambda p: zipfile.ZipFile(p, "w").writestr("X.npy", _npy_member(X.astype(object)))],
             huges=[lambda p: _npz(p, X=np.full((60, 5), 1e300), y=y),
                    lambda p: _npz(p, X=X, y=y * 10**12), lambda p: _npz(p, X=X, y=y + 1e300)]),
        Kind("npy", "npz", "logits.npy",
             lambda d: ["import-logits", *DATA, "--logits", str(d / "logits.npy"),
                        "--out", str(d / "out")],
             shapes=[lambda p: np.save(p, np.zeros((1437, 11), np.float32)),
                     lambda p: np.save(p, np.zeros(1437, np.float32)),
                     lambda p: np.save(p, np.zeros((1437, 10, 1), np.float32)),
                     lambda p: np.save(p, np.zeros((1437, 10), np.int64)),
                     lambda p: np.save(p, np.zeros((1437, 10), np.complex64)),
                     lambda p: np.save(p, np.array([["a"] * 10] * 1437)),
                     lambda p: np.save(p, np.zeros((1437, 10), object), allow_pickle=True),
                     lambda p: np.save(p, np.zeros((1437, 10), np.longdouble))],
             huges=[lambda p: np.save(p, np.full((1437, 10), 1e300)),
                    lambda p: np.save(p, np.full((1437, 10), np.inf, np.float32))]),
        Kind("header.json", "logits", "logits/header.json", lambda d: _distill(d, d / "out"),
             shapes=[lambda p: Path(p).write_text("[]"), lambda p: Path(p).write_text("{}"),
                     lambda p: _header(p, _set("n", "1437")), lambda p: _header(p, _set("checksums", {})),
                     lambda p: _header(p, _set("num_classes", 11)),
                     lambda p: _header(p, _set("dtype", "int8"))],
             huges=[lambda p: _header(p, _set("n", 10**400)),
                    lambda p: _header(p, _set("chunk_rows", 10**30)),
                    lambda p: _header(p, _set("committed", 10**18)), lambda p: _header(p, _set("n", 1e300))]),
        Kind("store logits.npy", "logits", "logits/logits.npy", lambda d: _distill(d, d / "out"),
             shapes=[lambda p: np.save(p, np.zeros((1437, 11), np.float32)),
                     lambda p: np.save(p, np.zeros((1437, 10), np.float16))],
             huges=[lambda p: np.save(p, np.full((1437, 10), 1e30, np.float32))]),
        Kind("store inputs.npy", "logits", "logits/inputs.npy", lambda d: _distill(d, d / "out"),
             shapes=[lambda p: np.save(p, np.zeros(10, np.uint64))],
             huges=[lambda p: np.save(p, np.full(1437, 2**64 - 1, np.uint64))]),
        Kind("transfer.pt", "logits", "transfer.pt", lambda d: _distill(d, d / "out"),
             shapes=[lambda p: _pt(p, _set("x", torch.zeros(1437))),
                     lambda p: _pt(p, _set("x", torch.zeros(1437, 63))),
                     lambda p: _pt(p, _set("labels", torch.zeros(5, dtype=torch.long))),
                     lambda p: _pt(p, _set("sources", torch.zeros(1437))),
                     lambda p: _pt(p, _set("recipe", [])), lambda p: _pt(p, lambda q: q.pop("x"))],
             huges=[lambda p: _pt(p, lambda q: q["x"].fill_(3e38)),
                    lambda p: _pt(p, lambda q: q["labels"].fill_(10**12)),
                    lambda p: _pt(p, lambda q: q["x"].fill_(float("inf")))]),
        Kind("checkpoint.pt", "student", "checkpoint.pt",
             lambda d: ["distill", "--dataset", "digits", "--logits", str(d.parent / "logits"),
                        "--hidden", "16", "--bottleneck", "4", "--out", str(d), "--resume",
                        "--epochs", "2", "--no-progress"],
             shapes=[lambda p: _pt(p, lambda q: q["model"].update(U=torch.zeros(5))),
                     lambda p: _pt(p, _set("epoch", "one")), lambda p: _pt(p, _set("history", {})),
                     lambda p: _pt(p, _set("config", [])), lambda p: _pt(p, _set("rng", None)),
                     lambda p: _pt(p, _set("optimizer", {}))],
             huges=[lambda p: _pt(p, _set("epoch", 10**30)), lambda p: _pt(p, _set("step", -(10**30))),
                    lambda p: _pt(p, lambda q: q["model"]["U"].fill_(1e38))]),
        Kind("student.pt", "student", "student.pt",
             lambda d: ["export", "--model", str(d / "student.pt"), "--format", "torch-export",
                        "--out", str(d / "out.pt2")],
             shapes=[lambda p: _pt(p, lambda q: q["state_dict"].update(U=torch.zeros(3, 3))),
                     lambda p: _pt(p, _set("spec", {"class": "Nope"})),
                     lambda p: _pt(p, _set("spec", {"class": "WideShallowStudent", "kwargs": {"x": 1}})),
                     lambda p: _pt(p, _set("spec", None)), lambda p: _pt(p, _set("state_dict", []))],
             huges=[lambda p: _pt(p, lambda q: q["spec"]["kwargs"].update(hidden=10**12)),
                    lambda p: _pt(p, lambda q: q["state_dict"]["W"].fill_(1e38))]),
        Kind("teacher.pt", "teacher", "teacher.pt",
             lambda d: ["collect-logits", *DATA, "--teacher", str(d / "teacher.pt"),
                        "--out", str(d / "out"), "--no-progress"],
             shapes=[lambda p: _pt(p, _set("spec", {"name": "cnn", "kwargs": {}})),
                     lambda p: _pt(p, lambda q: q["spec"]["kwargs"].update(in_features=12)),
                     lambda p: _pt(p, lambda q: q["spec"]["kwargs"].update(num_classes=7)),
                     lambda p: _pt(p, _set("data", [])), lambda p: _pt(p, _set("state_dict", {"a": t16}))],
             huges=[lambda p: _pt(p, lambda q: q["spec"]["kwargs"].update(hidden=[10**12])),
                    lambda p: _pt(p, lambda q: [v.fill_(1e38) for v in q["state_dict"].values()])]),
        Kind("sweep-config.json", "sweep", sweep.CONFIG_NAME,
             lambda d: ["sweep", "--report", "--out", str(d)],
             shapes=[lambda p: _json(p, lambda o: []), lambda p: _json(p, lambda o: {}),
                     lambda p: _json(p, _set("config", [])), lambda p: _json(p, _set("command", 3)),
                     lambda p: _json(p, lambda o: o["config"].update(bogus=1)),
                     lambda p: _json(p, lambda o: o["config"].update(hidden="8"))],
             huges=[lambda p: _json(p, lambda o: o["config"].update(seeds=10**6)),
                    lambda p: _json(p, lambda o: o["config"].update(hidden=[10**12]))]),
        Kind("result.json", "sweep", "points/conv0-k32-h8/mimic-seed0/result.json",
             lambda d: ["sweep", "--report", "--out", str(d)],
             shapes=[lambda p: _json(p, lambda o: []), lambda p: _json(p, lambda o: {}),
                     lambda p: _json(p, _set("run", [])), lambda p: _json(p, _set("throughput", {"1": "x"})),
                     lambda p: _json(p, lambda o: o["run"].update(mode="other")),
                     lambda p: _json(p, _set("params", "many"))],
             huges=[lambda p: _json(p, _set("test_accuracy", 1e308)),
                    lambda p: _json(p, _set("params", 10**400)), lambda p: _json(p, _set("steps", 10**30))]),
        Kind("teacher.json", "sweep", "teacher.json",
             lambda d: ["sweep", "--teacher", str(d.parent / "teacher" / "teacher.pt"), "--hidden",
                        "8", "--seeds", "1", "--epochs", "1", "--n-generated", "0",
                        "--throughput-time", "0.01", "--throughput-batches", "1", "--out", str(d),
                        "--no-progress"],
             shapes=[lambda p: _json(p, lambda o: []), lambda p: _json(p, lambda o: {}),
                     lambda p: _json(p, _set("throughput", [])), lambda p: _json(p, _set("params", None))],
             huges=[lambda p: _json(p, _set("test_accuracy", 1e308)),
                    lambda p: _json(p, _set("params", 10**400))]),
        Kind("CIFAR batch", "cifar", "data_batch_3",
             lambda d: ["train-teacher", "--dataset", "cifar10", "--data", str(d), "--model",
                        "dnn-2k", "--hidden", "4", "--out", str(d / "out"), *FAST],
             shapes=[lambda p: _cifar(p, u8[:, :100], [0] * 6), lambda p: _cifar(p, u8, [0] * 5),
                     lambda p: _cifar(p, u8.astype(np.float32), [0] * 6), lambda p: _cifar(p, None, None),
                     lambda p: _cifar(p, u8, "labels"), lambda p: pickle.dump([1, 2], open(p, "wb"))],
             huges=[lambda p: _cifar(p, u8, [10**12] * 6), lambda p: _cifar(p, u8, [1e300] * 6),
                    lambda p: _cifar(p, u8, [-(10**30)] * 6)]),
    ]


def trials(kind, rng, n_random, others):
    """(label, function(path)) of every bad version of one file kind."""
    out = []
    for i in range(n_random):
        def cut(p, i=i):
            raw = Path(p).read_bytes()
            Path(p).write_bytes(raw[: rng.randrange(1, max(2, len(raw)))])
        out.append((f"truncated #{i + 1}", cut))
    out.append(("0 bytes", lambda p: Path(p).write_bytes(b"")))
    out.append(("random bytes", lambda p: Path(p).write_bytes(rng.randbytes(rng.randrange(1, 5000)))))
    other = rng.choice([o for o in others if Path(o).suffix != Path(kind.rel).suffix] or others)
    out.append((f"another kind ({Path(other).name})", lambda p: shutil.copyfile(other, p)))
    out += [(f"wrong shape #{i + 1}", f) for i, f in enumerate(kind.shapes)]
    out += [(f"huge values #{i + 1}", f) for i, f in enumerate(kind.huges)]
    return out


def run_one(argv, names=()):
    """(outcome, detail): outcome is "refused", "accepted" or "FAILURE". Warnings reach stderr as
    the command prints them (one line each, `mimic-fast <cmd>: warning: ...`); any other line there
    (a traceback, a raw Python warning) is a failure. A refusal must name the damaged file (one of
    `names`: the file, or the folder the command was given): a ValueError raised deep inside numpy
    or torch is one line too, but it tells the user nothing about which file is wrong."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except BaseException as e:  # noqa: BLE001  (the trial counts anything that escapes)
            return "FAILURE", f"traceback: {type(e).__name__}: {str(e)[:300]}"
    prefix = f"mimic-fast {argv[0]}: "
    lines = err.getvalue().strip().splitlines()
    errors = [line for line in lines if line.startswith(prefix + "error: ")]
    stray = [line for line in lines if not line.startswith(prefix)]
    if stray:
        return "FAILURE", f"exit {code}, stderr line: {stray[0][:300]}"
    if code == 0 and not errors:
        return "accepted", ""
    if code == 2 and len(errors) == 1:
        if names and not any(n in errors[0] for n in names):
            return "FAILURE", f"refused without naming the file ({' or '.join(names)}): {errors[0]}"
        return "refused", errors[0]
    return "FAILURE", f"exit {code}: {' | '.join(lines)[-500:]}"


def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--random", type=int, default=3, help="random truncations per file kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, metavar="KIND", help="file kinds to fuzz")
    p.add_argument("--show", action="store_true", help="print every trial's outcome and line")
    args = p.parse_args()
    rng = random.Random(args.seed)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mimic-fuzz-") as tmp:
        work = Path(tmp)
        good = build(work / "good")
        every = kinds()
        others = [str(good[k.folder] / k.rel) for k in every]
        totals = {"refused": 0, "accepted": 0, "FAILURE": 0}
        failures = []
        for kind in every:
            if args.only and kind.name not in args.only:
                continue
            counts = dict.fromkeys(totals, 0)
            for label, make in trials(kind, rng, args.random, others):
                trial = work / "trial"
                shutil.rmtree(trial, ignore_errors=True)
                trial.mkdir()
                folder = trial / kind.folder
                shutil.copytree(good[kind.folder], folder)
                for name in ("logits", "teacher"):  # what other kinds' commands read beside them
                    if name != kind.folder and not (trial / name).exists():
                        shutil.copytree(good[name], trial / name)
                make(str(folder / kind.rel))
                outcome, detail = run_one(kind.command(folder),
                                          (Path(kind.rel).name, str(folder)))
                counts[outcome] += 1
                if outcome == "FAILURE":
                    failures.append(f"{kind.name}, {label}: {detail}")
                if args.show:
                    print(f"  {kind.name:18} {label:28} {outcome:8} {detail[:160]}")
            for k, v in counts.items():
                totals[k] += v
            print(f"{kind.name:18} {sum(counts.values()):3} trials: {counts['refused']:3} refused in one "
                  f"line, {counts['accepted']:2} accepted (harmless), {counts['FAILURE']} failures")
        n = sum(totals.values())
        print(f"total: {n} trials, {totals['refused']} refused in one line, {totals['accepted']} "
              f"accepted, {totals['FAILURE']} tracebacks or other failures")
        for line in failures:
            print("FAILURE", line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
