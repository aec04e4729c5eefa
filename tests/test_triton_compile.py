"""The offline compile gate: every config the autotuner can pick, of every Triton kernel, compiled
for sm_90a by Triton's own compiler (no GPU needed) at the paper shape (k=250, C=183, H=8000 and
400000) in bf16, fp16 and TF32, forward, mimic loss and both backward paths. Each must compile with
0 spilled bytes, shared memory within the SM and the pruning's estimate, tensor-core MMAs (wgmma)
and async copies or TMA in its main loop. Exceptions need a line in benchmarks/NOTES.md; there are
none. The compiles run in a subprocess (TRITON_INTERPRET unset) on 2 processes, ~1.5 min cold;
reports are cached by content hash (ops/triton_offline.CACHE_DIR).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from mimic_fast import dispatch

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    out = tmp_path_factory.mktemp("gate") / "gate.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mimic_fast.ops.triton_offline", "--jobs", "2",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert out.exists(), f"the gate wrote no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.mark.slow
def test_every_config_compiles_clean_for_hopper(gate):
    from mimic_fast.ops.triton_offline import problems

    proc, reports = gate
    bad = {label: problems(label, r) for label, r in reports.items() if problems(label, r)}
    assert not bad, "\n".join(f"{k}: {'; '.join(v)}" for k, v in bad.items())
    assert proc.returncode == 0, proc.stdout[-2000:]


@pytest.mark.slow
def test_gate_covers_every_kernel_dtype_and_path(gate):
    _, reports = gate
    kernels = {r["kernel"] for r in reports.values()}
    assert kernels == {"_fused_mlp_fwd_kernel", "_fused_mlp_bwd_kernel", "_fused_mlp_dz_kernel",
                       "_reduce_splits_kernel"}
    for dname in ("bf16", "fp16", "tf32"):
        for kernel in ("_fused_mlp_fwd_kernel", "_fused_mlp_bwd_kernel", "_fused_mlp_dz_kernel"):
            assert any(f"/{dname}/" in label and kernel in label for label in reports), (dname, kernel)
    # The backward's dz travels by TMA reduce-adds and its z/dy tiles by TMA loads.
    bwd = [r for label, r in reports.items()
           if "_fused_mlp_bwd_kernel" in label and "/backward/" in label and "/tf32/" not in label]
    assert bwd and all(r["tma"] > 0 and r["wgmma"] > 0 for r in bwd)


def test_problems_flags_what_the_gate_forbids():
    from mimic_fast.ops.triton_offline import problems

    good = {"kernel": "_fused_mlp_fwd_kernel", "target": "sm_90a", "spill_store_bytes": 0,
            "shared_bytes": 1000, "shared_limit": 2000, "shared_estimate": 1500, "wgmma": 4,
            "mma_sync": 0, "cp_async": 8, "tma": 0}
    assert problems("x", good) == []
    assert problems("x", {**good, "spill_store_bytes": 8}) == ["spills 8 bytes"]
    assert "no wgmma on sm_90a" in problems("x", {**good, "wgmma": 0, "mma_sync": 3})
    assert any("async" in p for p in problems("x", {**good, "cp_async": 0}))
    assert any("estimate" in p for p in problems("x", {**good, "shared_estimate": 900}))
    assert any("does not compile" in p for p in problems("x", {"error": "boom"}))


def test_backend_refuses_pre_hopper_gpus(monkeypatch):
    T = dispatch.get("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    why = T.reasons(dispatch.Problem("mlp", torch.device("cuda"), torch.bfloat16, 4, 5, 250, 8000,
                                     183, "relu"))
    assert any("sm_80" in r and "cuda backend" in r for r in why), why
