"""The triton backend's cost model (ops/triton_cost.py) at the paper shape, through the CLI.

Asserted: executed FLOPs <= 1.10x the one-recompute floor (written out here, independently of
ops/flops.py), the per-kernel counts against the plan's tiles, and issue 18's model targets on the
H100 preset: H=400k bf16 training step <= 8.5 ms, forward <= 2.2 ms, H=8000 step <= 0.25 ms. GPU
times stay unmeasured; these are predictions.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _model(tmp_path, *args):
    out = tmp_path / "model.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "mimic_fast", "bench", "model", "--json", str(out),
                           *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout, json.loads(out.read_text())


def _floor(B, D, k, H, C):
    """The one-recompute floor written out here, independently of ops/flops.py: multiply-adds per
    sample of z = x Uᵀ, a = z Vᵀ, y = h Wᵀ (forward); dU, dx, and per hidden unit a again (the
    recompute), dW, dh, dV, dz (backward). 2 FLOPs per multiply-add."""
    fwd = 2 * B * (D * k + k * H + H * C)
    bwd = 2 * B * (2 * D * k + 3 * k * H + 2 * H * C)
    return {"forward": fwd, "full": fwd + bwd}


def test_paper_shape_meets_the_offline_targets(tmp_path):
    stdout, preds = _model(tmp_path)
    assert "TFLOP executed" in stdout and "backward pass 1" not in stdout and "bwd" in stdout
    by_H = {p["shape"]["H"]: p for p in preds}
    assert set(by_H) == {8000, 400000}
    for H, p in by_H.items():
        peak = p["rates"]["tflops"] * 1e12
        for pass_ in ("forward", "full"):
            t = p[pass_]
            assert t["model_flops"] == _floor(4096, 1845, 250, H, 183)[pass_]
            assert t["flops"] == sum(x["flops"] for x in t["kernels"])
            assert 1.0 <= t["flops"] / t["model_flops"] <= 1.10, (H, pass_, t["flops"] / t["model_flops"])
            assert t["time_s"] >= t["model_flops"] / peak  # no faster than the peak allows
            assert t["atomic_bytes"] == 0  # no reduce-adds
        assert p["step_ms"] == pytest.approx(p["full"]["time_s"] * 1e3)
        assert all(k["bound"] in ("compute", "hbm", "l2", "reduce_add") for k in p["full"]["kernels"])
    assert p["rates"]["preset"] == "h100"
    assert by_H[400000]["step_ms"] <= 8.5 and by_H[400000]["forward_ms"] <= 2.2
    assert by_H[8000]["step_ms"] <= 0.25


def test_counts_follow_the_plan(tmp_path):
    """Per-kernel executed FLOPs against the tiles, written out here: forward 128 x 32 tiles, pass 1
    hidden tiles of 128, the workspace chunks at most 256 MiB."""
    _, (pred,) = _model(tmp_path, "--H", "400000", "--B", "1000")
    plan = pred["plan"]
    assert plan["KP"] == 256 and (plan["C1"], plan["C2"]) == (128, 64) and plan["rows"] == 1024
    assert plan["workspace_bytes"] <= 256 * 2**20 and plan["ws_rows"] <= 400000 // 4
    roles = pred["full"]["roles"]
    assert roles["fwd"]["flops"] == 2 * 1024 * 400000 * (256 + 192)  # 400000 = 12500 tiles of 32
    assert roles["bwd"]["flops"] == 2 * 1024 * 400000 * (256 + 2 * 192)  # 3125 tiles of 128
    assert roles["bwd"]["launches"] == plan["n_chunks"] == roles["dz + dV"]["launches"]
    # dV: chunks are whole 128-row tiles; dz: each chunk's 1250 K blocks of 64 in dz_splits = 8
    # splits of 157 (6 zero-filled blocks executed per chunk)
    assert (plan["n_chunks"], plan["ws_rows"]) == (5, 80000)
    assert (plan["dv_splits"], plan["dz_splits"]) == (1, 8)
    assert roles["dz + dV"]["flops"] == 2 * 1024 * 256 * (400000 + 5 * 8 * 157 * 64)
    fwd = next(k for k in pred["full"]["kernels"] if k["role"] == "fwd")
    assert fwd["programs"] == 8 * plan["fwd_splits"]


def test_the_model_needs_no_gpu_and_no_compiler(tmp_path):
    """The model reads the plan only: the same figures in an interpreter process as in the CLI."""
    from mimic_fast.ops.triton_cost import predict

    _, (cli,) = _model(tmp_path, "--H", "8000")
    here = predict(4096, 1845, 250, 8000, 183)
    assert here["full"]["time_s"] == pytest.approx(cli["full"]["time_s"])
    assert here["plan"] == cli["plan"]
    with pytest.raises(ValueError, match="sm_90a"):
        predict(4096, 1845, 250, 8000, 183, target="sm_80")


def test_presets_are_the_issue_figures_and_measured_rates_replace_them():
    from mimic_fast.ops.triton_cost import GPUS, kernel_time, rates_for

    assert {k: (v["tflops"], v["hbm_tbs"], v["l2_tbs"], v["reduce_add_tbs"]) for k, v in GPUS.items()} \
        == {"h100": (798.0, 3.0, 7.0, 3.0), "h200": (788.0, 4.3, 10.0, 3.0)}
    r = rates_for("h200", peak_tflops=700.0)
    assert r["tflops"] == 700.0 and r["l2_tbs"] == 10.0 and r["preset"] == "h200"
    # each term can bound a kernel
    h100 = GPUS["h100"]
    assert kernel_time(798e12, 0, 0, 0, h100)[1:2] == ("compute",)
    assert kernel_time(1e9, 3e12, 0, 0, h100)[0] == 1.0
    assert kernel_time(1e9, 0, 14e12, 0, h100)[:2] == (2.0, "l2")
    assert kernel_time(1e9, 0, 0, 6e12, h100)[:2] == (2.0, "reduce_add")
    assert kernel_time(798e12, 0, 0, 0, h100, busy=0.5)[0] == 2.0
    with pytest.raises(ValueError, match="h100"):
        rates_for("a100")


def test_pass2_splits_fill_the_gpu_with_the_fewest_partials():
    """The pass-2 launch runs dz and dV programs side by side; the plan picks the splits with the
    fewest fp32 partial bytes that keep 132 SMs >= 90% busy (scheduled in launch order)."""
    from mimic_fast.ops import triton_plan as P

    assert P.makespan([(3, 3)], 2) == 6 and P.makespan([(1, 5), (5, 1)], 2) == 5
    assert P.makespan([(2, 4), (3, 1)], 3) == 4 and P.makespan([], 4) == 0
    p = P.plan(4096, 250, 8000, 183, 2, device=P.OFFLINE_DEVICE, interpret=False)
    assert (p.n_chunks, p.ws_rows, p.dv_splits, p.dz_splits) == (5, 1664, 5, 2)
    # 32 batch tiles x 2 splits of 13 K blocks (dz), 13 hidden tiles x 5 splits of 13 (dV)
    assert P.pass2_programs(p, 1664) == [(64, 13), (65, 13)]
    assert P.pass2_busy(p, 1664, useful=True) == pytest.approx((32 * 26 + 13 * 64) / (132 * 13))

    def partial(s_dv, s_dz):
        return 2 * s_dz * p.rows + (2 * s_dv * p.ws_rows if s_dv > 1 else 0)

    for s_dv in range(1, 17):
        for s_dz in range(1, 7):
            if partial(s_dv, s_dz) < partial(5, 2):
                q = p._replace(dv_splits=s_dv, dz_splits=s_dz)
                assert P.pass2_busy(q, 1664, useful=True) < 0.9, (s_dv, s_dz)
    big = P.plan(4096, 250, 400000, 183, 2, device=P.OFFLINE_DEVICE, interpret=False)
    assert (big.dv_splits, big.dz_splits) == (1, 2)  # 241 dV tiles need no split
