"""The triton backend's autotuning rules, on CPU (the interpreter runs the kernels; CUDA-graph
capture is mocked): keyed by a batch-size bucket, never benchmarking while a graph is captured (the
cached config, else the first config the pruning keeps, not cached), each tuning's time logged."""
import pytest
import torch

from mimic_fast import dispatch

triton = pytest.importorskip("triton")
tl = triton.language
T = dispatch.get("triton") if dispatch.why_not("triton", dispatch.Problem(
    "mlp", torch.device("cpu"), torch.float32, 1, 1, 1, 1, 1, "relu")) == [] else None
pytestmark = pytest.mark.skipif(T is None, reason="triton backend cannot run here (needs triton and "
                                "TRITON_INTERPRET=1 or a GPU)")


def test_every_autotuned_kernel_is_keyed_by_the_batch_bucket():
    from mimic_fast.ops import triton_plan as P

    K = T.K
    for name in ("fwd", "bwd", "gemm"):
        tuner = K.kernel(name)
        assert isinstance(tuner, K._Autotuner) and "B_KEY" in tuner.keys, name
    assert [P.b_key(b) for b in (1, 100, 128, 129, 4096)] == [1, 128, 128, 256, 4096]


def _tuned_add(do_bench):
    K = T.K
    configs = [triton.Config({}, num_warps=1), triton.Config({}, num_warps=2)]

    @K.autotune(configs=configs, key=["n"], prune=lambda c, nargs, **kw: list(c), do_bench=do_bench)
    @triton.jit
    def add_one(X, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(X + offs, tl.load(X + offs, mask=offs < n) + 1.0, mask=offs < n)

    return add_one


def test_no_benchmarking_while_a_cuda_graph_is_captured(monkeypatch):
    K = T.K
    benched = []

    def do_bench(fn, quantiles=None):
        benched.append(1)
        fn()
        return [1.0, 1.0, 1.0]

    add_one = _tuned_add(do_bench)
    x = torch.zeros(8)
    monkeypatch.setattr(K, "_capturing", lambda: True)
    assert add_one.decide((x, 8), {"BLOCK": 8}, True) == "first"
    add_one[(1,)](x, 8, BLOCK=8)  # captured: the first pruned config, nothing benchmarked or cached
    assert benched == [] and add_one.cache == {} and torch.equal(x, torch.ones(8))

    monkeypatch.setattr(K, "_capturing", lambda: False)
    log = len(K.TUNING_LOG)
    x = torch.zeros(8)
    add_one[(1,)](x, 8, BLOCK=8)  # outside a capture: both configs benchmarked, the pick cached
    assert len(benched) == 2 and len(add_one.cache) == 1
    assert len(K.TUNING_LOG) == log + 1 and K.TUNING_LOG[-1]["kernel"] == "add_one"
    assert K.TUNING_LOG[-1]["seconds"] >= 0 and "8" in K.TUNING_LOG[-1]["key"]
    # a benchmark run adds 1 per timed call: the result is that of the one real launch at most
    assert torch.all(x >= 1)

    monkeypatch.setattr(K, "_capturing", lambda: True)
    x = torch.zeros(8)
    assert add_one.decide((x, 8), {"BLOCK": 8}, True) == "cached"
    add_one[(1,)](x, 8, BLOCK=8)  # captured again: the cached config, no benchmark
    assert len(benched) == 2 and torch.equal(x, torch.ones(8))
    assert add_one.decide((x, 9), {"BLOCK": 16}, False) == "tune"  # another key tunes again


def test_a_single_config_is_never_tuned():
    K = T.K
    if not K.INTERPRET:
        pytest.skip("the GPU's kernels have several configs")
    assert all(K.kernel(n).decide((), {}, False) == "single" for n in ("fwd", "bwd", "gemm"))
