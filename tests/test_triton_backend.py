"""The triton backend under the Triton interpreter (TRITON_INTERPRET=1, set by conftest without a GPU).

Forward and every gradient against the float64 reference (fp32: the tolerance table; fp16: the 2x
rule against eager fp16) at small odd shapes, every activation, reduction, bias on/off, split counts,
both dz reductions, strides; poisoned (NaN-filled) buffers; opcheck; compile fullgraph; no (B, H)
allocation. Interpreter blocks are 16, so these shapes span several k, H, C and batch blocks.
bfloat16 is checked on a GPU only (tests/test_triton_gpu.py): the interpreter's bf16 is wrong.
"""
import pytest
import torch

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.activations import ACTIVATIONS
from mimic_fast.testing import assert_close, assert_within_2x

from helpers import AllocationRecorder, eager_mlp, make_mlp_inputs, to64

T = dispatch.get("triton") if dispatch.why_not("triton", dispatch.Problem(
    "mlp", torch.device("cpu"), torch.float32, 1, 1, 1, 1, 1, "relu")) == [] else None
pytestmark = pytest.mark.skipif(T is None, reason="triton backend cannot run here (needs triton and "
                                "TRITON_INTERPRET=1 or a GPU)")
NAMES = ("x", "U", "V", "b1", "W", "b2")
# (B, D, k, H, C): k = 17 and C = 18 span two 16-blocks, H = 45 three ragged H tiles, B = 19 two
# batch tiles; the second is the degenerate corner (B = 1, k = 1, C = 1).
SHAPE = (19, 13, 17, 45, 18)
TINY = (1, 5, 1, 7, 1)


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def _seed_grad(shape, dtype):
    return torch.randn(shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)


def _mlp_with_grads(inputs, activation, backend):
    y = mf.bottleneck_mlp(*inputs, activation=activation, backend=backend)
    y.backward(_seed_grad(y.shape, y.dtype))
    return y, _grads(inputs)


def _eager_with_grads(inputs, activation):
    y = eager_mlp(*inputs, activation)
    y.backward(_seed_grad(y.shape, y.dtype))
    return y, _grads(inputs)


def _check_against_reference(inputs, out, grads, make_out, activation, dtype):
    """fp32: tolerance table vs float64; fp16: 2x rule vs eager fp16 (both vs float64)."""
    ref64 = to64(inputs)
    out64, g64 = make_out(ref64)
    if dtype == torch.float32:
        assert_close(out, out64, "output", dtype=dtype)
        for n, g, r in zip(NAMES, grads, g64):
            assert_close(g, r, f"grad {n}", dtype=dtype)
        return
    base = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    out_b, g_b = _eager_with_grads(base, activation)
    assert_within_2x(out, out64, out_b, "output")
    for n, g, r, b in zip(NAMES, grads, g64, g_b):
        if g is None:
            assert r is None, n
            continue
        assert_within_2x(g, r, b, f"grad {n}")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_bottleneck_mlp_forward_backward(activation, dtype):
    inputs = make_mlp_inputs(*SHAPE, dtype=dtype)
    y, grads = _mlp_with_grads(inputs, activation, "triton")
    assert y.dtype == dtype and all(g.dtype == dtype for g in grads)
    _check_against_reference(inputs, y, grads,
                             lambda t: _mlp_with_grads(t, activation, "reference"), activation, dtype)


@pytest.mark.parametrize("shape,activation", [(TINY, "sigmoid"), ((3, 4, 2, 33, 5), "gelu")])
def test_bottleneck_mlp_without_bias_and_degenerate_shapes(shape, activation):
    inputs = make_mlp_inputs(*shape, bias=False)
    y, grads = _mlp_with_grads(inputs, activation, "triton")
    assert grads[3] is None and grads[5] is None
    _check_against_reference(inputs, y, grads,
                             lambda t: _mlp_with_grads(t, activation, "reference"), activation,
                             torch.float32)


def _mimic_with_grads(inputs, t, activation, reduction, backend):
    loss = mf.mimic_loss(*inputs, t, activation=activation, reduction=reduction, backend=backend)
    loss.backward(_seed_grad(loss.shape, loss.dtype))
    return loss, _grads(inputs)


@pytest.mark.parametrize("reduction,activation,dtype,teacher_dtype", [
    ("mean", "relu", torch.float32, torch.float32),
    ("sum", "tanh", torch.float32, torch.float64),    # teacher in another float dtype
    ("none", "gelu", torch.float32, torch.float16),
    ("mean", "sigmoid", torch.float16, torch.float32),
])
def test_mimic_loss_forward_backward(reduction, activation, dtype, teacher_dtype):
    inputs = make_mlp_inputs(*SHAPE, dtype=dtype)
    t = torch.randn(SHAPE[0], SHAPE[-1], generator=torch.Generator().manual_seed(3)).to(teacher_dtype)
    loss, grads = _mimic_with_grads(inputs, t, activation, reduction, "triton")
    assert loss.dtype == dtype and loss.shape == ((SHAPE[0], SHAPE[-1]) if reduction == "none" else ())
    ref = lambda ts: _mimic_with_grads(ts, t.double(), activation, reduction, "reference")  # noqa: E731
    if dtype == torch.float32:
        _check_against_reference(inputs, loss, grads, ref, activation, dtype)
        return
    # fp16: the baseline is eager fp16 logits fed to F.mse_loss.
    loss64, g64 = ref(to64(inputs))
    base = [None if x is None else x.detach().clone().requires_grad_() for x in inputs]
    lb = torch.nn.functional.mse_loss(eager_mlp(*base, activation), t.to(dtype), reduction=reduction)
    lb.backward(_seed_grad(lb.shape, lb.dtype))
    assert_within_2x(loss, loss64, lb, "loss")
    for n, g, r, b in zip(NAMES, grads, g64, _grads(base)):
        assert_within_2x(g, r, b, f"grad {n}")


def _direct_inputs(shape=SHAPE, dtype=torch.float32, bias=True):
    return [None if t is None else t.detach() for t in make_mlp_inputs(*shape, dtype=dtype, bias=bias)]


_REF_GRADS = ("dx", "dU", "dV", "db1", "dW", "db2")


def _check_direct(x, U, V, b1, W, b2, activation, deterministic):
    ref = dispatch.get("reference")
    y_ref, z_ref = ref.mlp_fwd(x, U, V, b1, W, b2, activation)
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, activation)
    assert_close(y, y_ref, "y")
    dy = _seed_grad(y.shape, y.dtype)
    g_ref = ref.mlp_bwd(dy, x, z_ref, U, V, b1, W, activation, b2 is not None)
    grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, b2 is not None,
                            deterministic=deterministic)
    for name, g, r in zip(_REF_GRADS, grads, g_ref):
        if r is None:
            assert g is None, name
            continue
        assert_close(g, r, f"{name} (deterministic={deterministic})")
    return grads


@pytest.mark.parametrize("sms", [1, 64])
@pytest.mark.parametrize("deterministic", [False, True])
def test_plans_agree_with_reference(sms, deterministic):
    """One program per row of tiles (sms=1) and a GPU wide enough to force many H splits, split
    leftovers, the ragged tile's owner and several backward batch chunks (sms=64)."""
    inputs = _direct_inputs((37, 13, 17, 77, 18))
    with T.device_override(T.Device(sms)):
        p = T.plan(37, 17, 77, 18, 4, deterministic)
        if sms == 64:
            assert p.fwd_splits > 1 and p.H // p.block_h % p.fwd_splits != 0 and p.bwd_chunks > 1
            assert not deterministic or p.dz_splits > 1
        _check_direct(*inputs, "sigmoid", deterministic)


def test_deterministic_backward_is_bit_identical_and_follows_torch():
    x, U, V, b1, W, b2 = _direct_inputs()
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "tanh")
    dy = _seed_grad(y.shape, y.dtype)
    with T.device_override(T.Device(64)):
        first = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, deterministic=True)
        again = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, deterministic=True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert T.plan(19, 17, 45, 18).dz_kernel and T.describe()["dz"] == "deterministic kernel"
        y2, grads = _mlp_with_grads(make_mlp_inputs(*SHAPE), "relu", "triton")
    finally:
        torch.use_deterministic_algorithms(previous)
    assert not T.plan(19, 17, 45, 18).dz_kernel
    _check_against_reference(make_mlp_inputs(*SHAPE), y2, grads,
                             lambda t: _mlp_with_grads(t, "relu", "reference"), "relu", torch.float32)


@pytest.mark.parametrize("k,C", [(1, 1), (7, 183), (250, 1), (250, 183)])
def test_paper_widths_and_extremes(k, C):
    """k = 250 -> one 256 block in two halves; C = 183 -> blocks of 128 + 64 (the second masked)."""
    p = T.plan(3, k, 40, C)
    assert p.KP == max(32, 1 << (k - 1).bit_length()) and p.CP >= C
    if C == 183:
        assert (p.C1, p.C2) == (128, 64)
    _check_direct(*_direct_inputs((3, 9, k, 40, C)), "gelu", False)


def test_split_c_wastes_little():
    assert T.split_c(183) == (128, 64)
    assert T.split_c(1) == (16, 0) and T.split_c(16) == (16, 0) and T.split_c(17) == (32, 0)
    assert T.split_c(129) == (128, 16) and T.split_c(200) == (256, 0) and T.split_c(256) == (256, 0)
    for C in range(1, 257):
        c1, c2 = T.split_c(C)
        assert c1 + c2 >= C and c1 & (c1 - 1) == 0 and (c2 == 0 or c2 & (c2 - 1) == 0)
        assert c1 + c2 <= max(16, 1 << (C - 1).bit_length())  # never worse than one block


def test_weights_changed_outside_autograd_are_seen():
    """Writes through .data bump no version counter (old optimizers, EMA, apex, ZeRO): nothing may
    hold a copy of V across calls, and inference-mode weights work too."""
    x, U, V, b1, W, b2 = _direct_inputs()
    ref = dispatch.get("reference")
    T.fused_mlp_fwd(x, U, V, b1, W, b2, "tanh")
    V.data.mul_(2.0)
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "tanh")
    assert_close(y, ref.mlp_fwd(x, U, V, b1, W, b2, "tanh")[0], "y after V.data changed")
    dy = _seed_grad(y.shape, y.dtype)
    for name, g, r in zip(_REF_GRADS, T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True),
                          ref.mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True)):
        assert_close(g, r, name)
    with torch.inference_mode():
        weights = [t.clone() for t in (U, V, b1, W, b2)]
        y_inf, _ = T.fused_mlp_fwd(x, *weights[:2], weights[2], weights[3], weights[4], "tanh")
    assert_close(y_inf, y, "y with inference-mode weights")


def test_every_output_element_is_written(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: a missed element would show up."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    x, U, V, b1, W, b2 = _direct_inputs()
    t = torch.randn(SHAPE[0], SHAPE[-1])
    ref = dispatch.get("reference")
    y_ref, z_ref = ref.mlp_fwd(x, U, V, b1, W, b2, "gelu")
    dy = _seed_grad(y_ref.shape, y_ref.dtype)
    g_ref = ref.mlp_bwd(dy, x, z_ref, U, V, b1, W, "gelu", True)
    monkeypatch.setattr(torch, "empty", nan_empty)
    with T.device_override(T.Device(64)):  # splits, chunks, partial buffers
        y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "gelu")
        loss, _, dy_unit = T.fused_mimic_fwd(x, U, V, b1, W, b2, t, "gelu", "none")
        grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, deterministic=False)
        grads_det = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, deterministic=True)
    monkeypatch.undo()
    assert_close(y, y_ref, "y")
    assert_close(loss, (y_ref - t) ** 2, "loss (none)")
    assert_close(dy_unit, 2 * (y_ref - t), "dy_unit")
    for name, g, gd, r in zip(_REF_GRADS, grads, grads_det, g_ref):
        assert_close(g, r, name)
        assert_close(gd, r, f"{name} (deterministic)")


def test_padding_never_leaks():
    """Padded hidden units give act(0) = 0.5 for sigmoid and padded batch rows act(b1): large b1
    and b2 make any leak of them into y, the loss or a gradient visible."""
    x, U, V, b1, W, b2 = _direct_inputs((19, 13, 17, 45, 18))
    b1 = b1 * 40
    b2 = b2 * 40
    t = torch.randn(19, 18)
    ref = dispatch.get("reference")
    loss_ref, z_ref, dy_ref = ref.mimic_fwd(x, U, V, b1, W, b2, t, "sigmoid", "sum")
    loss, z, dy = T.fused_mimic_fwd(x, U, V, b1, W, b2, t, "sigmoid", "sum")
    assert_close(loss, loss_ref, "loss")
    assert_close(dy, dy_ref, "dy_unit")
    g_ref = ref.mlp_bwd(dy_ref, x, z_ref, U, V, b1, W, "sigmoid", True)
    for det in (False, True):
        grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "sigmoid", True, deterministic=det)
        for name, g, r in zip(_REF_GRADS, grads, g_ref):
            assert_close(g, r, name)


def test_arbitrary_strides():
    x0, U, V, b1, W, b2 = _direct_inputs()
    x = torch.cat([x0, x0], 1)[:, ::2].requires_grad_()  # row stride 2D, column stride 2
    Vt = V.t().contiguous().t().requires_grad_()  # (H, k) with strides (1, H)
    Wt = W.t().contiguous().t().requires_grad_()
    b1s = torch.stack([b1, b1], 1)[:, 0].requires_grad_()  # stride 2
    Us, b2s = U.clone().requires_grad_(), b2.clone().requires_grad_()
    inputs = [x, Us, Vt, b1s, Wt, b2s]
    y, grads = _mlp_with_grads(inputs, "relu", "triton")
    _check_against_reference(inputs, y, grads, lambda t: _mlp_with_grads(t, "relu", "reference"),
                             "relu", torch.float32)


def test_three_d_input():
    inputs = make_mlp_inputs(2, 5, 3, 20, 4, lead=(2, 3))
    y, grads = _mlp_with_grads(inputs, "relu", "triton")
    assert y.shape == (2, 3, 4)
    _check_against_reference(inputs, y, grads, lambda t: _mlp_with_grads(t, "relu", "reference"),
                             "relu", torch.float32)


def test_no_batch_by_hidden_allocation():
    B, H = 16, 200
    inputs = make_mlp_inputs(B, 6, 4, H, 3)
    t = torch.randn(B, 3)
    with AllocationRecorder() as rec:
        mf.mimic_loss(*inputs, t, backend="triton").backward()
    numel, op = rec.largest()
    assert numel < B * H, f"an allocation of {numel} elements (by {op}) is as large as B x H = {B * H}"


def test_opcheck_custom_ops():
    x, U, V, b1, W, b2 = _direct_inputs((5, 7, 3, 20, 4))
    t = torch.randn(5, 4)
    y, z = T.triton_mlp_fwd(x, U, V, b1, W, b2, "relu")
    dy = torch.randn_like(y)
    cases = [
        (T.triton_mlp_fwd, (x, U, V, b1, W, b2, "relu")),
        (T.triton_mlp_fwd, (x, U, V, None, W, None, "tanh")),
        (T.triton_mimic_fwd, (x, U, V, b1, W, b2, t, "relu", "mean")),
        (T.triton_mimic_fwd, (x, U, V, b1, W, b2, t, "relu", "none")),
        (T.triton_mlp_bwd, (dy, x, z, U, V, b1, W, "relu", True)),
        (T.triton_mlp_bwd, (dy, x, z, U, V, None, W, "relu", False)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor",
                                                    "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_training_step():
    torch.manual_seed(0)
    m = mf.nn.WideShallowStudent(7, 4, 40, 3, activation="gelu", backend="triton")
    x, t = torch.randn(5, 7), torch.randn(5, 4)

    # fullgraph: the forward, with its backward graph built by AOTAutograd, has no break; aot_eager
    # traces both through the fake impls without compiling C++ here.
    loss = torch.compile(lambda x, t: m.mimic_loss(x, t), fullgraph=True, backend="aot_eager")(x, t)
    loss.backward()
    compiled = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    eager = m.mimic_loss(x, t)
    eager.backward()
    assert_close(loss, eager, "loss")
    for (n, p), g in zip(m.named_parameters(), compiled):
        assert_close(g, p.grad, f"grad {n}")


def test_reasons():
    P = dispatch.Problem
    cpu = torch.device("cpu")
    assert T.reasons(P("mlp", cpu, torch.float32, 4, 5, 250, 8000, 183, "relu")) == []
    why = T.reasons(P("mimic", cpu, torch.float64, 4, 5, T.K_MAX + 1, 8, T.C_MAX + 1, "relu",
                      torch.float32))
    assert any("float64" in r for r in why)
    assert any(f"k={T.K_MAX + 1}" in r for r in why) and any(f"C={T.C_MAX + 1}" in r for r in why)
    assert any("bfloat16" in r for r in T.reasons(P("mlp", cpu, torch.bfloat16, 4, 5, 3, 8, 2, "relu")))
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="float64"):
        mf.bottleneck_mlp(x, torch.randn(2, 4).double(), torch.randn(6, 2).double(), None,
                          torch.randn(3, 6).double(), None, backend="triton")


def test_reasons_without_interpreter(monkeypatch):
    monkeypatch.setattr(T.K, "INTERPRET", False)
    why = T.reasons(dispatch.Problem("mlp", torch.device("cpu"), torch.float32, 4, 5, 3, 8, 2, "relu"))
    assert why == ["CPU tensors need TRITON_INTERPRET=1 (the Triton interpreter; slow, for tests)"]


@pytest.mark.parametrize("elem", [2, 4])
def test_every_supported_shape_keeps_a_config_on_hopper(elem):
    """No (k, C) the backend accepts leaves a kernel without a config that fits an H100/H200's
    227 KB (what the pruning believes; test_triton_compile checks it against the compiler)."""
    import itertools

    K = T.K
    limit, capability = 232448, 90
    meta = torch.empty(0, dtype=torch.float32 if elem == 4 else torch.bfloat16, device="meta")
    for KP, C in itertools.product((32, 64, 128, 256), range(1, 257)):
        C1, C2 = T.split_c(C)
        bb = 32 if elem <= 2 else 16
        for det in (False, True):
            dz_kernel = det or elem == 4
            args = {"Z": meta, "KP": KP, "C1": C1, "C2": C2, "BLOCK_B": bb,
                    "BLOCK_H": 64 if elem <= 2 else 32, "DZ_ATOMIC": not dz_kernel}
            for kernel in ("fwd", "bwd") + (("dz",) if dz_kernel else ()):
                kept = K.fitting_configs(kernel, K.gpu_configs(kernel), args, limit, capability)
                assert kept, (kernel, KP, C, elem, det)


def test_auto_leaves_ieee_fp32_to_another_backend(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    P = dispatch.Problem("mlp", torch.device("cuda"), torch.float32, 64, 32, 250, 8000, 183, "relu")
    assert T.reasons(P) == []  # it serves them when named
    previous = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert any("IEEE" in r for r in T.auto_reasons(P))
        assert dispatch.select("auto", P) != "triton" and dispatch.select("triton", P) == "triton"
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert T.auto_reasons(P) == [] and dispatch.select("auto", P) == "triton"
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


def test_refuses_a_gpu_whose_shared_memory_fits_no_config(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(T.K, "_device", lambda: (101376, 90))
    monkeypatch.setattr(T, "_FITS", {})
    why = T.reasons(dispatch.Problem("mlp", torch.device("cuda"), torch.bfloat16, 64, 32, 250, 8000,
                                     183, "relu"))
    assert any("no fwd kernel config fits" in r and "101376" in r for r in why), why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    why = T.reasons(dispatch.Problem("mlp", torch.device("cuda"), torch.bfloat16, 64, 32, 250, 8000,
                                     183, "relu"))
    assert any("sm_100" in r and "Hopper only" in r for r in why), why


def test_dot_precision_follows_torch():
    previous = torch.backends.cuda.matmul.fp32_precision
    try:
        torch.backends.cuda.matmul.fp32_precision = "tf32"
        assert T._dot_precision(torch.float32) == "tf32"
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        assert T._dot_precision(torch.float32) == "ieee"
        assert T._dot_precision(torch.bfloat16) is None
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous
