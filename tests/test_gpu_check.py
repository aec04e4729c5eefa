"""`bash scripts/gpu_check.sh --dry-run` on CPU: the one GPU command cannot rot between GPU runs.

The dry run collects (pytest --collect-only) every test file, -k selector and pytest option the
script names and fails when one selects nothing, runs the probe, the headline (triton vs eager, the
cost model beside it) and the benchmark harness end to end at tiny shapes, and checks that $OUT holds at most 8 files, none deeper than two folders (what the
GPU machine returns). ~40 s on 2 cores.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.sh")
STAGES = ("probe", "headline", "triton", "selectors", "build", "bench", "student", "cuda", "rest-tri", "rest",
          "outputs")


@pytest.mark.slow
def test_dry_run_passes_and_writes_the_expected_files(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(["bash", SCRIPT, "--dry-run"], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=600)
    summary = (tmp_path / "summary.txt").read_text() if (tmp_path / "summary.txt").exists() else ""
    assert proc.returncode == 0, f"dry run failed (rc {proc.returncode}):\n{summary}\n{proc.stderr[-3000:]}"
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines()[1:]
            if line.split() and line.split()[0] in STAGES}
    assert rows == {s: "0" for s in STAGES}, summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["bench.json", "bench.log", "build.log", "env.json", "headline.json",
                     "student.json", "summary.txt", "tests.log"], files
    head = json.loads((tmp_path / "headline.json").read_text())  # triton vs eager, model beside it
    assert [c["shape"]["H"] for c in head["cases"]] == [256, 64] and head["peaks_after"]
    for c in head["cases"]:
        assert c["providers"]["triton"]["median_ms"] > 0 and c["providers"]["eager"]["median_ms"] > 0
        assert c["providers"]["triton"]["predicted"]["step_ms"] > 0
    assert "step times (headline.json) on cpu" in summary
    bench = json.loads((tmp_path / "bench.json").read_text())
    for label, model in bench["cost_model"].items():  # mimic_fast.ops.triton_cost beside the figures
        assert "error" not in model, (label, model)
        assert model["full"]["time_s"] > model["forward"]["time_s"] > 0
    assert json.loads((tmp_path / "env.json").read_text())["api"]["_addmm_activation"]["ok"]
    # the short table is the last thing printed, as on the GPU machine
    tail = proc.stdout.rstrip().splitlines()[-3:]
    assert any("samples/s" in line or "target:" in line for line in tail), tail


def test_usage_error_exits_2():
    proc = subprocess.run(["bash", SCRIPT, "all"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "usage" in proc.stderr
