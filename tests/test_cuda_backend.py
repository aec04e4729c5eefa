"""The cuda backend (csrc/cuda + mimic_fast/ops/cuda.py).

On CPU: what the backend reports when it cannot run, and the autograd wiring of its loss functions
(run on a PyTorch emulation of the kernels' contract, float64, against mimic_fast.functional).
On a GPU with the extension built: kernels against the float64 reference (float32 within the
tolerance table, bf16/fp16 by the 2x rule) at aligned and misaligned narrow dims (k=250, C=183),
loss kernels against functional, determinism, the chunk loops' own graph replay against the same
step uncaptured (outputs never aliased, in-place parameter updates seen, no host sync in steady
state under set_sync_debug_mode("error")), a caller's own capture, rejected activation/reduction
codes, opcheck, torch.compile, the peak-memory proof that no (B, H) tensor exists, and no dx when x
needs no gradient.
"""
import pytest
import torch
import torch.nn.functional as F

import mimic_fast as mf
from mimic_fast import dispatch, functional
from mimic_fast.activations import ACTIVATION_CODES, ACTIVATIONS, act, act_grad
from mimic_fast.ops import cuda
from mimic_fast.testing import assert_close, assert_within_2x
from tests.helpers import eager_mlp, make_mlp_inputs, to64

PARAMS = ("x", "U", "V", "b1", "W", "b2")
LOW = (torch.bfloat16, torch.float16)
gpu = pytest.mark.skipif(cuda.availability() is not None,
                         reason=f"cuda backend unavailable here: {cuda.availability()}")


def _grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    present = [t for t in inputs if t is not None]
    grads = iter(torch.autograd.grad(out, present, g.to(out.device, out.dtype)))
    return [None if t is None else next(grads) for t in inputs]


def _check(got, want64, baseline, name):
    """float32: the tolerance table; bf16/fp16: the 2x rule against plain PyTorch in that dtype."""
    if got is None or want64 is None:
        assert got is None and want64 is None, f"{name}: one side is None"
        return
    if got.dtype == torch.float32:
        assert_close(got, want64, name, dtype=torch.float32)
    else:
        assert_within_2x(got, want64, baseline, name)


# ---- CPU: reporting ---------------------------------------------------------------------------------
def test_availability_says_why_not():
    reason = cuda.availability()
    if torch.version.cuda is None:
        assert reason is not None and "without CUDA" in reason and torch.__version__ in reason
    elif reason is not None:
        assert "_C_cuda" in reason or "is_available" in reason
    report = mf.info()["backends"]["cuda"]
    assert report["available"] is (reason is None)
    assert report["reason"] == reason
    assert report["built"] is (cuda._IMPORT_ERROR is None)
    assert isinstance(report["arch_list"], str) and report["arch_list"]


def test_info_says_auto_keeps_a_fixed_order_until_measured():
    auto = mf.info()["auto"]
    assert auto["order"]["cuda"] == list(dispatch.AUTO_ORDER["cuda"]) == ["triton", "cuda", "reference"]
    assert "not measured" in auto["why"]
    assert "auto: cuda: triton > cuda > reference" in dispatch.format_info()


def test_reasons_name_device_dtype_and_teacher_dtype():
    p = dispatch.Problem("mimic", torch.device("cpu"), torch.float64, 4, 5, 2, 7, 3, "relu",
                         torch.float64)
    why = cuda.reasons(p)
    assert len(why) == 3, why
    assert "cpu" in why[0] and "CUDA tensors" in why[0]
    assert "torch.float64" in why[1] and "bfloat16" in why[1]
    assert "teacher_logits" in why[2]
    ok = p._replace(device=torch.device("cuda", 0), dtype=torch.bfloat16, teacher_dtype=torch.float16)
    if cuda.availability() is not None:  # on a GPU this would also check the compiled archs
        assert cuda.reasons(ok) == []


@pytest.mark.skipif(cuda.availability() is None, reason="the cuda backend is available here")
def test_asking_for_cuda_when_unavailable_raises_with_the_reason():
    x, U, V, b1, W, b2 = make_mlp_inputs(2, 3, 2, 5, 2)
    with pytest.raises(ValueError, match="backend 'cuda' cannot serve") as err:
        mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="cuda")
    assert cuda.availability() in str(err.value)
    for loss in (lambda: mf.logit_mse_loss(x, x, backend="cuda"), lambda: mf.kd_loss(x, x, backend="cuda")):
        with pytest.raises(ValueError, match="backend 'cuda' cannot serve") as err:
            loss()
        assert cuda.availability() in str(err.value)


# ---- CPU: autograd wiring of the loss functions (emulated kernels, float64) --------------------------
def _logit_mse_emulated(s, t, reduction, zero_mean):
    """The loss kernel's contract in PyTorch: (loss in s's dtype, float32+ dy_unit)."""
    acc = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
    r = s.to(acc) - t.to(acc)
    if zero_mean:
        r = r - r.mean(dim=-1, keepdim=True)
    n = r.numel()
    if reduction == "mean":
        loss, dy = (r * r).sum() / n, r * (2.0 / max(n, 1))
    elif reduction == "sum":
        loss, dy = (r * r).sum(), 2.0 * r
    else:
        loss, dy = r * r, 2.0 * r
    return loss.to(s.dtype), dy


def _kd_emulated(s, t, T):
    """The KD kernel's contract in PyTorch: (loss in s's dtype, float32+ dy_unit)."""
    lq, lp, loss = cuda._kd_terms(s, t, T)
    return loss.to(s.dtype), (lq.exp() - lp.exp()) * (T / max(s.shape[0], 1))


@pytest.fixture
def emulated_kernels(monkeypatch):
    """Replace the two loss kernels by their contract so the autograd wiring runs on CPU tensors."""
    monkeypatch.setattr(cuda, "_logit_mse_kernel", _logit_mse_emulated)
    monkeypatch.setattr(cuda, "_kd_kernel", _kd_emulated)


@pytest.mark.parametrize("zero_mean", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_logit_mse_wiring_matches_functional(reduction, zero_mean, emulated_kernels):
    s = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    t = (torch.randn(2, 3, 7, dtype=torch.float64) + 2.0).requires_grad_()
    ours = cuda.logit_mse_loss(s, t, reduction, zero_mean)
    want = functional.logit_mse_loss(s, t, reduction, zero_mean)
    assert ours.shape == want.shape and ours.dtype == want.dtype
    assert_close(ours, want, "loss")
    g = torch.randn_like(want)
    for name, a, b in zip("st", torch.autograd.grad(ours, (s, t), g), torch.autograd.grad(want, (s, t), g)):
        assert_close(a, b, f"d{name}")


def test_logit_mse_wiring_gradcheck_zero_mean_none(emulated_kernels):
    s = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: cuda.logit_mse_loss(a, b, "none", True), (s, t))


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_wiring_matches_functional_for_both_arguments(T, emulated_kernels):
    s = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 11, dtype=torch.float64, requires_grad=True)
    ours, want = cuda.kd_loss(s, t, T), functional.kd_loss(s, t, T)
    assert_close(ours, want, "kd")
    for name, a, b in zip("st", torch.autograd.grad(ours * 3, (s, t)), torch.autograd.grad(want * 3, (s, t))):
        assert_close(a, b, f"d{name}")
    assert torch.autograd.gradcheck(lambda a, b: cuda.kd_loss(a, b, T), (s, t))


def test_empty_batches_give_nan_like_functional(emulated_kernels):
    s = torch.randn(0, 5, dtype=torch.float64)
    assert torch.isnan(cuda.logit_mse_loss(s, s, "mean")) and torch.isnan(functional.logit_mse_loss(s, s))
    assert cuda.logit_mse_loss(s, s, "sum").item() == 0.0
    assert torch.isnan(cuda.kd_loss(s, s, 2.0)) and torch.isnan(functional.kd_loss(s, s, 2.0))


# ---- GPU: epilogue kernels ---------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("dtype", [torch.float32, *LOW])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("cols, bias", [(64, "aligned"), (37, "aligned"), (64, "offset"), (40, None)])
def test_epilogues_match_activations(activation, dtype, cols, bias):
    a = (torch.randn(9, cols, dtype=torch.float64) * 3).cuda()
    if bias == "offset":  # b's data pointer is not 16-byte aligned: the scalar path
        b = (torch.randn(cols + 1, dtype=torch.float64)[1:]).cuda()
    else:
        b = torch.randn(cols, dtype=torch.float64).cuda() if bias else None
    dh = torch.randn(9, cols, dtype=torch.float64).cuda()
    pre64 = a + (b if b is not None else 0)
    a_, b_, dh_ = a.to(dtype), None if b is None else b.to(dtype), dh.to(dtype)
    if bias == "offset":
        b_ = torch.empty(cols + 1, dtype=dtype, device="cuda")[1:].copy_(b)
    pre = a_ + (b_ if b_ is not None else 0)  # plain PyTorch in dtype: the 2x baseline
    code = ACTIVATION_CODES[activation]
    h = torch.ops.mimic_fast.cuda_bias_act(a_, b_, code)
    h2, da = torch.ops.mimic_fast.cuda_bias_act_bwd(a_, b_, dh_, code)
    _check(h, act(pre64, activation), act(pre, activation), "h")
    _check(h2, act(pre64, activation), act(pre, activation), "h (bwd)")
    _check(da, dh * act_grad(pre64, activation), dh_ * act_grad(pre, activation), "da")


# ---- GPU: the MLP and the fused mimic loss ----------------------------------------------------------
@gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape, chunk", [((1, 7, 1, 300, 1), 128), ((13, 5, 3, 1025, 6), 256),
                                          ((64, 40, 16, 2100, 33), 0), ((5, 9, 4, 777, 3), 128)])
def test_float32_matches_float64_reference(shape, chunk, activation, monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(chunk))
    inputs = make_mlp_inputs(*shape, dtype=torch.float32, device="cuda", bias=shape[0] != 5)
    inputs64 = to64(inputs)
    y = mf.bottleneck_mlp(*inputs, activation=activation, backend="cuda")
    y64 = eager_mlp(*inputs64, activation)
    assert y.dtype == torch.float32
    _check(y, y64, None, "y")
    for name, got, want in zip(PARAMS, _grads(y, inputs), _grads(y64, inputs64)):
        _check(got, want, None, f"d{name}")


@gpu
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_low_precision_2x_rule(dtype, activation, monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(512))  # several chunks, a ragged last one
    inputs = make_mlp_inputs(64, 40, 16, 2100, 33, dtype=dtype, device="cuda", lead=(8, 8))
    inputs64 = to64(inputs)
    y = mf.bottleneck_mlp(*inputs, activation=activation, backend="cuda")
    y64, y_torch = eager_mlp(*inputs64, activation), eager_mlp(*inputs, activation)
    assert y.dtype == dtype and y.shape == (8, 8, 33)
    _check(y, y64, y_torch, "y")
    for name, got, want, base in zip(PARAMS, _grads(y, inputs), _grads(y64, inputs64),
                                     _grads(y_torch, inputs)):
        assert got.dtype == dtype
        _check(got, want, base, f"d{name}")


@gpu
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype, t_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float16),
                                            (torch.float16, torch.float16)])
def test_mimic_loss_matches_mse_of_reference(reduction, dtype, t_dtype, monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(384))
    inputs = make_mlp_inputs(48, 30, 8, 1000, 183, dtype=dtype, device="cuda")
    inputs64 = to64(inputs)
    t = torch.randn(48, 183, device="cuda").to(t_dtype)
    loss = mf.mimic_loss(*inputs, t, "relu", reduction, backend="cuda")
    loss64 = F.mse_loss(eager_mlp(*inputs64, "relu"), t.double(), reduction=reduction)
    loss_torch = F.mse_loss(eager_mlp(*inputs, "relu"), t.to(dtype), reduction=reduction)
    assert loss.dtype == dtype and loss.shape == loss64.shape
    _check(loss, loss64, loss_torch, "loss")
    for name, got, want, base in zip(PARAMS, _grads(loss, inputs), _grads(loss64, inputs64),
                                     _grads(loss_torch, inputs)):
        _check(got, want, base, f"d{name}")


@gpu
def test_no_tensor_of_B_by_H_elements_is_allocated(monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(1024))
    B, H = 512, 16384
    inputs = make_mlp_inputs(B, 64, 32, H, 8, dtype=torch.bfloat16, device="cuda")
    t = torch.randn(B, 8, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    mf.mimic_loss(*inputs, t, "gelu", backend="cuda").backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    one_hidden = B * H * 2
    assert peak < one_hidden // 2, f"peak {peak} B: a (B, H) bf16 tensor is {one_hidden} B"


# ---- GPU: loss kernels ------------------------------------------------------------------------------
PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.float16), (torch.bfloat16, torch.bfloat16),
         (torch.float16, torch.float16), (torch.float32, torch.bfloat16)]


def _loss_inputs(shape, s_dtype, t_dtype):
    s64 = (torch.randn(*shape, dtype=torch.float64) * 3).cuda()
    t64 = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).cuda()
    s, t = s64.to(s_dtype).requires_grad_(), t64.to(t_dtype).requires_grad_()
    # The float64 reference sees exactly the values the kernel reads.
    return s, t, s.detach().double().requires_grad_(), t.detach().double().requires_grad_()


@gpu
@pytest.mark.parametrize("s_dtype, t_dtype", PAIRS)
@pytest.mark.parametrize("zero_mean", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(3, 5, 183), (16, 4096), (7, 1)])
def test_logit_mse_kernel_matches_functional(shape, reduction, zero_mean, s_dtype, t_dtype):
    s, t, s64, t64 = _loss_inputs(shape, s_dtype, t_dtype)
    loss = cuda.logit_mse_loss(s, t, reduction, zero_mean)
    loss64 = functional.logit_mse_loss(s64, t64, reduction, zero_mean)
    # Plain PyTorch on the same mixed-dtype inputs is the 2x rule's baseline.
    sb, tb = s.detach().requires_grad_(), t.detach().requires_grad_()
    base = functional.logit_mse_loss(sb, tb, reduction, zero_mean, backend="reference")
    assert loss.dtype == s_dtype and loss.shape == loss64.shape
    _check(loss, loss64, base, "loss")
    g = torch.rand_like(loss64) + 0.5
    ds, dt = torch.autograd.grad(loss, (s, t), g.to(loss.dtype))
    ds64, dt64 = torch.autograd.grad(loss64, (s64, t64), g)
    dsb, dtb = torch.autograd.grad(base, (sb, tb), g.to(base.dtype))
    assert ds.dtype == s_dtype and dt.dtype == t_dtype
    _check(ds, ds64, dsb, "ds")
    _check(dt, dt64, dtb, "dt")


@gpu
@pytest.mark.parametrize("s_dtype, t_dtype", PAIRS)
@pytest.mark.parametrize("C", [1, 10, 183, 1024, 4096, 32000])
@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kd_kernel_matches_functional(C, T, s_dtype, t_dtype):
    s, t, s64, t64 = _loss_inputs((2, 3, C), s_dtype, t_dtype)
    loss = cuda.kd_loss(s, t.detach(), T)
    loss64 = functional.kd_loss(s64, t64.detach(), T)
    sb = s.detach().requires_grad_()
    base = (functional.kd_loss(sb, t.detach().to(s_dtype), T, backend="reference")
            if s_dtype in LOW else None)
    assert loss.dtype == s_dtype and loss.dim() == 0
    _check(loss, loss64, base, "kd")
    (ds,) = torch.autograd.grad(loss, (s,))
    (ds64,) = torch.autograd.grad(loss64, (s64,))
    dsb = torch.autograd.grad(base, (sb,))[0] if base is not None else None
    _check(ds, ds64, dsb, "ds")


@gpu
def test_kd_teacher_gradient_and_identical_logits():
    s, t, s64, t64 = _loss_inputs((4, 300), torch.float32, torch.float32)
    ours, want = cuda.kd_loss(s, t, 2.0), functional.kd_loss(s64, t64, 2.0)
    assert_close(torch.autograd.grad(ours, t)[0], torch.autograd.grad(want, t64)[0], "dt",
                 dtype=torch.float32)
    assert cuda.kd_loss(s.detach(), s.detach(), 2.0).item() == 0.0


@gpu
def test_loss_kernels_are_deterministic_across_many_blocks():
    s, t, _, _ = _loss_inputs((5000, 183), torch.bfloat16, torch.float16)
    s, t = s.detach(), t.detach()
    for fn in (lambda: torch.ops.mimic_fast.cuda_logit_mse(s, t, 0, False),
               lambda: torch.ops.mimic_fast.cuda_logit_mse(s, t, 1, True),
               lambda: torch.ops.mimic_fast.cuda_kd_loss(s, t, 4.0)):
        first = fn()
        for _ in range(3):
            again = fn()
            assert all(torch.equal(a, b) for a, b in zip(first, again))


@gpu
@pytest.mark.parametrize("activation", ["relu", "gelu"])  # relu: cuBLASLt's fused bias+ReLU path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_misaligned_narrow_dims_and_ragged_chunks(dtype, activation, monkeypatch):
    # k=250, C=183 (the paper's: rows of 500 / 366 bytes) and H=1001 (W's rows misaligned too): every
    # operand goes through the padded buffers, the last chunk is ragged and not a multiple of 8.
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(384))
    inputs = make_mlp_inputs(40, 24, 250, 1001, 183, dtype=dtype, device="cuda")
    inputs64 = to64(inputs)
    t = torch.randn(40, 183, device="cuda").to(dtype)
    with cuda.graphs(False):
        loss = mf.mimic_loss(*inputs, t, activation, backend="cuda")
        grads = _grads(loss, inputs)
    loss64 = F.mse_loss(eager_mlp(*inputs64, activation), t.double())
    base = F.mse_loss(eager_mlp(*inputs, activation), t) if dtype != torch.float32 else None
    _check(loss, loss64, base, "loss")
    base_grads = _grads(base, inputs) if base is not None else [None] * len(inputs)
    for name, got, want, b in zip(PARAMS, grads, _grads(loss64, inputs64), base_grads):
        _check(got, want, b, f"d{name}")


def _training_step(inputs, t, activation):
    for p in inputs:
        if p is not None:
            p.grad = None
    loss = mf.mimic_loss(*inputs, t, activation, backend="cuda")
    loss.backward()
    return [loss.detach()] + [p.grad for p in inputs]


@gpu
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_captured_chunk_loops_replay_like_the_uncaptured_step(activation, monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(256))  # 4 chunks: a loop worth capturing
    inputs = make_mlp_inputs(32, 24, 250, 1000, 183, dtype=torch.bfloat16, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(1)
    batches = [(torch.randn(32, 24, device="cuda", generator=g).to(torch.bfloat16),
                torch.randn(32, 183, device="cuda", generator=g).to(torch.bfloat16)) for _ in range(4)]
    x = inputs[0]
    with cuda.graphs(True):
        before = cuda.graph_stats()
        got = []
        for xb, tb in batches:  # a fresh batch each step, as from a data loader
            with torch.no_grad():
                x.copy_(xb)
            got.append(_training_step([x, *inputs[1:]], tb, activation))
        after = cuda.graph_stats()
    # call 1 eager, call 2 captures (forward and backward loop), calls 3 and 4 replay
    assert after["captures"] - before["captures"] == 2, (before, after)
    assert after["replays"] - before["replays"] == 4, (before, after)
    assert after["failures"] == before["failures"]
    # the held graphs' buffers: at least the two (B, aligned chunk) backward tiles and dV, dW
    assert after["bytes"] >= 2 * 32 * 256 * 2 + (1000 * 256 + 183 * 1000) * 2
    with cuda.graphs(False):
        for (xb, tb), step in zip(batches, got):
            with torch.no_grad():
                x.copy_(xb)
            want = _training_step([x, *inputs[1:]], tb, activation)
            # every earlier step's results are intact: outputs are copied out of the graph, never aliased
            for i, (a, b) in enumerate(zip(step, want)):
                if a is None:
                    assert b is None
                    continue
                assert_close(a, b, f"replayed vs uncaptured, output {i}", dtype=torch.bfloat16)


@gpu
def test_replay_sees_parameters_updated_in_place(monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(128))
    x, U, V, b1, W, b2 = make_mlp_inputs(16, 12, 8, 512, 10, dtype=torch.float32, device="cuda")
    with cuda.graphs(True):
        for _ in range(3):
            y = mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="cuda")
        assert cuda.graph_stats()["graphs"] >= 1
        with torch.no_grad():  # what an optimizer step does
            V.mul_(-0.5)
            b1.add_(1.0)
            W.add_(0.01)
        y_replayed = mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="cuda")
    y64 = eager_mlp(*to64([x, U, V, b1, W, b2]), "relu")
    assert not torch.allclose(y, y_replayed)
    assert_close(y_replayed, y64, "y after an in-place update", dtype=torch.float32)


@gpu
def test_steady_state_step_never_synchronises_the_host(monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(256))
    inputs = make_mlp_inputs(64, 32, 250, 1024, 183, dtype=torch.bfloat16, device="cuda")
    t = torch.randn(64, 183, device="cuda", dtype=torch.bfloat16)
    for enabled in (True, False):
        with cuda.graphs(enabled):
            for _ in range(2):  # first call eager, second captures (a capture may synchronise)
                _training_step(inputs, t, "gelu")
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                for _ in range(3):
                    _training_step(inputs, t, "gelu")
            finally:
                torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()


@gpu
def test_unknown_activation_and_reduction_codes_are_rejected():
    x, U, V, b1, W, b2 = make_mlp_inputs(4, 6, 3, 40, 5, dtype=torch.float32, device="cuda",
                                         requires_grad=False)
    t = torch.randn(4, 5, device="cuda")
    ops = torch.ops.mimic_fast
    with pytest.raises(RuntimeError, match="activation code must be"):
        ops.cuda_mlp_fwd(x, U, V, b1, W, b2, 4, 0)
    with pytest.raises(RuntimeError, match="activation code must be"):
        ops.cuda_mlp_bwd(t, x, x @ U.t(), U, V, b1, W, -1, True, True, 0)
    with pytest.raises(RuntimeError, match="activation code must be"):
        ops.cuda_bias_act(t, None, 9)
    with pytest.raises(RuntimeError, match="reduction code must be"):
        ops.cuda_mimic_fwd(x, U, V, b1, W, b2, t, 0, 3, 0)
    with pytest.raises(RuntimeError, match="reduction code must be"):
        ops.cuda_logit_mse(t, t, -1, False)


# ---- GPU: graphs, opcheck, compile --------------------------------------------------------------------
@gpu
def test_cuda_graph_capture_of_forward_and_backward(monkeypatch):
    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", str(256))
    inputs = make_mlp_inputs(32, 24, 8, 1000, 10, dtype=torch.bfloat16, device="cuda")
    t = torch.randn(32, 10, device="cuda", dtype=torch.float16)
    s_logits = torch.randn(32, 10, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        loss = mf.mimic_loss(*inputs, t, "tanh", backend="cuda")
        extra = cuda.logit_mse_loss(s_logits, t, "mean", True) + cuda.kd_loss(s_logits, t, 4.0)
        (loss + extra).backward()
        return loss, extra

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture (cuBLAS workspaces, caches)
            for p in (*inputs, s_logits):
                if p is not None:
                    p.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for p in (*inputs, s_logits):
        if p is not None:
            p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_extra = step()
    with torch.no_grad():  # new data in the same buffers, then replay
        inputs[0].copy_(torch.randn_like(inputs[0]))
        t.copy_(torch.randn_like(t))
    graph.replay()
    torch.cuda.synchronize()
    captured = [static_loss.clone(), static_extra.clone()] + [p.grad.clone() for p in (*inputs, s_logits)]
    for p in (*inputs, s_logits):
        p.grad = None
    eager = list(step()) + [p.grad for p in (*inputs, s_logits)]
    for i, (a, b) in enumerate(zip(captured, eager)):
        # cuBLAS may pick other kernels inside a capture: equal up to the dtype's tolerance.
        assert_close(a, b, f"graph replay vs eager, output {i}")


@gpu
def test_opcheck_every_op():
    from torch.library import opcheck

    x, U, V, b1, W, b2 = make_mlp_inputs(6, 10, 4, 300, 5, dtype=torch.float32, device="cuda",
                                         requires_grad=False)
    t = torch.randn(6, 5, device="cuda", dtype=torch.float16)
    ops = torch.ops.mimic_fast
    y, z = ops.cuda_mlp_fwd(x, U, V, b1, W, b2, 3, 128)
    opcheck(ops.cuda_mlp_fwd.default, (x, U, V, b1, W, b2, 3, 128))
    opcheck(ops.cuda_mlp_bwd.default, (torch.randn_like(y), x, z, U, V, b1, W, 3, True, True, 128))
    opcheck(ops.cuda_mlp_bwd.default, (torch.randn_like(y), x, z, U, V, b1, W, 3, True, False, 128))
    opcheck(ops.cuda_mimic_fwd.default, (x, U, V, None, W, b2, t, 1, 2, 0))
    opcheck(ops.cuda_logit_mse.default, (y, t, 0, True))
    opcheck(ops.cuda_kd_loss.default, (y, t, 2.0))
    opcheck(ops.cuda_bias_act.default, (y, b2, 2))
    opcheck(ops.cuda_bias_act_bwd.default, (y, None, torch.randn_like(y), 0))


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_x_without_grad_gets_no_dx_and_the_same_other_grads(dtype):
    """need_dx=False (x needs no gradient): the op returns an empty dx (no (B, D) tensor, no dx
    GEMM), the wrapper None, and every other gradient is bit for bit the need_dx=True one."""
    x, U, V, b1, W, b2 = (t.detach() for t in make_mlp_inputs(6, 301, 4, 300, 5, dtype=dtype,
                                                              device="cuda"))
    with cuda.graphs(False):  # the same eager chunk loop for both calls
        y, z = cuda.mlp_fwd(x, U, V, b1, W, b2, "gelu", 128)
        dy = torch.randn_like(y)
        with_dx = cuda.mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, True, 128)
        without = cuda.mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, False, 128)
        raw = torch.ops.mimic_fast.cuda_mlp_bwd(dy, x, z, U, V, b1, W, ACTIVATION_CODES["gelu"],
                                                True, False, 128)
        t = torch.randn(6, 5, device="cuda", dtype=dtype)
        weights = [w.requires_grad_() for w in (U, V, b1, W, b2)]
        mf.mimic_loss(x, *weights, t, backend="cuda").backward()
    assert with_dx[0].shape == x.shape and without[0] is None and raw[0].numel() == 0
    for name, a, b in zip(PARAMS[1:], with_dx[1:], without[1:]):
        assert torch.equal(a, b), name
    assert x.grad is None and all(w.grad is not None for w in weights)


@gpu
def test_torch_compile_fullgraph():
    inputs = make_mlp_inputs(16, 12, 4, 700, 6, dtype=torch.float32, device="cuda")
    t = torch.randn(16, 6, device="cuda")

    def fn(*a):
        return mf.bottleneck_mlp(*a, activation="gelu", backend="cuda").square().mean() + \
            mf.mimic_loss(*a, t, "gelu", backend="cuda")

    eager = fn(*inputs)
    compiled = torch.compile(fn, fullgraph=True)(*inputs)
    assert_close(compiled, eager, "loss", dtype=torch.float32)
    for name, a, b in zip(PARAMS, _grads(compiled, inputs), _grads(eager, inputs)):
        assert_close(a, b, f"d{name}", dtype=torch.float32)
