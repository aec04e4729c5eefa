"""The triton backend under the Triton interpreter (TRITON_INTERPRET=1, set by conftest without a GPU).

Forward and every gradient against the float64 reference (fp32: the tolerance table; fp16: the 2x
rule against eager fp16) at small odd shapes, every activation, reduction, bias on/off, every split
and chunk path of the plan (forced one by one), strides; poisoned (NaN-filled) buffers; bit-identical
reruns; opcheck; compile fullgraph; no (B, H) allocation and the workspace bound; no dx matmul when
x needs no gradient; an fp16 dy below fp16's normal range; autotuning under CUDA-graph capture
(mocked). Interpreter blocks are 16, so these shapes span several k, H, C and batch blocks.
bfloat16 is checked on a GPU only (tests/test_triton_gpu.py): the interpreter's bf16 is wrong.
"""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.activations import ACTIVATIONS
from mimic_fast.ops import triton_plan as P
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


def _check_direct(x, U, V, b1, W, b2, activation):
    ref = dispatch.get("reference")
    y_ref, z_ref = ref.mlp_fwd(x, U, V, b1, W, b2, activation)
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, activation)
    assert_close(y, y_ref, "y")
    dy = _seed_grad(y.shape, y.dtype)
    g_ref = ref.mlp_bwd(dy, x, z_ref, U, V, b1, W, activation, b2 is not None, True)
    grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, b2 is not None, True)
    for name, g, r in zip(_REF_GRADS, grads, g_ref):
        if r is None:
            assert g is None, name
            continue
        assert_close(g, r, name)
    return grads


def _forced(monkeypatch, **fields):
    """Plans with some fields forced (a split or chunk count the shape would not pick here)."""
    real = T.plan

    def plan(B, k, H, C, elem=2, device=None, interpret=None):
        p = real(B, k, H, C, elem, device, interpret)
        p = p._replace(**fields)
        n_btiles = p.rows // p.bwd_block_b
        return p._replace(bwd_btiles=-(-n_btiles // p.bwd_bchunks))

    monkeypatch.setattr(T, "plan", plan)


# (B, D, k, H, C) = (37, 13, 17, 77, 18): 3 batch tiles, 5 H tiles (the last ragged), 2 k blocks.
@pytest.mark.parametrize("fields", [
    {}, {"fwd_splits": 3}, {"bwd_bchunks": 2}, {"dv_splits": 2}, {"dz_splits": 3},
    {"ws_rows": 32, "n_chunks": 3}, {"ws_rows": 80, "n_chunks": 1},
    {"bwd_bchunks": 3, "dv_splits": 3, "dz_splits": 2, "ws_rows": 48, "n_chunks": 2},
    {"bwd_bchunks": 2, "dv_splits": 4, "dz_splits": 2, "ws_rows": 32, "n_chunks": 3}],
    ids=["natural", "fwd-splits", "batch-chunks", "dv-splits", "dz-splits", "3-chunks",
         "1-chunk", "all", "small-H"])
def test_every_plan_path_agrees_with_reference(monkeypatch, fields):
    """Each split and chunk path of the plan forced in turn: forward splits with leftovers and the
    ragged tile's owner, pass-1 batch chunks (fp32 dW/db1 partials), dV split over the batch, dz
    split over each chunk's H (fp32 partials accumulated chunk after chunk), one and several
    workspace chunks (the last one short). "small-H" is the paper's H=8000 plan in miniature: the
    pass-2 launch's dz and dV programs both split (dV into more splits than it has K blocks: the
    last split's partial is all zero-filled blocks), three chunks."""
    _forced(monkeypatch, **fields)
    p = T.plan(37, 17, 77, 18, 4)
    assert all(getattr(p, k) == v for k, v in fields.items())
    _check_direct(*_direct_inputs((37, 13, 17, 77, 18)), "sigmoid")


def test_plans_fill_a_wide_gpu_without_forcing():
    """The plan's own choices on a GPU of 64 SMs split every reduction it can (sanity of _fill)."""
    with T.device_override(T.Device(64)):
        p = T.plan(37, 17, 77, 18, 4)
        assert p.fwd_splits > 1 and p.H // p.fwd_block_h % p.fwd_splits != 0 and p.bwd_bchunks > 1
        assert p.n_chunks > 1 and p.ws_rows * p.n_chunks >= 77
        _check_direct(*_direct_inputs((37, 13, 17, 77, 18)), "tanh")


def test_backward_is_bit_identical_run_to_run_in_every_mode():
    """No reduce-adds: every output element has one owner per launch and partials are summed in a
    fixed order, so two runs agree bit for bit, with torch's deterministic mode on or off."""
    x, U, V, b1, W, b2 = _direct_inputs()
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "tanh")
    dy = _seed_grad(y.shape, y.dtype)
    with T.device_override(T.Device(64)):
        first = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, True)
        previous = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True)
        try:
            again = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, True)
        finally:
            torch.use_deterministic_algorithms(previous)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert "deterministic" in T.describe()["dz"]


@pytest.mark.parametrize("k,C", [(1, 1), (7, 183), (250, 1), (250, 183)])
def test_paper_widths_and_extremes(k, C):
    """k = 250 -> one 256 block in two halves; C = 183 -> blocks of 128 + 64 (the second masked)."""
    p = T.plan(3, k, 40, C)
    assert p.KP == max(32, 1 << (k - 1).bit_length()) and p.CP >= C
    if C == 183:
        assert (p.C1, p.C2) == (128, 64)
    _check_direct(*_direct_inputs((3, 9, k, 40, C)), "gelu")


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
    for name, g, r in zip(_REF_GRADS, T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, True),
                          ref.mlp_bwd(dy, x, z, U, V, b1, W, "tanh", True, True)):
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
    g_ref = ref.mlp_bwd(dy, x, z_ref, U, V, b1, W, "gelu", True, True)
    monkeypatch.setattr(torch, "empty", nan_empty)
    _forced(monkeypatch, fwd_splits=3, bwd_bchunks=2, dv_splits=2, dz_splits=2, ws_rows=16,
            n_chunks=3)  # every partial buffer, several chunks, a stale workspace tail
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "gelu")
    loss, _, dy_unit = T.fused_mimic_fwd(x, U, V, b1, W, b2, t, "gelu", "none")
    grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, True)
    monkeypatch.undo()
    assert_close(y, y_ref, "y")
    assert_close(loss, (y_ref - t) ** 2, "loss (none)")
    assert_close(dy_unit, 2 * (y_ref - t), "dy_unit")
    for name, g, r in zip(_REF_GRADS, grads, g_ref):
        assert_close(g, r, name)


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
    g_ref = ref.mlp_bwd(dy_ref, x, z_ref, U, V, b1, W, "sigmoid", True, True)
    grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "sigmoid", True, True)
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


def test_no_batch_by_hidden_allocation_and_the_workspace_bound():
    """No tensor as large as B x H is made in a training step; the one hidden-sized buffer is the
    da workspace of the plan, (ws_rows, rows) with ws_rows at most a quarter of H (or one tile)
    and at most WORKSPACE_BYTES. The launchers are called directly: a dispatch mode does not see
    inside a custom op, only its outputs."""
    B, H = 128, 200
    x, U, V, b1, W, b2 = _direct_inputs((B, 6, 4, H, 3))
    t = torch.randn(B, 3)
    p = T.plan(B, 4, H, 3, 4)
    unit = max(p.bwd_block_h, p.gemm_block_m)
    assert p.ws_rows <= max(unit, H // 4) and p.n_chunks > 1  # the documented bound, written out
    assert p.workspace_bytes <= 256 * 2**20
    with AllocationRecorder() as rec:
        loss, z, dy = T.fused_mimic_fwd(x, U, V, b1, W, b2, t, "relu", "mean")
        T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "relu", True, True)
    # copy_ and set_ make no tensor (the interpreter stages its arguments' storages with them)
    sizes = [(n, op) for n, op in rec.sizes if "copy_" not in op and "set_" not in op]
    numel, op = max(sizes)
    assert numel < B * H, f"an allocation of {numel} elements (by {op}) is as large as B x H = {B * H}"
    assert p.rows * p.ws_rows in [n for n, _ in sizes]  # the workspace is the planned one


def test_backward_without_dx_skips_its_gemm_and_allocation():
    """need_dx=False: the launcher runs no dx = dz U matmul (2BDk FLOPs fewer, counted on the
    launcher's own torch ops) and makes no (B, D) tensor; the other gradients are bit-identical."""
    B, D, k, H, C = 19, 23, 17, 45, 18  # B*D: no other tensor of the backward has as many elements
    x, U, V, b1, W, b2 = _direct_inputs((B, D, k, H, C))
    y, z = T.fused_mlp_fwd(x, U, V, b1, W, b2, "relu")
    dy = _seed_grad(y.shape, y.dtype)

    def backward(need_dx):
        with FlopCounterMode(display=False) as fc:
            with AllocationRecorder() as rec:
                grads = T.fused_mlp_bwd(dy, x, z, U, V, b1, W, "relu", True, need_dx)
        return grads, fc.get_total_flops(), [n for n, op in rec.sizes if "copy_" not in op]

    (dx, *grads), flops_with, sizes = backward(True)
    (no_dx, *grads_without), flops_without, sizes_without = backward(False)
    assert dx.shape == x.shape and no_dx is None
    assert flops_with - flops_without == 2 * B * D * k
    assert B * D in sizes and B * D not in sizes_without
    for name, a, b in zip(_REF_GRADS[1:], grads, grads_without):
        assert torch.equal(a, b), name


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
        (T.triton_mlp_bwd, (dy, x, z, U, V, b1, W, "relu", True, True)),
        (T.triton_mlp_bwd, (dy, x, z, U, V, b1, W, "relu", True, False)),
        (T.triton_mlp_bwd, (dy, x, z, U, V, None, W, "relu", False, True)),
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
def test_every_supported_shape_keeps_a_config_on_hopper(elem, monkeypatch):
    """No (k, C) the backend accepts leaves a kernel without a config that fits an H100/H200's
    227 KB (what the pruning believes; test_triton_compile checks it against the compiler), but
    fp32 at k_pad = C_pad = 256: its V_j, W_j and transposed W_j tiles alone take 192 KB, so
    reasons() refuses it there (the cuda backend serves it)."""
    limit, capability = P.SMEM_LIMIT, 90
    refused = set()
    for k in (1, 32, 33, 64, 65, 128, 129, 250, 256):
        for C in range(1, 257):
            p = P.plan(4096, k, 400000, C, elem, device=P.OFFLINE_DEVICE, interpret=False)
            for kernel in ("fwd", "bwd", "gemm"):
                if not P.fitting_configs(kernel, P.CONFIGS[kernel], p.meta(kernel), limit,
                                         capability):
                    refused.add((kernel, p.KP, p.CP))
    assert refused == (set() if elem == 2 else {("bwd", 256, 256)})
    if elem == 4:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
        monkeypatch.setattr(T.K, "_device", lambda: (limit, capability))
        monkeypatch.setattr(T, "_FITS", {})
        why = T.reasons(dispatch.Problem("mlp", torch.device("cuda"), torch.float32, 64, 32, 250,
                                         8000, 200, "relu"))
        assert any("no bwd kernel config fits" in r and "C_pad=256" in r for r in why), why


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
    monkeypatch.setattr(T.K, "_device", lambda: (101376, 90))  # an sm_90 with 99 KB per block
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


def test_fp16_gradients_survive_a_subnormal_dy():
    """In fp16, dy = upstream · 2(y − t)/(B·C) falls below the normal range (6.1e-5) for a scaled-down
    loss (gradient accumulation: loss / steps) or, at the paper's B·C = 750k, a student within 0.2
    of its teacher; cast as it is to an fp16 tensor-core operand it keeps a few bits. Gradients are
    linear in the upstream gradient, so at 2^-10 they must be 2^-10 times those at 1, up to what fp16
    can store of them (the subnormal dy operand of v2 missed this by up to 7x)."""
    B, D, k, H, C = 48, 13, 17, 45, 40
    t = torch.randn(B, C, generator=torch.Generator().manual_seed(11))

    def grads(upstream):
        inputs = make_mlp_inputs(B, D, k, H, C, dtype=torch.float16)
        loss = mf.mimic_loss(*inputs, t, backend="triton")
        loss.backward(torch.tensor(upstream, dtype=loss.dtype))
        return _grads(inputs)

    u = 2.0 ** -10
    for n, small, one in zip(NAMES, grads(u), grads(1.0)):
        ref = one.double() * u
        storable = (ref.half().double() - ref).abs().max().item()
        assert_close(small, ref, f"grad {n} at upstream 2^-10", rtol=0.0,
                     atol=storable + 1e-3 * ref.abs().max().item())
