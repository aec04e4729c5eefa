"""Shared by the pytest-benchmark suites: sizes, correctness-before-timing, extra_info.

Run:  pytest benchmarks/ --benchmark-json=benchmarks/results/pytest_cpu.json
CPU sizes (B=256, H=32768, the issue's target shape) finish in a few minutes on 2 cores; with a
CUDA device the paper sizes run instead. MIMIC_BENCH_DEVICE=cpu|cuda and MIMIC_BENCH_ROUNDS override.
"""
import os

import pytest
import torch

from mimic_fast.bench import timing
from mimic_fast.bench.providers import check_provider, unavailable

DEVICE = os.environ.get("MIMIC_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
ON_GPU = DEVICE == "cuda"
ROUNDS = int(os.environ.get("MIMIC_BENCH_ROUNDS", "20" if ON_GPU else "5"))
DTYPE = "bfloat16" if ON_GPU else "float32"
PAPER = {"D": 1845, "k": 250, "C": 183}
# (B, H) per device: the CPU target shape; on a GPU the paper's batch and widths.
MLP_SIZES = [(4096, 8000), (4096, 32768), (4096, 400000)] if ON_GPU else [(256, 32768)]
LOSS_SIZES = [4096, 1 << 20] if ON_GPU else [4096, 65536]
COMPILE_MODE = "max-autotune" if ON_GPU else None

_checked = {}
_ENV = None


def env():
    global _ENV
    if _ENV is None:
        _ENV = timing.environment(DEVICE)
    return _ENV


def checked(provider, case):
    """Skip if the provider cannot run here; fail (never time) if it is wrong. Cached per case."""
    why = unavailable(provider, case)
    if why:
        pytest.skip(why)
    key = (provider, case)
    if key not in _checked:
        try:
            check_provider(provider, case, COMPILE_MODE, small=provider != "compile")
            _checked[key] = None
        except AssertionError as e:
            _checked[key] = str(e)
    if _checked[key]:
        pytest.fail(f"{provider} is incorrect on {case.label()}, not timed: {_checked[key]}")


def sync_wrap(fn):
    if not ON_GPU:
        return fn

    def run(*a):
        out = fn(*a)
        torch.cuda.synchronize()
        return out
    return run


def record(benchmark, **info):
    """extra_info: the case, its FLOP/byte counts, and the throughput they give at the median time."""
    # Under --benchmark-disable (a smoke run) the function ran once untimed and there are no stats.
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None else None  # seconds; the run is over here
    if median and info.get("flops"):
        info["achieved_tflops"] = info["flops"] / median / 1e12
    if median and info.get("bytes"):
        info["achieved_gbps"] = info["bytes"] / median / 1e9
    benchmark.extra_info.update(info)
    benchmark.extra_info["env"] = env()
