"""The cpu backend (csrc/cpu, torch.ops.mimic_fast.cpu_*): gradients, odd shapes, low precision,
custom-op registration, torch.compile, the no-(B, H)-allocation property, and no dx (GEMM or
allocation) when x needs no gradient.

Tiny H chunks (the backend's tuning knob, cpu.tuning) make small problems span several chunks,
ragged last one included. Skipped as a whole when the extension is not built.
"""
import contextlib

import pytest
import torch

import mimic_fast as mf
from mimic_fast import dispatch
from mimic_fast.activations import ACTIVATIONS, ACTIVATION_CODES
from mimic_fast.testing import ATOL_2X, assert_close, assert_within_2x

from helpers import eager_mlp, make_mlp_inputs, to64

cpu = dispatch.get("cpu")
pytestmark = pytest.mark.skipif(cpu.availability() is not None,
                                reason=f"cpu backend unavailable: {cpu.availability()}")
NAMES = ("x", "U", "V", "b1", "W", "b2")


@pytest.fixture
def chunk():
    """chunk(n, loop=None, native=None): the cpu backend's plan for the rest of the test."""
    stack = contextlib.ExitStack()

    def set_chunk(n, loop=None, native=None):
        stack.close()
        stack.enter_context(cpu.tuning(chunk_h=n, loop=loop, native=native))
    yield set_chunk
    stack.close()


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


@pytest.mark.parametrize("dtype,native", [(torch.float32, None), (torch.bfloat16, True)])
def test_non_contiguous_inputs(dtype, native, chunk):
    chunk(64, native=native)
    B, D, k, H, C = 6, 10, 3, 150, 4
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C, dtype=dtype, requires_grad=False)
    # x a column slice, U and V stored transposed, W and b1 strided views.
    x_nc = torch.cat([x, torch.zeros(B, 3, dtype=dtype)], 1)[:, :D]
    U_nc, V_nc = U.t().contiguous().t(), V.t().contiguous().t()
    W_nc = torch.cat([W, W], 1)[:, ::2]
    b1_nc = torch.stack([b1, b1], 1)[:, 0]
    nc = [t.requires_grad_() for t in (x_nc, U_nc, V_nc, b1_nc, W_nc, b2.clone())]
    assert not any(t.is_contiguous() for t in nc[:5])
    t = torch.randn(B, C).to(dtype)
    loss = mf.mimic_loss(*nc, t, backend="cpu")
    loss.backward()
    ref = to64(nc)
    loss_r = mf.mimic_loss(*ref, t.double(), backend="reference")
    loss_r.backward()
    _compare_all(loss, _grads(nc), loss_r, _grads(ref), dtype)


# ---- low precision: the 2x rule, both compute paths ---------------------------------------------
# native: bf16/fp16 GEMM operands, float32 accumulation and epilogues (where the CPU has the matrix
# units; forced here with the tuning knob, so it is tested on any CPU); float32: upcast per chunk.
LOW = [torch.bfloat16, torch.float16]
PATHS = {"native": True, "float32": False}
LOW_SHAPES = [  # B, D, k, H, C, lead, chunk
    (16, 24, 8, 200, 6, None, 64),
    (7, 13, 5, 131, 3, (7,), 48),   # odd sizes, ragged last chunk
    (1, 9, 1, 70, 1, None, 32),     # k = C = B = 1
    (6, 10, 4, 90, 5, (2, 3), 4096),  # one chunk narrower than the width, 3-D input
]


def _eager_loss(out, t, reduction):
    return torch.nn.functional.mse_loss(out, t, reduction=reduction)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("B,D,k,H,C,lead,n", LOW_SHAPES)
def test_low_precision_mlp_within_2x_of_pytorch(dtype, path, activation, B, D, k, H, C, lead, n,
                                                chunk):
    chunk(n, "chunks" if H > 100 else "gemm", native=PATHS[path])
    inputs = make_mlp_inputs(B, D, k, H, C, dtype=dtype, lead=lead, bias=activation != "tanh")
    base = [None if t is None else t.detach().clone().requires_grad_() for t in inputs]
    ref = to64(inputs)
    shape = (B, C) if lead is None else (*lead, C)
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out, grads = _run(lambda *t: mf.bottleneck_mlp(*t, activation=activation, backend="cpu"),
                      inputs, g.to(dtype))
    out_b, grads_b = _run(lambda *t: eager_mlp(*t, activation), base, g.to(dtype))
    out_r, grads_r = _run(lambda *t: eager_mlp(*t, activation), ref, g)
    assert out.dtype == dtype and all(gr is None or gr.dtype == dtype for gr in grads)
    assert_within_2x(out, out_r, out_b, "output")
    for name, a, r, b in zip(NAMES, grads, grads_r, grads_b):
        if r is not None:
            assert_within_2x(a, r, b, f"grad {name}")


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("B,D,k,H,C,lead,n", LOW_SHAPES[:2])
def test_low_precision_mimic_lossassert_within_2x(dtype, path, reduction, activation, B, D, k, H, C, lead,
                                            n, chunk):
    chunk(n, native=PATHS[path])
    inputs = make_mlp_inputs(B, D, k, H, C, dtype=dtype, lead=lead)
    shape = (B, C) if lead is None else (*lead, C)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    ref = to64(inputs)
    base = [x.detach().clone().requires_grad_() for x in inputs]
    g = torch.rand(shape if reduction == "none" else (), dtype=torch.float64,
                   generator=torch.Generator().manual_seed(9)) + 0.5
    loss = mf.mimic_loss(*inputs, t.to(dtype), activation=activation, reduction=reduction,
                         backend="cpu")
    loss.backward(g.to(dtype))
    loss_b = _eager_loss(eager_mlp(*base, activation), t.to(dtype), reduction)
    loss_b.backward(g.to(dtype))
    loss_r = _eager_loss(eager_mlp(*ref, activation), t.to(dtype).double(), reduction)
    loss_r.backward(g)
    assert loss.dtype == dtype and loss.shape == loss_r.shape
    assert_within_2x(loss, loss_r, loss_b, "loss")
    for name, a, r, b in zip(NAMES, _grads(inputs), _grads(ref), _grads(base)):
        assert_within_2x(a, r, b, f"grad {name}")


def test_native_path_keeps_operands_low_and_sums_in_float32(chunk):
    """The native path's saved z is in the input dtype (an operand), the float32 path's in float32;
    both give the input dtype out, and the native path's y sums its chunks in float32: many chunks
    cost it no more accuracy than one."""
    x, U, V, b1, W, b2 = make_mlp_inputs(8, 12, 4, 4096, 5, dtype=torch.bfloat16,
                                         requires_grad=False)
    for native, z_dtype in ((True, torch.bfloat16), (False, torch.float32)):
        chunk(64, native=native)
        y, z = cpu.mlp_fwd(x, U, V, b1, W, b2, "relu")
        assert y.dtype == torch.bfloat16 and z.dtype == z_dtype
    ref = eager_mlp(*to64([x, U, V, b1, W, b2]))
    errors = {}
    for n in (64, 4096):
        chunk(n, native=True)
        errors[n] = (cpu.mlp_fwd(x, U, V, b1, W, b2, "relu")[0].double() - ref).abs().max().item()
    assert errors[64] <= 1.5 * errors[4096] + 1e-3, errors


@pytest.mark.parametrize("native", [True, False])
def test_autocast_with_float32_master_weights(native, chunk):
    """What a bf16 training step does: fp32 parameters, the step under autocast; the fused op runs
    in bf16 (natively or in float32, per the plan), gradients arrive in float32 on the parameters."""
    chunk(32, native=native)
    B, D, k, H, C = 12, 20, 6, 150, 4
    params = make_mlp_inputs(B, D, k, H, C)
    x, weights = params[0].detach(), params[1:]
    base = [w.detach().clone().requires_grad_() for w in weights]
    t = torch.randn(B, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = mf.bottleneck_mlp(x, *weights, activation="gelu", backend="cpu")
        loss = mf.logit_mse_loss(y, t) + mf.mimic_loss(x, *weights, t, activation="gelu",
                                                       backend="cpu")
        loss.backward()
        y_b = eager_mlp(x, *base, "gelu")  # F.linear under autocast: the 2x baseline
        loss_b = torch.nn.functional.mse_loss(y_b, t) * 2
        loss_b.backward()
    xb = x.bfloat16().double()  # autocast rounds x and the weights once, as the reference sees them
    wb = [w.detach().bfloat16().double().requires_grad_() for w in weights]
    loss_r = torch.nn.functional.mse_loss(eager_mlp(xb, *wb, "gelu"), t.double()) * 2
    loss_r.backward()
    assert y.dtype == torch.bfloat16 and loss.dtype == torch.float32
    assert all(w.grad.dtype == torch.float32 for w in weights)
    assert_within_2x(loss, loss_r, loss_b, "loss", atol=ATOL_2X[torch.bfloat16])
    for name, w, r, b in zip(NAMES[1:], weights, wb, base):
        assert_within_2x(w.grad, r.grad, b.grad, f"grad {name}", atol=ATOL_2X[torch.bfloat16])


# ---- custom-op registration, torch.compile -------------------------------------------------------

def _op_samples():
    samples = []
    for bias in (True, False):
        for dtype, native in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True),
                              (torch.float16, True)):
            x, U, V, b1, W, b2 = make_mlp_inputs(5, 6, 3, 70, 4, dtype=dtype, bias=bias,
                                                 requires_grad=False)
            cd = dtype if native else torch.float32
            z = (x.to(cd) @ U.to(cd).t())
            dy = torch.randn(5, 4, dtype=torch.float32)
            t = torch.randn(5, 4, dtype=dtype)
            act = ACTIVATION_CODES["gelu" if bias else "relu"]
            plan = (32, cpu.LOOP_CODES["chunks" if bias else "gemm"], native)
            samples.append(("cpu_mlp_fwd", (x, U, V, b1, W, b2, act, *plan)))
            for need_dx in (True, False):
                samples.append(("cpu_mlp_bwd", (dy, x, z, U, V, b1, W, act, bias, need_dx, *plan)))
            for red in (0, 1, 2):
                samples.append(("cpu_mimic_fwd", (x, U, V, b1, W, b2, t, act, red, *plan)))
    return samples


@pytest.mark.parametrize("op,args", _op_samples())
def test_opcheck(op, args):
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

@pytest.mark.parametrize("dtype,native", [(torch.float32, None), (torch.bfloat16, True),
                                          (torch.bfloat16, False), (torch.float16, True),
                                          (torch.float16, False)])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_never_allocates_batch_by_hidden(dtype, native, activation, chunk):
    """No allocation of B*H elements in any dtype, forward and backward, scratch inside the C++
    kernels included; the hidden tiles follow the plan's chunk width.

    A TorchDispatchMode cannot see inside the op (the mode is popped while the kernel runs, so it
    sees only the op's outputs); the profiler's allocator events see every c10 CPU allocation.
    """
    from torch.profiler import ProfilerActivity, profile

    chunk(None, native=native)
    B, D, k, H, C = 256, 8, 4, 16384, 6
    p = cpu.plan(B, H, dtype)
    n = p.chunk_h
    op_dtype = dtype if p.native or dtype == torch.float32 else torch.float32
    assert n == cpu.default_chunk_h(B, op_dtype) and n % 64 == 0 and n < H
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C, dtype=dtype)
    t = torch.randn(B, C, dtype=dtype)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mf.mimic_loss(x, U, V, b1, W, b2, t, activation=activation, backend="cpu").backward()
        mf.bottleneck_mlp(x, U, V, b1, W, b2, activation=activation, backend="cpu").sum().backward()
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    largest = max(sizes, default=0)
    tile = B * n * torch.empty((), dtype=op_dtype).element_size()
    assert largest >= tile, f"the profiler missed the hidden tiles (largest {largest} B)"
    # One tile per thread, in the GEMMs' dtype or (the native path's scratch) float32; a (B, H)
    # tensor would be at least B*H*2 bytes.
    assert largest <= torch.get_num_threads() * B * n * 4 < B * H * 2, \
        f"an allocation of {largest} bytes: more than one float32 tile of {n} columns per thread"


@pytest.mark.parametrize("dtype,native", [(torch.float32, None), (torch.float64, None),
                                          (torch.bfloat16, True), (torch.bfloat16, False),
                                          (torch.float16, True), (torch.float16, False)])
def test_backward_without_dx_skips_its_gemm_and_allocation(dtype, native, chunk):
    """need_dx=False: the (B, D) dx is never allocated (nor its float32 GEMM output on the native
    path), on both paths of the C++ op; every other gradient is bit for bit the same."""
    from torch.profiler import ProfilerActivity, profile

    chunk(16, "chunks", native=native)
    B, D, k, H, C = 5, 301, 3, 70, 4  # B*D elements: no other tensor of the backward has as many
    x, U, V, b1, W, b2 = make_mlp_inputs(B, D, k, H, C, dtype=dtype, requires_grad=False)
    y, z = cpu.mlp_fwd(x, U, V, b1, W, b2, "gelu")
    dy = torch.randn(B, C, dtype=torch.float32)

    def backward(need_dx):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            grads = cpu.mlp_bwd(dy, x, z, U, V, b1, W, "gelu", True, need_dx)
        events = prof.profiler.kineto_results.events()
        return grads, [e.nbytes() for e in events if e.name() == "[memory]" and e.nbytes() > 0]

    (dx, *grads), sizes = backward(True)
    (no_dx, *grads_without), sizes_without = backward(False)
    dx_bytes = B * D * x.element_size()
    assert dx.shape == x.shape and dx_bytes in sizes, "the profiler missed the dx allocation"
    assert no_dx is None
    assert dx_bytes not in sizes_without, "need_dx=False still allocated a (B, D) dx"
    if dtype in cpu.LOW_PRECISION and cpu.plan(B, H, dtype).native:  # its float32 GEMM output
        assert sizes_without.count(B * D * 4) == sizes.count(B * D * 4) - 1
    for name, a, b in zip(("dU", "dV", "db1", "dW", "db2"), grads, grads_without):
        assert torch.equal(a, b), name


def test_auto_picks_cpu_for_cpu_tensors():
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        p = dispatch.Problem("mimic", torch.device("cpu"), dtype, 4, 5, 2, 9, 3, "relu", dtype)
        assert dispatch.select("auto", p) == "cpu"
    p = dispatch.Problem("mlp", torch.device("cuda", 0), torch.float32, 4, 5, 2, 9, 3, "relu")
    assert any("CPU tensors only" in r for r in cpu.reasons(p))
    info = dispatch.info()["backends"]["cpu"]
    assert info["available"] and info["threads"] >= 1
    assert all(n % 64 == 0 for n in info["chunk_h_at_B256"].values())


# ---- the compute path of bf16 / fp16: from the CPU's features ---------------------------------------
SPR = {"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx512_fp16": True,
       "amx_fp16": False}
GEMMS = {torch.bfloat16: True, torch.float16: True}


def test_compute_path_follows_the_cpu_features():
    path = cpu.compute_path
    assert path(torch.bfloat16, SPR, GEMMS)[0] == "native"
    assert "AMX-BF16" in path(torch.bfloat16, SPR, GEMMS)[1]
    # AVX512-BF16 alone (e.g. Cooper Lake, Zen 4) is a native bf16 dot product too.
    assert path(torch.bfloat16, {"avx512_bf16": True}, GEMMS)[0] == "native"
    # AVX512-FP16 has no float32-accumulating dot product: fp16 needs AMX-FP16.
    fp16 = path(torch.float16, SPR, GEMMS)
    assert fp16[0] == "float32" and "AMX-FP16" in fp16[1]
    assert path(torch.float16, {**SPR, "amx_fp16": True}, GEMMS)[0] == "native"
    # An AVX2-only CPU (no bf16/fp16 matmul): float32, and the reason names what is missing.
    avx2 = {"avx2": True}
    for dtype in (torch.bfloat16, torch.float16):
        kind, why = path(dtype, avx2, GEMMS)
        assert kind == "float32" and "no " in why
    # The features without MKL's bf16 -> float32 GEMM (a torch without MKL): float32 too.
    kind, why = path(torch.bfloat16, SPR, {torch.bfloat16: False, torch.float16: False})
    assert kind == "float32" and "MKL" in why
    for dtype in (torch.float32, torch.float64):
        assert path(dtype, avx2, GEMMS)[0] == "native"


def test_plan_takes_the_path_from_the_features(monkeypatch):
    B, H = 256, 1 << 20
    for caps, native in ((SPR, True), ({"avx2": True}, False)):
        monkeypatch.setattr(cpu, "_capabilities", lambda caps=caps: {**caps, "l2_cache_size": 2 << 20})
        monkeypatch.setattr(cpu, "_gemms", lambda: GEMMS)
        p = cpu.plan(B, H, torch.bfloat16)
        assert p.native is native and p.loop == "auto"
        # The tile is half the (here 2 MiB) L2 in the GEMMs' dtype: 2048 bf16 or 1024 fp32 columns.
        assert p.chunk_h == (2048 if native else 1024)
        assert cpu.plan(B, H, torch.float32) == (1024, "auto", False)
        why = dispatch.info()["backends"]["cpu"]["paths"]["bfloat16"]
        assert why.startswith("native" if native else "computed in float32")
    with cpu.tuning(native=True):  # the knob overrides the features, for low precision only
        assert cpu.plan(B, H, torch.bfloat16).native and not cpu.plan(B, H, torch.float32).native


def test_info_says_the_path_per_dtype():
    entry = dispatch.info()["backends"]["cpu"]
    assert set(entry["paths"]) == {"float32", "float64", "bfloat16", "float16"}
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).replace("torch.", "")
        assert entry["paths"][name] == cpu.compute_path(dtype)[1]
    assert "paths=" in dispatch.format_info()


# ---- the tuning knob and the environment ----------------------------------------------------------

def test_tuning_knob_validates_nests_and_restores():
    before = cpu.plan(64, 10000, torch.float32)
    with cpu.tuning(chunk_h=96, loop="chunks"):
        assert cpu.plan(64, 10000, torch.float32) == (96, "chunks", False)
        with cpu.tuning(loop="gemm"):
            assert cpu.plan(64, 10000, torch.float32) == (96, "gemm", False)
        assert dispatch.info()["backends"]["cpu"]["tuning"] == {"chunk_h": 96, "loop": "chunks"}
        assert cpu.plan(64, 50, torch.float32).chunk_h == 50  # never wider than H
    assert cpu.plan(64, 10000, torch.float32) == before
    for bad, match in (({"chunk_h": 0}, "chunk_h must be a positive integer"),
                       ({"chunk_h": True}, "chunk_h must be a positive integer"),
                       ({"loop": "sideways"}, "loop must be one of auto, gemm, chunks"),
                       ({"native": "yes"}, "native must be True, False or None")):
        with pytest.raises(ValueError, match=match):
            with cpu.tuning(**bad):
                pass


def test_environment_chunk_width_is_read_once_and_validated(monkeypatch):
    cpu.forget_environment()
    monkeypatch.setenv("MIMIC_FAST_CPU_CHUNK_H", "192")
    try:
        assert cpu.plan(8, 10000, torch.float32).chunk_h == 192
        monkeypatch.setenv("MIMIC_FAST_CPU_CHUNK_H", "abc")  # read once: no effect now
        assert cpu.plan(8, 10000, torch.float32).chunk_h == 192
        with cpu.tuning(chunk_h=64):  # the knob wins over the environment
            assert cpu.plan(8, 10000, torch.float32).chunk_h == 64
        cpu.forget_environment()
        x, U, V, b1, W, b2 = make_mlp_inputs(3, 4, 2, 5, 3)
        with pytest.raises(ValueError, match="MIMIC_FAST_CPU_CHUNK_H='abc' must be a positive integer"):
            mf.bottleneck_mlp(x, U, V, b1, W, b2, backend="cpu")
    finally:
        monkeypatch.delenv("MIMIC_FAST_CPU_CHUNK_H")
        cpu.forget_environment()


def test_direct_op_call_is_checked():
    x, U, V, b1, W, b2 = make_mlp_inputs(3, 4, 2, 5, 3, requires_grad=False)
    plan = (4, 0, False)
    with pytest.raises(RuntimeError, match=r"W has shape \[3, 4\] but V implies H=5"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W[:, :4], b2, 0, *plan)
    with pytest.raises(RuntimeError, match="V has dtype Double but x has dtype Float"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V.double(), b1, W, b2, 0, *plan)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 9, *plan)
    with pytest.raises(RuntimeError, match="reduction code"):
        torch.ops.mimic_fast.cpu_mimic_fwd(x, U, V, b1, W, b2, torch.randn(3, 3), 0, 5, *plan)
    with pytest.raises(RuntimeError, match="chunk_h must be a positive number of columns, got 0"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 0, 0, 0, False)
    with pytest.raises(RuntimeError, match="loop code must be 0 \\(auto\\), 1 \\(gemm\\) or 2"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 0, 4, 7, False)
    with pytest.raises(RuntimeError, match="native=True is for bfloat16 / float16 inputs"):
        torch.ops.mimic_fast.cpu_mlp_fwd(x, U, V, b1, W, b2, 0, 4, 0, True)
    z = x @ U.t()
    with pytest.raises(RuntimeError, match="z must be a CPU BFloat16 tensor"):
        xb, Ub, Vb, b1b, Wb = (t.bfloat16() for t in (x, U, V, b1, W))
        torch.ops.mimic_fast.cpu_mlp_bwd(torch.randn(3, 3), xb, z, Ub, Vb, b1b, Wb, 0, True, True, 4,
                                         0, True)


def test_results_do_not_depend_on_chunk_or_loop_order(chunk):
    inputs = make_mlp_inputs(9, 6, 3, 300, 4, dtype=torch.float64, requires_grad=False)
    chunk(300, "gemm")
    y_one = mf.bottleneck_mlp(*inputs, backend="cpu")
    for loop in ("gemm", "chunks"):
        chunk(7, loop)
        assert_close(mf.bottleneck_mlp(*inputs, backend="cpu"), y_one, f"y ({loop})",
                     dtype=torch.float64)


def test_extension_parallel_regions_use_torch_threads():
    """at::parallel_for is a header template: an extension compiled without the intra-op backend's
    flags runs it serially, so the chunks loop order and the epilogues would use one thread."""
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.ops.mimic_fast.cpu_parallel_threads() == threads
    finally:
        torch.set_num_threads(old)


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
