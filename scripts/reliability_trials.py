"""Randomised reliability trials of the logit store, the training loop and the pipeline's files
(several CPU minutes).

    python scripts/reliability_trials.py [--kills 30] [--train-kills 15] [--flips 60] [--perturb 30]
                                         [--pairs 8] [--same-pairs 4] [--overwrite-during-distill 10]
                                         [--resume-after-recollect 15] [--links 16]
                                         [--export-kills 8] [--file-flips 120]
                                         [--teacher-changes 30] [--pickles 25] [--seed 0]
                                         [--only KIND ...]

- kills: SIGKILL a collecting process at a random instant, resume it, compare with a clean store
  (bit-exact rows, checksums, verify);
- train-kills: SIGKILL a training process at a random instant, resume, compare with an
  uninterrupted run (bit-exact weights and history);
- flips: flip one random bit of a random store file; opening it must refuse, or (a flip in a field
  that carries no data, e.g. the header's timestamp) serve exactly the clean rows;
- perturb: swap, shuffle or change dataset rows; opening the store against them must refuse;
- pairs / same-pairs: start two collections (different teachers / the same one) into one store
  together; the store must end complete, verified and holding one teacher's rows, and a run that
  did not write it must have been refused (lock held, or the store made by another teacher);
- overwrite-during-distill: a training process reads a store while another overwrites it with
  another teacher's logits, started at a random instant; the overwrite must be refused while the
  store is read (or the training refused while it is written), and a finished training must have
  trained on, and recorded, exactly one store;
- resume-after-recollect: train, collect the store again (the same teacher, another one, or other
  rows), resume; refused exactly when the store or the rows changed;
- links: a random file of a store, run folder or output made a symbolic link to a victim file; the
  writer must refuse it and leave the victim byte-identical;
- export-kills: SIGKILL `mimic-fast export --overwrite` at a random instant over a good .pt2/.onnx;
  the file must afterwards be the old one or a complete new one, never a torn one (plus exports
  over --model refused);
- file-flips: flip one random bit of a random transfer.pt, checkpoint.pt, student.pt, teacher.pt,
  sweep result.json, or a user's TorchScript / .pt2 teacher; loading must refuse it or give the
  very same content (a user's teacher: reusing its store must be refused);
- teacher-changes: change a teacher's weights keeping every tensor's sum and first 16 values (what
  the old fingerprint hashed); reusing its store must be refused;
- pickles: a pickle payload (__reduce__, with or without a recomputed digest) planted in a
  transfer.pt, checkpoint.pt, student.pt, teacher.pt or a CIFAR batch; loading must refuse it
  without running it.
Prints one line per kind with the counts; exits 1 if any trial failed.
"""
import argparse
import contextlib
import io
import json
import logging
import os
import pickle
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimic_fast import cli  # noqa: E402
from mimic_fast import pipeline as P  # noqa: E402
from mimic_fast import train as T  # noqa: E402
from mimic_fast.data import LogitDataset, LogitStore, collect_logits  # noqa: E402
from mimic_fast.data.datasets import load_dataset  # noqa: E402
from mimic_fast.data.identity import content_digest  # noqa: E402
from mimic_fast.data.transfer import TransferSet  # noqa: E402
from mimic_fast.export import export_student, load_exported  # noqa: E402
from mimic_fast.files import (DIGEST_KEY, load_checkpoint, load_model, load_transfer,  # noqa: E402
                              read_json, save_model, save_transfer, transfer_digest, write_json)
from mimic_fast.models import DNN  # noqa: E402
from mimic_fast.nn import WideShallowStudent  # noqa: E402
from mimic_fast.teachers import PickledTeacherWarning, load_teacher  # noqa: E402

N, D, C = 300, 8, 5
WORKER = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset
    sys.path.insert(0, {repo!r})
    from mimic_fast import train as T
    from mimic_fast.data import collect_logits

    class Teacher(nn.Module):  # elementwise: bit-identical logits for any batch split
        def __init__(self, shift=0.0, delay=0.0):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.w = nn.Parameter(torch.randn({C}, generator=g) * 3)
            self.b = nn.Parameter(torch.randn({C}, generator=g) + shift)
            self.delay = delay

        def forward(self, x):
            time.sleep(self.delay)
            return x[:, :{C}] * self.w + self.b

    def data():
        return TensorDataset(torch.randn({N}, {D}, generator=torch.Generator().manual_seed(1)))

    def train_data():
        x = data().tensors[0]
        return TensorDataset(x, (x[:, 0] > 0).long())

    def mlp():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear({D}, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 2))

    def student():
        torch.manual_seed(2)
        return nn.Sequential(nn.Linear({D}, 32), nn.ReLU(), nn.Linear(32, {C}))

    TRAIN = dict(epochs=20, batch_size=16, lr=0.05, progress=False)

    if __name__ == "__main__":
        mode, path = sys.argv[1], sys.argv[2]
        if mode == "collect":
            collect_logits(Teacher(float(sys.argv[3]), float(sys.argv[4])), data(), path,
                           batch_size=4, chunk_rows=12, progress=False,
                           overwrite=len(sys.argv) > 5 and sys.argv[5] == "overwrite")
        elif mode == "train":
            T.train_teacher(mlp(), train_data(), out_dir=path, resume=len(sys.argv) > 3, **TRAIN)
        elif mode == "distill":  # reads the store at path while it trains into sys.argv[3]
            from mimic_fast.data import LogitDataset
            with LogitDataset(data(), path) as ds:
                T.distill(student(), ds, out_dir=sys.argv[3], epochs=int(sys.argv[4]),
                          batch_size=16, lr=0.01, progress=False, fused=False)
                ds.store.check_unchanged()  # nobody replaced the store while it was read ...
                ds.store.verify()  # ... nor changed the rows it mapped
                print("unchanged", flush=True)
""").format(repo=str(REPO), N=N, D=D, C=C)


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _spawn(script, *args):
    return subprocess.Popen([sys.executable, str(script), *map(str, args)], env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _kill_when(proc, ready, extra):
    """SIGKILL proc `extra` seconds after ready() first holds (or when it exits by itself)."""
    deadline = time.monotonic() + 120
    while proc.poll() is None and not ready() and time.monotonic() < deadline:
        time.sleep(0.002)
    time.sleep(extra)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _committed(path):
    try:
        return json.loads((path / "header.json").read_text())["committed"]
    except (OSError, ValueError):
        return -1


def collection_kills(work, w, script, n, rng):
    clean = collect_logits(w.Teacher(), w.data(), work / "clean", batch_size=4, chunk_rows=12,
                           progress=False)
    ok = landed = 0
    for i in range(n):
        path = work / f"kill{i}"
        # a random commit count to wait for (-1: the header itself), then a random instant after it
        target = rng.randrange(-1, clean.header["n_chunks"])
        _kill_when(_spawn(script, "collect", path, 0.0, 0.005), lambda: _committed(path) >= target,
                   rng.uniform(0, 0.03))
        h = path / "header.json"
        if h.exists() and not json.loads(h.read_text())["complete"]:
            landed += 1
        store = collect_logits(w.Teacher(), w.data(), path, batch_size=4, chunk_rows=12, progress=False)
        if (torch.equal(store.tensor(), clean.tensor()) and store.verify() == [] and
                store.header["checksums"] == clean.header["checksums"]):
            ok += 1
        shutil.rmtree(path)
    return f"collection SIGKILLs: {n} trials ({landed} mid-store), {ok} resumed bit-exact", ok == n


def training_kills(work, w, script, n, rng):
    ref = T.train_teacher(w.mlp(), w.train_data(), out_dir=str(work / "ref"), **w.TRAIN)
    ok = landed = 0
    for i in range(n):
        path = work / f"train{i}"
        target = rng.randrange(0, w.TRAIN["epochs"])  # epochs whose metrics line is written

        def written(path=path, target=target):
            try:
                return len((path / T.METRICS).read_text().splitlines()) >= target
            except OSError:
                return False
        _kill_when(_spawn(script, "train", path), written, rng.uniform(0, 0.1))
        if (path / T.CHECKPOINT).exists():
            landed += 1
        res = T.train_teacher(w.mlp(), w.train_data(), out_dir=str(path),
                              resume=(path / T.CHECKPOINT).exists(), **w.TRAIN)
        same = all(torch.equal(a, b) for a, b in zip(ref.model.state_dict().values(),
                                                     res.model.state_dict().values()))
        strip = [[{k: v for k, v in h.items() if k != "time"} for h in r.history] for r in (ref, res)]
        lines = [json.loads(x) for x in open(path / T.METRICS)]
        leftovers = [f for f in os.listdir(path) if f.endswith(".tmp")]
        ok += same and strip[0] == strip[1] and len(lines) == w.TRAIN["epochs"] and not leftovers
        shutil.rmtree(path)
    return f"training SIGKILLs: {n} trials ({landed} after a checkpoint), {ok} resumed bit-exact", ok == n


def bit_flips(work, w, n, rng):
    base = work / "flipbase"
    clean = collect_logits(w.Teacher(), w.data(), base, batch_size=4, chunk_rows=12, progress=False)
    rows, inputs = clean.tensor(), np.array(clean.inputs)
    refused = harmless = bad = 0
    for i in range(n):
        path = work / f"flip{i}"
        shutil.copytree(base, path)
        name = rng.choice(["logits.npy", "inputs.npy", "header.json"])
        raw = bytearray((path / name).read_bytes())
        pos = rng.randrange(len(raw))
        raw[pos] ^= 1 << rng.randrange(8)
        (path / name).write_bytes(bytes(raw))
        try:
            s = LogitStore.open(path, dataset=w.data())
            if torch.equal(s.tensor(), rows) and np.array_equal(np.array(s.inputs), inputs):
                harmless += 1
            else:
                bad += 1
                print(f"  served damaged rows: {name} byte {pos}")
        except (ValueError, OSError):
            refused += 1
        shutil.rmtree(path)
    return (f"bit flips: {n} trials, {refused} refused, {harmless} harmless (no data changed), "
            f"{bad} served damaged rows"), bad == 0


def perturbations(work, w, n, rng):
    base = work / "flipbase"
    refused = 0
    for i in range(n):
        x = w.data().tensors[0].clone()
        kind = i % 3
        if kind == 0:
            a, b = rng.sample(range(N), 2)
            x[[a, b]] = x[[b, a]]
        elif kind == 1:
            rows = torch.tensor(rng.sample(range(N), rng.randrange(2, N)))
            x[rows] = x[rows[torch.randperm(len(rows))]]
            if torch.equal(x, w.data().tensors[0]):
                x[rows[0], 0] += 1.0
        else:
            x[rng.randrange(N), rng.randrange(D)] += rng.choice([1.0, 1e-3, -2.5])
        try:
            LogitStore.open(base, dataset=TensorDataset(x))
        except ValueError:
            refused += 1
    return f"dataset swaps/shuffles/changes: {n} trials, {refused} refused", refused == n


def writer_pairs(work, w, script, n, same=False):
    """Two collections into one store started together: different teachers (one must win, the
    other be refused) or the same one (both may succeed; the store must be whole)."""
    good = 0
    shifts = (0.0, 0.0) if same else (0.0, 1.0)
    refs = [w.Teacher(s)(w.data().tensors[0]).detach().half().float() for s in (0.0, 1.0)]
    for i in range(n):
        path = work / f"pair{i}"
        procs = [_spawn(script, "collect", path, shift, 0.02) for shift in shifts]
        codes = [p.wait(timeout=300) for p in procs]
        errs = [p.stderr.read().decode() for p in procs]
        try:
            s = LogitStore.open(path, dataset=w.data())
            holds = [s.complete and torch.equal(s.tensor(), r) for r in refs]
        except (ValueError, OSError):
            holds = [False, False]
        refused = ["being written by another process" in e or "was made with teacher" in e for e in errs]
        if same:
            ok = holds[0] and all(c == 0 or r for c, r in zip(codes, refused))
        else:
            winner = holds.index(True) if sum(holds) == 1 else None
            ok = winner is not None and codes[winner] == 0 and codes[1 - winner] != 0 and refused[1 - winner]
        good += ok
        shutil.rmtree(path)
    what = "the same teacher" if same else "different teachers"
    outcome = ("a whole store, any loser refused" if same else
               "one teacher's rows and the other refused")
    return f"two writers, {what}: {n} pairs, {good} with {outcome}", good == n

# ----------------------------------------------------------------------------------------------
# issue 19: readers hold the store, runs bind to their inputs, no writes through links or over
# inputs, every file verified and loaded without pickle
# ----------------------------------------------------------------------------------------------
def _refusal(text):
    return any(k in text for k in ("being read by pid", "being written by another process",
                                   "changed since it was opened"))


def overwrite_during_distill(work, w, script, n, rng):
    """A reader trains on a store; a writer overwrites it with another teacher at a random instant."""
    base = work / "odbase"
    collect_logits(w.Teacher(), w.data(), base, batch_size=4, chunk_rows=12, progress=False)
    original = LogitStore.open(base).digest
    good = 0
    outcomes = {"overwrite refused while read": 0, "training refused while written": 0,
                "one after the other": 0}
    for i in range(n):
        path, out = work / f"od{i}", work / f"od{i}-run"
        shutil.copytree(base, path)
        reader = _spawn(script, "distill", path, out, 100)
        time.sleep(rng.uniform(0.5, 4.5))  # before, while or after the reader holds the store
        writer = _spawn(script, "collect", path, 1.0, 0.0, "overwrite")
        codes = [reader.wait(timeout=300), writer.wait(timeout=300)]
        outs = [p.stdout.read().decode() for p in (reader, writer)]
        errs = [p.stderr.read().decode() for p in (reader, writer)]
        problems = []
        try:
            final = LogitStore.open(path).digest  # verified: whole, one teacher's rows
        except (ValueError, OSError) as e:
            final, problems = None, [f"the store is broken: {e}"]
        if codes[0] == 0:  # it trained on one store, unchanged while it read it, and recorded it
            trained = load_checkpoint(out / T.CHECKPOINT, "distill")["config"]["inputs"]
            if "unchanged" not in outs[0] or trained["logit_store"] not in (original, final):
                problems.append("the training read a store that changed under it")
        elif not _refusal(errs[0]):
            problems.append(f"the training failed: {errs[0][-300:]}")
        if codes[1] != 0 and not (_refusal(errs[1]) and final == original):
            problems.append(f"the overwrite failed or changed the store: {errs[1][-300:]}")
        outcomes["overwrite refused while read" if codes[1] else
                 "training refused while written" if codes[0] else "one after the other"] += 1
        good += not problems
        if problems:
            print(f"  trial {i}: codes {codes}: {'; '.join(problems)}")
        shutil.rmtree(path)
        shutil.rmtree(out, ignore_errors=True)
    counts = ", ".join(f"{v} {k}" for k, v in outcomes.items())
    return (f"overwrite during distill: {n} trials ({counts}), {good} with every finished training "
            "on one unchanged store and every refusal clean"), good == n


def resume_after_recollect(work, w, n, rng):
    """Train 2 epochs, collect the store again, resume to 4: refused iff the inputs changed."""
    good = 0
    kinds = ("same teacher", "other teacher", "other rows")
    counts = dict.fromkeys(kinds, 0)
    for i in range(n):
        kind = kinds[i % 3]
        path, out = work / f"rr{i}", work / f"rr{i}-run"
        x = w.data().tensors[0]
        collect_logits(w.Teacher(), TensorDataset(x), path, batch_size=4, progress=False)

        def train(x, epochs, resume):
            rows = TensorDataset(x)
            with LogitDataset(rows, path) as ds:
                inputs = {**ds.identity, "transfer_set": transfer_digest(
                    TransferSet(x, torch.zeros(len(x), dtype=torch.int8)))}
                return T.distill(w.student(), ds, out_dir=str(out), epochs=epochs, resume=resume,
                                 batch_size=16, lr=0.01, progress=False, fused=False, inputs=inputs)
        train(x, 2, False)
        if kind == "other rows":
            x = x.clone()
            x[rng.randrange(N), rng.randrange(D)] += rng.choice([1.0, 1e-3])
        shift = rng.choice([0.5, -1.0, 2.0]) if kind == "other teacher" else 0.0
        collect_logits(w.Teacher(shift), TensorDataset(x), path, batch_size=4, progress=False,
                       overwrite=True)
        try:
            train(x, 4, True)
            refused = False
        except ValueError as e:
            refused = "was trained on" in str(e)
        ok = refused == (kind != "same teacher")
        counts[kind] += ok
        good += ok
        shutil.rmtree(path)
        shutil.rmtree(out)
    return (f"resume after re-collect: {n} trials, {good} right (refused after another teacher "
            f"{counts['other teacher']}/{(n + 1) // 3}, after other rows {counts['other rows']}/"
            f"{n // 3}; resumed on the same logits {counts['same teacher']}/{(n + 2) // 3})"), \
        good == n


def _victim(work, name, data):
    p = work / "victims" / name
    p.parent.mkdir(exist_ok=True)
    p.write_bytes(data)
    return p


def links(work, w, n, rng):
    """A file we would write made a symbolic link to a victim: refused, the victim untouched."""
    kinds = ("logits.npy", "inputs.npy", "header.json", "checkpoint.pt", "metrics.jsonl",
             "student.pt", "result.json", "export.pt2")
    base = work / "lnbase"
    collect_logits(w.Teacher(), w.data(), base, batch_size=4, progress=False)
    good = 0
    for i in range(n):
        kind = kinds[i % len(kinds)]
        folder = work / f"ln{i}"
        content = bytes(rng.randrange(256) for _ in range(4096))
        victim = _victim(work, f"{i}-{kind}", content)
        try:
            if kind in ("logits.npy", "inputs.npy", "header.json"):
                shutil.copytree(base, folder)
                (folder / kind).unlink()
                (folder / kind).symlink_to(victim)
                collect_logits(w.Teacher(1.0), w.data(), folder, progress=False, overwrite=True)
            elif kind in ("checkpoint.pt", "metrics.jsonl"):
                folder.mkdir()
                (folder / kind).symlink_to(victim)
                T.train_teacher(w.mlp(), w.train_data(), out_dir=str(folder), epochs=1,
                                batch_size=16, progress=False)
            elif kind == "student.pt":
                folder.mkdir()
                (folder / kind).symlink_to(victim)
                save_model(folder / kind, w.student(), None)
            elif kind == "result.json":
                folder.mkdir()
                (folder / kind).symlink_to(victim)
                write_json(folder / kind, {"format": "x"})
            else:
                folder.mkdir()
                (folder / "s.pt2").symlink_to(victim)
                export_student(w.student(), folder / "s.pt2", "torch-export", input_shape=(D,))
            refused = False
        except OSError as e:
            refused = "is a symbolic link" in str(e)
        good += refused and victim.read_bytes() == content
        shutil.rmtree(folder)
    return f"symlinked targets: {n} trials over {len(kinds)} file kinds, {good} refused, victims intact", \
        good == n


def export_kills(work, w, n, rng):
    """SIGKILL a re-export over a good file at a random instant; never a torn file."""
    folder = work / "exports"
    folder.mkdir()
    model = folder / "student.pt"
    torch.manual_seed(0)
    student = WideShallowStudent(D, C, hidden=64, bottleneck=4)
    save_model(model, student, {"class": "WideShallowStudent", "kwargs": dict(
        in_features=D, num_classes=C, hidden=64, bottleneck=4)})
    (folder / "link.pt").symlink_to(model)  # the model under another name
    good_model = model.read_bytes()
    with contextlib.redirect_stderr(io.StringIO()):  # the refusals' error lines
        refused = sum(cli.main(["export", "--model", str(model), "--out", str(out), *extra]) == 2
                      for out in (model, folder / "link.pt") for extra in ([], ["--overwrite"]))
    refused *= model.read_bytes() == good_model
    formats = ["torch-export"]
    try:
        import onnxruntime  # noqa: F401
        import onnxscript  # noqa: F401
        formats.append("onnx")
    except ImportError:
        pass
    ok = landed = kept = 0
    for i in range(n):
        fmt = formats[i % len(formats)]
        out = folder / ("s.pt2" if fmt == "torch-export" else "s.onnx")
        argv = ["-m", "mimic_fast", "export", "--model", str(model), "--format", fmt, "--out",
                str(out), "--overwrite"]
        if not out.exists():
            subprocess.run([sys.executable, *argv], env=_env(), check=True, capture_output=True)
        before = out.read_bytes()
        proc = subprocess.Popen([sys.executable, *argv], env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        # a random instant of its run (an export here takes ~4-8 s, mostly startup)
        time.sleep(rng.uniform(1.0, 8.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            landed += 1
        proc.wait()
        after = out.read_bytes()
        try:
            run = load_exported(out, fmt)
            x = torch.randn(3, D)
            with torch.no_grad():
                whole = torch.allclose(torch.as_tensor(run(x)), student(x), atol=1e-4)
        except Exception:
            whole = False
        ok += whole
        kept += after == before
    return (f"export: {refused} of 4 exports over --model refused; {n} SIGKILLs during a "
            f"re-export ({landed} while it ran), {ok} left a whole, working file ({kept} the old "
            "one)"), ok == n and refused == 4


def _flip(path, rng):
    raw = bytearray(path.read_bytes())
    pos = rng.randrange(len(raw))
    raw[pos] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(raw))
    return pos


def _our_files(work, w):
    """One file of each kind of ours, and its loader."""
    folder = work / "files"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    x = w.data().tensors[0]
    ts = TransferSet(x, torch.zeros(len(x), dtype=torch.int8), torch.full((len(x),), -1))
    save_transfer(folder / "transfer.pt", ts, {"dataset": "trial"})
    T.train_teacher(w.mlp(), w.train_data(), out_dir=str(folder / "run"), epochs=1, batch_size=16,
                    progress=False)
    teacher = DNN(D, C, hidden=(64,))
    spec = {"name": "dnn-2k", "kwargs": {"in_features": D, "num_classes": C, "hidden": [64]}}
    save_model(folder / "teacher.pt", teacher, spec, data={"dataset": "trial"})
    kw = {"in_features": D, "num_classes": C, "hidden": 64, "bottleneck": 4}
    save_model(folder / "student.pt", WideShallowStudent(**kw),
               {"class": "WideShallowStudent", "kwargs": kw}, history=[{"epoch": 1, "loss": 0.5}])
    write_json(folder / "result.json", {"format": "mimic_fast.sweep_run/2", "test_accuracy": 0.9375,
                                        "steps": 20, "spec": spec})
    return {folder / "transfer.pt": lambda p: load_transfer(p, "")[1],
            folder / "run" / T.CHECKPOINT: lambda p: load_checkpoint(p, "teacher"),
            folder / "teacher.pt": lambda p: load_model(p)[1],
            folder / "student.pt": lambda p: load_model(p)[1],
            folder / "result.json": lambda p: read_json(p, "")}


def file_flips(work, w, n, rng):
    """One random bit flipped in a file of ours, or in a user's teacher file."""
    files = _our_files(work, w)
    clean = {p: content_digest(load(p)) for p, load in files.items()}
    # a user's TorchScript and .pt2 teacher with a store made from each
    folder = work / "files"
    net = w.mlp().eval()
    torch.jit.save(torch.jit.script(net), folder / "teacher.ts")
    program = torch.export.export(net, (torch.randn(2, D),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, folder / "teacher.pt2")
    users = {}
    for name in ("teacher.ts", "teacher.pt2"):
        t = P.load_teachers([str(folder / name)])
        collect_logits(t.teacher, w.data(), folder / f"store-{name}", progress=False,
                       teacher_id=t.teacher_id)
        users[folder / name] = folder / f"store-{name}"
    kinds = list(files) + list(users)
    refused = harmless = bad = 0
    for i in range(n):
        path = kinds[i % len(kinds)]
        copy = path.parent / f"flipped-{path.name}"
        shutil.copy(path, copy)
        pos = _flip(copy, rng)
        try:
            if path in files:
                same = content_digest(files[path](copy)) == clean[path]
            else:
                t = P.load_teachers([str(copy)])
                collect_logits(t.teacher, w.data(), users[path], progress=False,
                               teacher_id=t.teacher_id)
                same = False  # its store reused with a changed file
        except ValueError:
            same = None
        except Exception as e:  # ours must refuse with a ValueError; a user's file may not load
            same = None if path in users else e
        if same is None:
            refused += 1
        elif same is True:
            harmless += 1
        else:
            bad += 1
            print(f"  {path.name} byte {pos}: {'served changed content' if same is False else same!r}")
        copy.unlink()
    return (f"bit flips in our files and user teachers: {n} trials over {len(kinds)} kinds, "
            f"{refused} refused, {harmless} harmless (same content), {bad} served changed"), bad == 0


def teacher_changes(work, w, n, rng):
    """Weights changed keeping each tensor's sum and first 16 values: its store is not reused."""
    x = w.data().tensors[0]
    refused = 0
    for i in range(n):
        torch.manual_seed(i)
        teacher = DNN(D, C, hidden=(64,)).eval()
        path = work / f"tc{i}"
        collect_logits(teacher, TensorDataset(x), path, progress=False, dtype=torch.float32)
        changed = DNN(D, C, hidden=(64,)).eval()
        changed.load_state_dict(teacher.state_dict())
        weight = dict(changed.named_parameters())[rng.choice(["net.0.weight", "net.3.weight"])]
        with torch.no_grad():
            flat = weight.view(-1)
            if rng.random() < 0.5:  # a column reversed below the first 16 values
                col = rng.randrange(weight.shape[1])
                first = -(-16 // weight.shape[1])
                weight[first:, col] = weight[first:, col].flip(0)
            else:  # two values beyond the first 16 swapped
                a, b = rng.sample(range(16, flat.numel()), 2)
                flat[[a, b]] = flat[[b, a]]
        try:
            collect_logits(changed, TensorDataset(x), path, progress=False, dtype=torch.float32)
        except ValueError as e:
            refused += "was made with teacher" in str(e)
        shutil.rmtree(path)
    return f"teacher changes below the old fingerprint: {n} trials, {refused} refused", refused == n


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def pickles(work, w, n, rng):
    """A pickle payload planted in a file of ours or a CIFAR batch: refused, never run."""
    files = _our_files(work, w)
    pts = [p for p in files if p.suffix == ".pt"]
    cifar = work / "cifar"
    cifar.mkdir()
    batch = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, 2]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(pickle.dumps(batch))
    marker = work / "payload-ran"
    refused = 0
    for i in range(n):
        kind = (pts + ["cifar"])[i % (len(pts) + 1)]
        if kind == "cifar":
            good = (cifar / "data_batch_1").read_bytes()
            (cifar / "data_batch_1").write_bytes(pickle.dumps({**batch, b"x": _Payload(marker)}))
            try:
                load_dataset("cifar10", root=cifar)
            except ValueError:
                refused += not marker.exists()
            (cifar / "data_batch_1").write_bytes(good)
        else:
            good = kind.read_bytes()
            payload = torch.load(kind, weights_only=False)
            where = rng.choice(["top", "nested", "digest"])
            if where == "top":
                payload["extra"] = _Payload(marker)
            elif where == "nested":
                key = rng.choice([k for k, v in payload.items() if isinstance(v, (dict, list))])
                payload[key] = [payload[key], _Payload(marker)]
            else:  # an attacker who recomputes the digest over the planted object
                payload.pop(DIGEST_KEY)
                payload["extra"] = _Payload(marker)
                try:
                    payload[DIGEST_KEY] = content_digest(payload)
                except TypeError:
                    payload[DIGEST_KEY] = "0" * 64
            torch.save(payload, kind)
            try:
                if kind.name == "teacher.pt":
                    load_teacher(str(kind))
                else:
                    files[kind](kind)
            except ValueError:
                refused += not marker.exists()
            kind.write_bytes(good)
        if marker.exists():
            print(f"  a payload ran from {kind}")
            marker.unlink()
    return (f"pickle payloads: {n} trials over {len(pts) + 1} file kinds, {refused} refused "
            "without running"), refused == n



def main():
    p = argparse.ArgumentParser(allow_abbrev=False, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--train-kills", type=int, default=15)
    p.add_argument("--flips", type=int, default=60)
    p.add_argument("--perturb", type=int, default=30)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--same-pairs", type=int, default=4)
    p.add_argument("--overwrite-during-distill", type=int, default=10)
    p.add_argument("--resume-after-recollect", type=int, default=15)
    p.add_argument("--links", type=int, default=16)
    p.add_argument("--export-kills", type=int, default=8)
    p.add_argument("--file-flips", type=int, default=120)
    p.add_argument("--teacher-changes", type=int, default=30)
    p.add_argument("--pickles", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only", nargs="+", default=None, metavar="KIND",
                   help="run only these kinds (e.g. pickles links)")
    args = p.parse_args()
    warnings.filterwarnings("ignore", message="resuming")  # the resumes are the trials' own
    warnings.filterwarnings("ignore", category=PickledTeacherWarning)  # damaged user teachers
    logging.getLogger("torch.export").setLevel(logging.ERROR)  # ... that torch.export logs
    rng = random.Random(args.seed)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="mimic-trials-") as tmp:
        work = Path(tmp)
        script = work / "worker.py"
        script.write_text(WORKER)
        import importlib.util

        spec = importlib.util.spec_from_file_location("trial_worker", script)
        w = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(w)
        results = []
        for label, fn in (("flips", lambda: bit_flips(work, w, args.flips, rng)),
                          ("perturb", lambda: perturbations(work, w, args.perturb, rng)),
                          ("kills", lambda: collection_kills(work, w, script, args.kills, rng)),
                          ("train-kills", lambda: training_kills(work, w, script, args.train_kills, rng)),
                          ("pairs", lambda: writer_pairs(work, w, script, args.pairs)),
                          ("same-pairs", lambda: writer_pairs(work, w, script, args.same_pairs, True)),
                          ("overwrite-during-distill", lambda: overwrite_during_distill(
                              work, w, script, args.overwrite_during_distill, rng)),
                          ("resume-after-recollect", lambda: resume_after_recollect(
                              work, w, args.resume_after_recollect, rng)),
                          ("links", lambda: links(work, w, args.links, rng)),
                          ("export-kills", lambda: export_kills(work, w, args.export_kills, rng)),
                          ("file-flips", lambda: file_flips(work, w, args.file_flips, rng)),
                          ("teacher-changes", lambda: teacher_changes(work, w, args.teacher_changes,
                                                                      rng)),
                          ("pickles", lambda: pickles(work, w, args.pickles, rng))):
            if args.only is not None and label not in args.only:
                continue
            if getattr(args, label.replace("-", "_")):
                t0 = time.perf_counter()
                line, passed = fn()
                print(f"{line}  [{time.perf_counter() - t0:.0f} s]", flush=True)
                results.append(passed)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
