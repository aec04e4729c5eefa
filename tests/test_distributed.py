"""distill under torchrun: 2 gloo processes on CPU against a single-process run with the same global batch."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import TensorDataset

import mimic_fast as mf
from mimic_fast import train as T
from mimic_fast._io import LOCK_NAME
from mimic_fast.testing import assert_close

D, C, N, H, K = 8, 3, 64, 32, 4
OPTS = dict(epochs=2, batch_size=16, lr=0.1, seed=7)

WORKER = textwrap.dedent("""
    import json, sys
    import torch
    from torch.utils.data import TensorDataset
    import mimic_fast as mf
    from mimic_fast import train as T
    from mimic_fast.distributed import dist_info, init_distributed

    out, alpha = sys.argv[1], float(sys.argv[2])
    assert init_distributed(), "WORLD_SIZE from torchrun should start torch.distributed"
    rank, world = dist_info()
    data = torch.load(out + "/data.pt")
    torch.manual_seed(3)
    student = mf.nn.WideShallowStudent(data["D"], data["C"], hidden=data["H"], bottleneck=data["K"])
    res = T.distill(student, TensorDataset(*data["train"]), TensorDataset(*data["test"]), alpha=alpha,
                    out_dir=out + "/run", progress=False, **data["opts"])
    torch.save(res.model.state_dict(), f"{out}/rank{rank}.pt")
    with open(f"{out}/history{rank}.json", "w") as f:
        json.dump(res.history, f)
    torch.distributed.destroy_process_group()
""")


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g)
    t = torch.randn(N, C, generator=g) * 2
    # every row labelled: each rank's cross-entropy is then a mean over the same number of rows, so
    # the DDP average equals the global-batch mean exactly (with partial labels it would not)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return (x, t, torch.arange(N), y), (x[:20], t[:20].argmax(-1))


def _single(alpha):
    train, test = _data()
    torch.manual_seed(3)
    student = mf.nn.WideShallowStudent(D, C, hidden=H, bottleneck=K)
    return T.distill(student, TensorDataset(*train), TensorDataset(*test), alpha=alpha, progress=False,
                     **OPTS)


def _torchrun(tmp_path, alpha):
    train, test = _data()
    torch.save({"train": train, "test": test, "D": D, "C": C, "H": H, "K": K, "opts": OPTS},
               tmp_path / "data.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    # the package may be used from a source checkout, not installed: give the workers its location
    root = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path), str(alpha)]
    # --standalone: a local rendezvous on a free port (a fixed --master_port 0 hangs the workers)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)], \
        [json.loads((tmp_path / f"history{r}.json").read_text()) for r in range(2)]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_torchrun_two_gloo_ranks_match_single_process(tmp_path):
    (p0, p1), (h0, h1) = _torchrun(tmp_path, alpha=0.3)
    for k in p0:
        assert torch.equal(p0[k], p1[k]), f"{k} differs between ranks"
    single = _single(alpha=0.3)
    # same global batch (2 x 8 rows = 16), DDP's averaged gradient = the 16-row mean gradient
    for k, v in single.model.state_dict().items():
        assert_close(p0[k], v, name=k)
    strip = lambda h: [{k: v for k, v in line.items() if k != "time"} for line in h]  # noqa: E731
    assert strip(h0) == strip(h1)  # logged losses are all-reduced, accuracy is evaluated on shards and summed
    for hd, hs in zip(h0, single.history):
        for key in ("loss", "soft_loss", "hard_loss", "test_accuracy"):
            assert hd[key] == pytest.approx(hs[key], rel=1e-4, abs=1e-6), key
    assert h0[-1]["loss"] < h0[0]["loss"]
    # only rank 0 wrote: one checkpoint, one metrics line per epoch
    run = tmp_path / "run"
    # (and the writer lock file: kept, as flock files must be, so later runs lock the same inode)
    assert sorted(os.listdir(run)) == [LOCK_NAME, T.CHECKPOINT, T.METRICS]
    assert len((run / T.METRICS).read_text().splitlines()) == OPTS["epochs"]
    ckpt = torch.load(run / T.CHECKPOINT, weights_only=False)
    assert ckpt["config"]["world_size"] == 2 and len(ckpt["rng"]) == 2


FULL_DISK_WORKER = textwrap.dedent("""
    import errno, os, sys
    import torch
    from torch.utils.data import TensorDataset
    from mimic_fast.data import collect_logits
    from mimic_fast.distributed import dist_info, init_distributed

    out = sys.argv[1]
    assert init_distributed()
    rank, world = dist_info()
    if rank == 0:  # the disk is full when rank 0 allocates the store's rows
        def full(fd, offset, size):
            raise OSError(errno.ENOSPC, "No space left on device")
        os.posix_fallocate = full
    torch.manual_seed(0)
    try:
        collect_logits(torch.nn.Linear(4, 3), TensorDataset(torch.randn(64, 4)), out + "/store",
                       batch_size=8, progress=False)
    except OSError as e:
        open(f"{out}/rank{rank}.err", "w").write(str(e.errno))
    torch.distributed.destroy_process_group()
""")


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_a_full_disk_on_rank0_while_creating_the_store_raises_on_every_rank(tmp_path):
    """Rank 0 creates the store's files; its ENOSPC reaches every rank (a lone raise on rank 0 left
    the others waiting at a barrier until the collective timed out)."""
    (tmp_path / "worker.py").write_text(FULL_DISK_WORKER)
    root = os.path.dirname(os.path.dirname(os.path.abspath(mf.__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import errno

    for r in range(2):
        assert (tmp_path / f"rank{r}.err").read_text() == str(errno.ENOSPC), r
