"""Per-op benchmarks: bottleneck_mlp (forward/backward/full), mimic_loss (forward/full), logit losses.

Each (op, pass, provider) is checked against the float64 reference first; extra_info carries the
FLOP/byte counts, shapes, dtype, device and versions that `mimic-fast bench --report` renders.
"""
import pytest
import torch
from bench_common import (COMPILE_MODE, DEVICE, DTYPE, LOSS_SIZES, MLP_SIZES, ON_GPU, PAPER, ROUNDS,
                          checked, record, sync_wrap)

from mimic_fast.bench.providers import LOSS_PROVIDERS, MLP_PROVIDERS, Case, Runner, make_inputs
from mimic_fast.bench.suites import reset_compiler

MLP_PASSES = [("bottleneck_mlp", p) for p in ("forward", "backward", "full")] + \
    [("mimic_loss", p) for p in ("forward", "full")]
_runners = {}


def _runner(provider, case):
    key = (provider, case)
    if key not in _runners:
        _runners.clear()  # one live case at a time: the paper sizes are large
        if provider == "compile":
            reset_compiler()
        _runners[key] = Runner(provider, case, make_inputs(case), COMPILE_MODE)
    return _runners[key]


def _bench(benchmark, runner, case, provider, pass_):
    fn, setup = runner.timed(pass_)
    fn = sync_wrap(fn)
    if setup is None:
        benchmark.pedantic(fn, rounds=ROUNDS, warmup_rounds=1)
    else:
        benchmark.pedantic(fn, setup=lambda: (setup(), {}), rounds=ROUNDS, warmup_rounds=1)
    info = {"name": f"{case.op}/{pass_}/{provider}/{case.label()}/{case.dtype}/{case.device}",
            "op": case.op, "pass": pass_, "provider": provider, "shape": case.shape(),
            "dtype": case.dtype, "device": case.device, "flops": case.flops(pass_),
            "bytes": case.bytes(pass_)}
    if pass_ == "full" and ON_GPU:
        from mimic_fast.bench.memory import cuda_peak_bytes

        info["peak_mem_bytes"] = cuda_peak_bytes(runner.full)
    record(benchmark, **info)


@pytest.mark.parametrize("B,H", MLP_SIZES, ids=[f"B{b}-H{h}" for b, h in MLP_SIZES])
@pytest.mark.parametrize("provider", MLP_PROVIDERS)
@pytest.mark.parametrize("op,pass_", MLP_PASSES, ids=[f"{o}-{p}" for o, p in MLP_PASSES])
def test_mlp_op(benchmark, op, pass_, provider, B, H):
    case = Case(op, B, PAPER["C"], PAPER["D"], PAPER["k"], H, DTYPE, DEVICE)
    benchmark.group = f"{op}-{pass_}-{case.label()}"
    checked(provider, case)
    try:
        runner = _runner(provider, case)
        _bench(benchmark, runner, case, provider, pass_)
    except torch.cuda.OutOfMemoryError as e:
        _runners.clear()
        pytest.skip(f"out of memory: {e}")


@pytest.mark.parametrize("B", LOSS_SIZES)
@pytest.mark.parametrize("provider", LOSS_PROVIDERS)
@pytest.mark.parametrize("pass_", ["forward", "full"])
@pytest.mark.parametrize("op", ["logit_mse_loss", "kd_loss"])
def test_loss_op(benchmark, op, pass_, provider, B):
    case = Case(op, B, PAPER["C"], dtype=DTYPE, device=DEVICE)
    benchmark.group = f"{op}-{pass_}-{case.label()}"
    checked(provider, case)
    _bench(benchmark, Runner(provider, case, make_inputs(case), None), case, provider, pass_)
