"""The offline compile gate: every config the autotuner can pick, of every Triton kernel, compiled
for sm_90a by Triton's own compiler (no GPU needed) at the paper shape (k=250, C=183, H=8000 and
400000) in bf16, fp16 and TF32, forward, mimic loss and backward. Each must compile with 0 spilled
bytes, shared memory within the SM and the pruning's estimate, tensor-core MMAs (wgmma), async
copies or TMA, no reduce-adds, no warpgroup repeating another's MMAs (issued / useful <= 1.10 in
the main loop) and loads running ahead of the MMAs (ops/triton_offline.py says how each is read
from the PTX / TTGIR). The planted defects (`--planted`) show each new rule failing. The compiles
run in a subprocess (TRITON_INTERPRET unset) on 2 processes, ~1 min cold; reports are cached by
content hash (ops/triton_offline.CACHE_DIR).
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
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _offline(tmp, *args):
    out = tmp / "out.json"
    proc = subprocess.run([sys.executable, "-m", "mimic_fast.ops.triton_offline", "--jobs", "2",
                           "--json", str(out), *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=900)
    assert out.exists(), f"no report:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc, json.loads(out.read_text())


@pytest.fixture(scope="module")
def gate(tmp_path_factory):
    return _offline(tmp_path_factory.mktemp("gate"))


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
    kernels = {"_fused_mlp_fwd_kernel", "_fused_mlp_bwd_kernel", "_gemm_kernel"}
    assert {r["kernel"] for r in reports.values()} == kernels | {"_reduce_splits_kernel"}
    for dname in ("bf16", "fp16", "tf32"):
        for kernel in kernels:
            assert any(f"/{dname}/" in label and kernel in label for label in reports), (dname, kernel)
    for label, r in reports.items():
        assert r["atom_red"] == 0, label  # no reduce-adds anywhere
        if r["kernel"] in kernels:
            assert r["issued_over_useful"] <= 1.10 and r["prefetch_distance"] >= 2, label
            assert r["tma"] > 0 and r["wgmma"] > 0, label
            # pass 2's dz and dV loops are each checked; the other kernels have one main loop
            assert r["main_loops"] == (2 if r["kernel"] == "_gemm_kernel" else 1), label
    # every specialisation keeps its own report (same tiles, different partial buffer or scale)
    reduces = {label.split("/")[-1] for label in reports if "/backward/_reduce" in label}
    assert {"BLOCK_M=32,P=dvp", "BLOCK_M=32,P=dzp,scaled", "BLOCK_M=32,P=dwp"} <= reduces


@pytest.mark.slow
def test_each_planted_defect_fails_its_rule(tmp_path):
    """A 64-row tile on 8 warps (pass 1 and forward), a 1-stage and a 2-stage loop (the pass-2
    kernel's two loops in the first): the gate's replication and overlap rules reject each (what
    the numbers are: benchmarks/NOTES.md)."""
    proc, planted = _offline(tmp_path, "--planted")
    assert proc.returncode == 0, proc.stdout[-3000:]
    for label, x in planted.items():
        assert any(p.startswith(x["expected"]) for p in x["problems"]), (label, x["problems"])
    ratios = {k: x["report"]["issued_over_useful"] for k, x in planted.items()}
    assert ratios["backward pass 1, 64 hidden rows on 8 warps"] > 1.10
    assert planted["pass-2 gemm (dz + dV), 1 stage"]["report"]["prefetch_distance"] == 0


def test_problems_flags_what_the_gate_forbids():
    from mimic_fast.ops.triton_offline import problems

    good = {"kernel": "_fused_mlp_fwd_kernel", "target": "sm_90a", "spill_store_bytes": 0,
            "shared_bytes": 1000, "shared_limit": 2000, "shared_estimate": 1500, "wgmma": 4,
            "mma_sync": 0, "cp_async": 0, "tma": 8, "atom_red": 0, "issued_over_useful": 1.0,
            "tile_macs": 100, "prefetch_distance": 2, "prologue_loads": 6, "loop_loads": 3,
            "loads_before_first_dot": False}
    assert problems("x", good) == []
    assert problems("x", {**good, "spill_store_bytes": 8}) == ["spills 8 bytes"]
    assert "no wgmma on sm_90a" in problems("x", {**good, "wgmma": 0, "mma_sync": 3})
    assert any("async" in p for p in problems("x", {**good, "tma": 0}))
    assert any("estimate" in p for p in problems("x", {**good, "shared_estimate": 900}))
    assert any("does not compile" in p for p in problems("x", {"error": "boom"}))
    assert any("reduce-adds" in p for p in problems("x", {**good, "atom_red": 2}))
    assert any("replicated" in p for p in problems("x", {**good, "issued_over_useful": 1.2}))
    assert any("not overlapped" in p for p in problems("x", {**good, "prefetch_distance": 1}))
    assert problems("x", {**good, "prefetch_distance": 1, "loads_before_first_dot": True}) == []
    reduce = {**good, "kernel": "_reduce_splits_kernel", "int32_split_offsets": ["%5 = arith.muli"]}
    assert any("int32 split offsets" in p for p in problems("x", reduce))


def test_split_offsets_and_main_loops_are_read_from_the_compiled_text():
    from mimic_fast.ops.triton_offline import int32_split_offsets, ptx_main_loop, ttgir_main_loop

    v2 = """  %y = scf.for %s = %c0_i32 to %n step %c1_i32 iter_args(%acc = %z) -> (f32) : i32 {
      %off = arith.muli %s, %stride_ps : i32 loc(#loc1)"""
    v3 = """  %y:2 = scf.for %s = %c0_i32 to %n step %c1_i32 iter_args(%acc = %z, %p = %q) : i32 {
      %p2 = tt.addptr %p, %stride : tensor<32x128x!tt.ptr<f32>>, tensor<32x128xi32>"""
    assert int32_split_offsets(v2) and not int32_split_offsets(v3)
    ptx = """$L__BB0_2:
  wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, {%r1, %r2}, %rd2, p, 1, 1;
  @%p1 bra $L__BB0_2;"""
    loop = ptx_main_loop(ptx)
    assert loop["loop_wgmma"] == 2 and loop["loop_macs_per_warpgroup"] == 64 * 32 * 16 + 64 * 128 * 16
    # A from shared memory (a descriptor) in the first, from registers in the second
    assert loop["loop_smem_operand_bytes_per_warpgroup"] == (64 * 16 + 32 * 16 + 128 * 16) * 2
    ttgir = """  tt.func @k() {
    ttng.async_tma_copy_global_to_local %Z[%a]
    ttng.async_tma_copy_global_to_local %Z[%b]
    %r = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) {
      %d = ttng.warp_group_dot %a, %b, %x
      ttng.async_tma_copy_global_to_local %Z[%c]
    } loc(#loc)
  }"""
    assert ttgir_main_loop(ttgir) == {"loop_dots": 1, "prologue_loads": 2, "loop_loads": 1,
                                      "loads_before_first_dot": False, "main_loops": 1}
    # the pass-2 kernel: a loop per scf.if branch, each with the prologue of its own region (the
    # then-branch's loads do not count for the else-branch's loop); the worse one is reported
    two = """  tt.func @k() {
    scf.if %p {
      ttng.async_tma_copy_global_to_local %A[%a]
      ttng.async_tma_copy_global_to_local %A[%b]
      %r = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) {
        %d = ttng.warp_group_dot %a, %b, %x
        ttng.async_tma_copy_global_to_local %A[%c]
      } loc(#loc)
    } else {
      %s = scf.for %i = %c0 to %n step %c1 iter_args(%x = %y) {
        ttng.async_tma_copy_global_to_local %B[%c]
        %d = ttng.warp_group_dot %a, %b, %x
      } loc(#loc)
    }
  }"""
    assert ttgir_main_loop(two) == {"loop_dots": 1, "prologue_loads": 0, "loop_loads": 1,
                                    "loads_before_first_dot": True, "main_loops": 2}
    ptx2 = ptx + """
$L__BB0_5:
  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
  wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1, %f2}, %rd1, %rd2, p, 1, 1, 0, 1;
  @%p1 bra $L__BB0_5;"""
    assert ptx_main_loop(ptx2)["loop_macs_per_warpgroup"] == 2 * 64 * 128 * 16  # the larger loop


def test_backend_refuses_pre_hopper_gpus(monkeypatch):
    T = dispatch.get("triton")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    why = T.reasons(dispatch.Problem("mlp", torch.device("cuda"), torch.bfloat16, 4, 5, 250, 8000,
                                     183, "relu"))
    assert any("sm_80" in r and "cuda backend" in r for r in why), why
