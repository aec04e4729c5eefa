"""Randomised reliability trials of the logit store and the training loop (a few CPU minutes).

    python scripts/reliability_trials.py [--kills 30] [--train-kills 15] [--flips 60] [--perturb 30]
                                         [--pairs 8] [--same-pairs 4] [--seed 0]

- kills: SIGKILL a collecting process at a random instant, resume it, compare with a clean store
  (bit-exact rows, checksums, verify);
- train-kills: SIGKILL a training process at a random instant, resume, compare with an
  uninterrupted run (bit-exact weights and history);
- flips: flip one random bit of a random store file; opening it must refuse, or (a flip in a field
  that carries no data, e.g. the header's timestamp) serve exactly the clean rows;
- perturb: swap, shuffle or change dataset rows; opening the store against them must refuse;
- pairs / same-pairs: start two collections (different teachers / the same one) into one store
  together; the store must end complete, verified and holding one teacher's rows, and a run that
  did not write it must have been refused (lock held, or the store made by another teacher).
Prints one line per kind with the counts; exits 1 if any trial failed.
"""
import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mimic_fast import train as T  # noqa: E402
from mimic_fast.data import LogitStore, collect_logits  # noqa: E402

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

    TRAIN = dict(epochs=20, batch_size=16, lr=0.05, progress=False)

    if __name__ == "__main__":
        mode, path = sys.argv[1], sys.argv[2]
        if mode == "collect":
            collect_logits(Teacher(float(sys.argv[3]), float(sys.argv[4])), data(), path,
                           batch_size=4, chunk_rows=12, progress=False)
        elif mode == "train":
            T.train_teacher(mlp(), train_data(), out_dir=path, resume=len(sys.argv) > 3, **TRAIN)
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=30)
    p.add_argument("--train-kills", type=int, default=15)
    p.add_argument("--flips", type=int, default=60)
    p.add_argument("--perturb", type=int, default=30)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--same-pairs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
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
                          ("same_pairs", lambda: writer_pairs(work, w, script, args.same_pairs, True))):
            if getattr(args, label.replace("-", "_")):
                t0 = time.perf_counter()
                line, passed = fn()
                print(f"{line}  [{time.perf_counter() - t0:.0f} s]", flush=True)
                results.append(passed)
    return 0 if all(results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
