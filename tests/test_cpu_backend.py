"""The cpu backend (csrc/cpu, torch.ops.mimic_fast.cpu_*): gradients, odd shapes, low precision,
custom-op registration, torch.compile, and the no-(B, H)-allocation property.

Tiny H chunks (MIMIC_FAST_CPU_CHUNK_H) make small problems span several chunks, ragged last one
included. Skipped as a whole when the extension is not built.
"""
import pytest
import torch

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.activations import ACTIVATIONS, ACTIVATION_CODES
from mimic_fast.testing import assert_close, assert_within_2x

from helpers import eager_mlp, make_mlp_inputs, to64

cpu = dispatch.get("cpu")
pytestmark = pytest.mark.skipif(cpu.availability() is not None,
                                reason=f"cpu backend unavailable: {cpu.availability()}")
NAMES = ("x", "U", "V", "b1", "W", "b2")


@pytest.fixture
def chunk(monkeypatch):
    def set_chunk(n, loop=None):
        monkeypatch.setenv("MIMIC_FAST_CPU_CHUNK_H", str(n))
        if loop is not None:
            monkeypatch.setenv("MIMIC_FAST_CPU_LOOP", loop)
    return set_chunk


def _grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def _run(fn, tensors, seed_grad=None):
    """Output of fn(*tensors) and the gradient of every input for a fixed random upstream grad."""
    out = fn(*tensors)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    out.backward(g.to(out.dtype) if seed_grad is None else seed_grad)
    return out, _grads(tensors)


def _compare_all(out, grads, out_ref, grads_ref, dtype, rtol=None, atol=None):
    assert_close(out, out_ref, "output", dtype=dtype, rtol=rtol, atol=atol)
    for name, g, r in zip(NAMES, grads, grads_ref):
        assert_close(g, r, f"grad {name}", dtype=dtype, rtol=rtol, atol=atol)


# ---- float64 gradcheck -----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_bottleneck_mlp(activation, bias, chunk):
    chunk(2)  # H = 5 -> chunks of 2, 2, 1; the default loop order for 3 chunks on 1-2 threads
    inputs = make_mlp_inputs(3, 4, 2, 5, 3, dtype=torch.float64, bias=bias)
    fn = lambda *t: mf.bottleneck_mlp(*t, activation=activation, backend="cpu")  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("activation,bias", [("relu", True), ("gelu", False), ("tanh", True),
                                             ("sigmoid", False)])
def test_gradcheck_mimic_loss(reduction, activation, bias, chunk):
    chunk(2, "chunks" if bias else "gemm")
    inputs = make_mlp_inputs(3, 4, 2, 5, 3, dtype=torch.float64, bias=bias)
    t = torch.randn(3, 3, dtype=torch.float64)
    fn = lambda *p: mf.mimic_loss(*p, t, activation=activation, reduction=reduction,  # noqa: E731
                                  backend="cpu")
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)


# ---- float32 against the float64 reference, odd shapes ----------------------------------------------

ODD = [  # B, D, k, H, C, lead, chunk
    (1, 3, 1, 70, 1, None, 64),
    (7, 5, 3, 130, 4, None, 64),
    (6, 9, 4, 200, 5, (2, 3), 48),
    (5, 4, 2, 33, 3, None, 4096),  # a single chunk, narrower than the default
]


@pytest.mark.parametrize("B,D,k,H,C,lead,n", ODD)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("loop", ["gemm", "chunks"])
def test_float32_mlp_matches_float64_reference(B, D, k, H, C, lead, n, activation, loop, chunk):
    chunk(n, loop)
    inputs = make_mlp_inputs(B, D, k, H, C, lead=lead, bias=activation != "tanh")
    ref = to64(inputs)
    out, grads = _run(lambda *t: mf.bottleneck_mlp(*t, activation=activation, backend="cpu"), inputs)
    out_r, grads_r = _run(lambda *t: mf.bottleneck_mlp(*t, activation=activation,
                                                       backend="reference"), ref)
    assert out.dtype == torch.float32
    _compare_all(out, grads, out_r, grads_r, torch.float32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,D,k,H,C,lead,n", ODD[:3])
@pytest.mark.parametrize("loop", ["gemm", "chunks"])
def test_float32_mimic_loss_matches_float64_reference(B, D, k, H, C, lead, n, reduction, loop,
                                                      chunk):
    chunk(n, loop)
    inputs = make_mlp_inputs(B, D, k, H, C, lead=lead)
    shape = (B, C) if lead is None else (*lead, C)
    t = torch.randn(shape)
    ref = to64(inputs)
    fn = lambda *p: mf.mimic_loss(*p, t, activation="gelu", reduction=reduction,  # noqa: E731
                                  backend="cpu")
    fn_r = lambda *p: mf.mimic_loss(*p, t.double(), activation="gelu",  # noqa: E731
                                    reduction=reduction, backend="reference")
    out, grads = _run(fn, inputs)
    out_r, grads_r = _run(fn_r, ref)
    assert out.dtype == torch.float32 and out.shape == out_r.shape
    _compare_all(out, grads, out_r, grads_r, torch.float32)


def test_non_contiguous_inputs(chunk):
    chunk(64)
    B, D, k, H, C = 6, 10, 3, 150, 4
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C, requires_grad=False)
    # x a column slice, U and V stored transposed, W and b1 strided views.
    x_nc = torch.cat([x, torch.zeros(B, 3)], 1)[:, :D]
    U_nc, V_nc = U.t().contiguous().t(), V.t().contiguous().t()
    W_nc = torch.cat([W, W], 1)[:, ::2]
    b1_nc = torch.stack([b1, b1], 1)[:, 0]
    nc = [t.requires_grad_() for t in (x_nc, U_nc, V_nc, b1_nc, W_nc, b2.clone())]
    assert not any(t.is_contiguous() for t in nc[:5])
    t = torch.randn(B, C)
    loss = mf.mimic_loss(*nc, t, backend="cpu")
    loss.backward()
    ref = to64(nc)
    loss_r = mf.mimic_loss(*ref, t.double(), backend="reference")
    loss_r.backward()
    _compare_all(loss, _grads(nc), loss_r, _grads(ref), torch.float32)


# ---- low precision: the 2x rule ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_half_precision_within_2x_of_pytorch(dtype, activation, chunk):
    chunk(64)
    B, D, k, H, C = 16, 24, 8, 200, 6
    inputs = make_mlp_inputs(B, D, k, H, C, dtype=dtype)
    base = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref = to64(inputs)
    g = torch.randn(B, C, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out, grads = _run(lambda *t: mf.bottleneck_mlp(*t, activation=activation, backend="cpu"),
                      inputs, g.to(dtype))
    out_b, grads_b = _run(lambda *t: eager_mlp(*t, activation), base, g.to(dtype))
    out_r, grads_r = _run(lambda *t: eager_mlp(*t, activation), ref, g)
    assert out.dtype == dtype and all(gr.dtype == dtype for gr in grads)
    assert_within_2x(out, out_r, out_b, "output")
    for name, a, r, b in zip(NAMES, grads, grads_r, grads_b):
        assert_within_2x(a, r, b, f"grad {name}")


def test_bfloat16_mimic_loss_within_2x(chunk):
    chunk(64)
    B, D, k, H, C = 16, 24, 8, 200, 6
    inputs = make_mlp_inputs(B, D, k, H, C, dtype=torch.bfloat16)
    t = torch.randn(B, C)
    ref = to64(inputs)
    base = [x.detach().clone().requires_grad_() for x in inputs]
    loss = mf.mimic_loss(*inputs, t.bfloat16(), backend="cpu")
    loss.backward()
    loss_b = torch.nn.functional.mse_loss(eager_mlp(*base, "relu"), t.bfloat16())
    loss_b.backward()
    loss_r = torch.nn.functional.mse_loss(eager_mlp(*ref, "relu"), t.double())
    loss_r.backward()
    assert loss.dtype == torch.bfloat16
    assert_within_2x(loss, loss_r, loss_b, "loss")
    for name, a, r, b in zip(NAMES, _grads(inputs), _grads(ref), _grads(base)):
        assert_within_2x(a, r, b, f"grad {name}")


# ---- custom-op registration, torch.compile -------------------------------------------------------

def _op_samples():
    samples = []
    for bias in (True, False):
        for dtype in (torch.float32, torch.bfloat16):
            x, U, V, b1, W, b2 = make_mlp_inputs(5, 6, 3, 70, 4, dtype=dtype, bias=bias,
                                                 requires_grad=False)
            cd = torch.float32
            z = (x.to(cd) @ U.to(cd).t())
            dy = torch.randn(5, 4, dtype=cd)
            t = torch.randn(5, 4, dtype=dtype)
            act = ACTIVATION_CODES["gelu" if bias else "relu"]
            samples.append(("cpu_mlp_fwd", (x, U, V, b1, W, b2, act)))
            samples.append(("cpu_mlp_bwd", (dy, x, z, U, V, b1, W, act, bias)))
            for red in (0, 1, 2):
                samples.append(("cpu_mimic_fwd", (x, U, V, b1, W, b2, t, act, red)))
    return samples


@pytest.mark.parametrize("op,args", _op_samples())
def test_opcheck(op, args, chunk):
    chunk(32)
    torch.library.opcheck(getattr(torch.ops.mimic_fast, op).default, args)


@pytest.mark.slow
def test_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    m = mf.nn.WideShallowStudent(7, 4, 48, 3, activation="gelu", backend="cpu")
    x, t = torch.randn(5, 7), torch.randn(5, 4)

    def step(x, t):
        y = m(x)
        return y, mf.logit_mse_loss(y, t) + m.mimic_loss(x, t, reduction="sum")

    # aot_eager: traces through the fake kernels and AOTAutograd like inductor does, without
    # paying inductor's C++ compile on a 2-core CI machine.
    y, loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, t)
    loss.backward()
    compiled = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    y_e, loss_e = step(x, t)
    loss_e.backward()
    assert_close(y, y_e, "y")
    assert_close(loss, loss_e, "loss")
    for (n, _), a, b in zip(m.named_parameters(), compiled, [p.grad for p in m.parameters()]):
        assert_close(a, b, f"grad {n}")


# ---- memory, dispatch, validation ----------------------------------------------------------------

def test_never_allocates_batch_by_hidden():
    """No allocation of B*H elements anywhere, scratch inside the C++ kernels included.

    A TorchDispatchMode cannot see inside the op (the mode is popped while the kernel runs, so it
    sees only the op's outputs); the profiler's allocator events see every c10 CPU allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    # Default chunk at B=256: 1024 columns (a 1 MiB fp32 tile); a
    # workspace holds one tile per thread.
    B, D, k, H, C = 256, 8, 4, 16384, 6
    n = torch.ops.mimic_fast.cpu_chunk_h(B, H)
    assert n == 1024
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C)
    t = torch.randn(B, C)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mf.mimic_loss(x, U, V, b1, W, b2, t, backend="cpu").backward()
        mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="cpu").sum().backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    largest = max(sizes, default=0)
    assert largest >= B * n * 4, f"the profiler missed the hidden tiles (largest {largest} B)"
    assert largest <= torch.get_num_threads() * B * n * 4 < B * H * 4, \
        f"an allocation of {largest} bytes: more than one fp32 tile per thread"


def test_auto_picks_cpu_for_cpu_tensors():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        p = dispatch.Problem("mimic", torch.device("cpu"), dtype, 4, 5, 2, 9, 3, "relu", dtype)
        assert dispatch.select("auto", p) == "cpu"
    p = dispatch.Problem("mlp", torch.device("cuda", 0), torch.float32, 4, 5, 2, 9, 3, "relu")
    assert any("CPU tensors only" in r for r in cpu.reasons(p))
    info = dispatch.info()["backends"]["cpu"]
    assert info["available"] and info["threads"] >= 1 and info["chunk_h_at_B256"] % 64 == 0


def test_direct_op_call_is_checked():
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 4, 2, 5, 3, requires_grad=False)
    with pytest.raises(RuntimeError, match=r"W has shape \[3, 4\] but V implies H=5"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W[:, :4], b2, 0)
    with pytest.raises(RuntimeError, match="V has dtype Double but x has dtype Float"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V.double(), b1, W, b2, 0)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 9)
    with pytest.raises(RuntimeError, match="reduction code"):
        torch.ops.mimic_fast.cpu_mimic_fwd(x, U, V, b1, W, b2, torch.randn(3, 3), 0, 5)


def test_results_do_not_depend_on_chunk_or_loop_order(chunk):
    inputs = make_mlp_inputs(9, 6, 3, 300, 4, dtype=torch.float64, requires_grad=False)
    chunk(300, "gemm")
    y_one = mf.bottleneck_mlp(*inputs, backend="cpu")
    for loop in ("gemm", "chunks"):
        chunk(7, loop)
        assert_close(mf.bottleneck_mlp(*inputs, backend="cpu"), y_one, f"y ({loop})",
                     dtype=torch.float64)


def test_chunks_loop_order_is_deterministic(chunk):
    """Threads take groups of chunks dynamically, but the partials are summed in group order."""
    chunk(16, "chunks")
    x, U, V, b1, W, b2 = make_mlp_inputs(33, 10, 5, 700, 6)
    t = torch.randn(33, 6)
    runs = []
    for _ in range(3):
        for p in (x, U, V, b1, W, b2):
            p.grad = None
        loss = mf.mimic_loss(x, U, V, b1, W, b2, t, backend="cpu")
        loss.backward()
        runs.append([loss.detach()] + [p.grad for p in (x, U, V, b1, W, b2)])
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_bad_environment_override(chunk):
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 4, 2, 5, 3, requires_grad=False)
    chunk(4, "sideways")
    with pytest.raises(RuntimeError, match="MIMIC_FAST_CPU_LOOP must be 'gemm' or 'chunks'"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 0)
    chunk(-3, "gemm")
    with pytest.raises(RuntimeError, match="MIMIC_FAST_CPU_CHUNK_H must be a positive integer"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 0)
