"""The Triton kernels compiled for a GPU that is not here: the speed gate of a machine without one.

`trace()` runs the real launchers on meta tensors with the kernels swapped for recorders, so every
launch's arguments, constexprs and grid are exactly what a GPU run would pass (the cost model reads
the same records). `compile_launch()` then compiles one launch and config through Triton's own
compiler for sm_90a or sm_80 (TRITON_INTERPRET must be unset) and reads what decides speed: ptxas
registers, spills and shared memory, and in the PTX the tensor-core MMAs (wgmma / mma.sync) and the
async copies (cp.async, TMA) of the pipelined loops. Reports are cached by the compiler's own
content hash, so re-runs cost nothing.

    python -m mimic_fast.ops.triton_offline [--jobs 2] [--json out.json]   # the whole matrix
"""
import argparse
import contextlib
import hashlib
import io
import json
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Dict, NamedTuple, Tuple

import torch

from . import triton_fused as T

K = T.K
KERNELS = ("_fused_mlp_fwd_kernel", "_fused_mlp_bwd_kernel", "_fused_mlp_dz_kernel",
           "_reduce_splits_kernel")
TARGETS = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}  # capability, max shared memory
# The backend serves Hopper only (triton_fused.reasons): sm_80 compiles are for reports, not the gate.
GATE_TARGETS = ("sm_90a",)
PAPER = dict(D=1845, k=250, C=183)
REPORT_VERSION = "3"  # bump when compile_launch's report gains or changes a field (cache key)
CACHE_DIR = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                         "mimic_fast", "triton_offline")


class Launch(NamedTuple):
    name: str  # kernel name in triton_kernels
    grid: Any  # tuple, or a function of the config's meta-parameters
    args: Tuple
    kwargs: Dict

    def grid_for(self, meta):
        return self.grid(meta) if callable(self.grid) else self.grid

    def configs(self):
        """Autotune configs of this kernel ([None]: not autotuned)."""
        fn = getattr(K, self.name)
        return list(fn.configs) if hasattr(fn, "configs") else [None]

    def jit_fn(self):
        fn = getattr(K, self.name)
        return fn.fn if hasattr(fn, "configs") else fn

    def bound(self, config=None):
        """All arguments by name, the config's meta-parameters included."""
        import inspect

        sig = inspect.signature(self.jit_fn().fn)
        kwargs = dict(self.kwargs)
        if config is not None:
            kwargs.update(config.kwargs)
        b = sig.bind_partial(*self.args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
        return dict(b.arguments)


class _Recorder:
    def __init__(self, name, sink):
        self.name, self.sink = name, sink
        real = getattr(K, name)
        self.configs = getattr(real, "configs", None)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(Launch(self.name, grid, args, kwargs))
        return launch


@contextlib.contextmanager
def record_launches():
    """Within: the launchers record their kernel launches instead of running them."""
    sink = []
    saved = {n: getattr(K, n) for n in KERNELS}
    try:
        for n in KERNELS:
            setattr(K, n, _Recorder(n, sink))
        yield sink
    finally:
        for n, fn in saved.items():
            setattr(K, n, fn)


def _meta_inputs(B, D, k, H, C, dtype, bias):
    m = dict(device="meta", dtype=dtype)
    return (torch.empty(B, D, **m), torch.empty(k, D, **m), torch.empty(H, k, **m),
            torch.empty(H, **m) if bias else None, torch.empty(C, H, **m),
            torch.empty(C, **m) if bias else None)


def trace(op, B, D, k, H, C, dtype=torch.bfloat16, activation="relu", bias=True,
          deterministic=False):
    """The launches of one pass: op "forward" (bottleneck_mlp), "mimic" (mimic_loss forward) or
    "backward", on meta tensors, as planned for an H200 (132 SMs; `candidates` then applies a
    target's pruning)."""
    x, U, V, b1, W, b2 = _meta_inputs(B, D, k, H, C, dtype, bias)
    with record_launches() as launches, T.device_override(T.OFFLINE_DEVICE):
        if op == "forward":
            T.fused_mlp_fwd(x, U, V, b1, W, b2, activation)
        elif op == "mimic":
            T.fused_mimic_fwd(x, U, V, b1, W, b2, torch.empty(B, C, device="meta", dtype=dtype),
                              activation, "mean")
        elif op == "backward":
            z = torch.empty(B, k, device="meta", dtype=dtype)
            dy = torch.empty(B, C, device="meta", dtype=torch.float32)
            T.fused_mlp_bwd(dy, x, z, U, V, b1, W, activation, bias, deterministic=deterministic)
        else:
            raise ValueError(f"unknown op {op!r}: expected 'forward', 'mimic' or 'backward'")
    return launches


# ------------------------------------------------------------------------------------- compiling
def _prepare(launch, config, capability):
    """(ASTSource, options, target) as Triton's JIT would build them for this launch on the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = launch.jit_fn()
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    if config is not None:
        kwargs.update(config.kwargs)
        kwargs.update(num_warps=config.num_warps, num_stages=config.num_stages)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args,
                                                           specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options, target


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


def _ptx_counts(ptx):
    return {
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "ld_global_v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
        "ld_global_scalar_b16": len(re.findall(r"ld\.global(?:\.\w+)*\.b16\s", ptx)),
        "atom_red": len(re.findall(r"\b(?:red|atom)\.global", ptx)),
    }


def _cache_path(src, options, target):
    import triton

    key = "|".join([src.hash(), options.hash(), str(target), triton.__version__, REPORT_VERSION])
    return os.path.join(CACHE_DIR, hashlib.sha256(key.encode()).hexdigest() + ".json")


def _smem_estimate(launch, config):
    """triton_kernels.smem_bytes for this launch (what the pruning believes), None for the reduce."""
    if config is None:
        return None
    args = launch.bound(config)
    z = args["Z"]
    return K.smem_bytes(_kind(launch.name), args, config.num_stages, args["KP"],
                        args["C1"] + args["C2"], getattr(z, "base", z).element_size(),
                        args.get("DZ_ATOMIC", True))


def compile_launch(launch, config, target_name="sm_90a", use_cache=True):
    """Compile one launch with one config for the target; a dict of what decides its speed."""
    import triton
    from triton import knobs

    capability, smem_limit = TARGETS[target_name]
    src, options, target = _prepare(launch, config, capability)
    path = _cache_path(src, options, target)
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return _with_expectations(json.load(f), launch, config)
    log = io.StringIO()
    t0 = time.perf_counter()
    # Triton's own cache would skip ptxas (and its report): compile afresh, cache the report here.
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    text = log.getvalue()
    spills = [tuple(map(int, m)) for m in _PTXAS.findall(text)]
    regs = [int(r) for r in _REGS.findall(text)]
    report = {
        "kernel": launch.name, "target": target_name,
        "config": None if config is None else {**config.kwargs, "num_warps": config.num_warps,
                                               "num_stages": config.num_stages},
        "registers": max(regs) if regs else None,
        "stack_bytes": max((s[0] for s in spills), default=None),
        "spill_store_bytes": max((s[1] for s in spills), default=None),
        "spill_load_bytes": max((s[2] for s in spills), default=None),
        "shared_bytes": compiled.metadata.shared, "shared_limit": smem_limit,
        "num_warps": compiled.metadata.num_warps,
        "compile_s": round(time.perf_counter() - t0, 2),
        **_ptx_counts(compiled.asm["ptx"]),
    }
    if use_cache:
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, path)
    return _with_expectations(report, launch, config)


def _with_expectations(report, launch, config):
    """The compiler's facts (cached by its content hash) plus what the gate checks them against,
    computed afresh every time: a changed estimate in the Python code is always re-checked."""
    return {**report, "shared_estimate": _smem_estimate(launch, config)}


# --------------------------------------------------------------------------------- the gate matrix
GATE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}
GATE_OPS = (("forward", False), ("mimic", False), ("backward", False), ("backward", True))


def _gate_launches(dname, H, op, det, B):
    dtype = GATE_DTYPES[dname]
    with _tf32(dtype):
        return trace(op, B, PAPER["D"], PAPER["k"], H, PAPER["C"], dtype, deterministic=det)


def gate_cases(H_values=(8000, 400000), B=4096):
    """(label, spec) for every config autotune can pick, of every kernel, at the paper shape:
    bf16, fp16 and fp32-TF32 on the gate's targets, forward, mimic, backward (reduce-add dz and
    the deterministic dz kernel). A spec is plain data (the worker re-traces it); kernels whose
    specialisation repeats (H only changes runtime values) are listed once."""
    seen, cases = set(), []
    for target in GATE_TARGETS:
        for dname in GATE_DTYPES:
            for H in H_values:
                for op, det in GATE_OPS:
                    for i, launch in enumerate(_gate_launches(dname, H, op, det, B)):
                        configs = candidates(launch, target)
                        if not configs:
                            cases.append((f"{target}/{dname}/H={H}/{op}/{launch.name}/none",
                                          None))
                        for j, config in enumerate(configs):
                            src, options, _ = _prepare(launch, config, TARGETS[target][0])
                            key = (src.hash(), options.hash(), target)
                            if key in seen:
                                continue
                            seen.add(key)
                            label = f"{target}/{dname}/H={H}/{op}{'-det' if det else ''}/" \
                                    f"{launch.name}/{_config_label(config)}"
                            cases.append((label, (target, dname, H, op, det, B, i, j)))
    return cases


@contextlib.contextmanager
def _tf32(dtype):
    """fp32 cases are the TF32 path (torch allowing TF32 matmuls)."""
    if dtype != torch.float32:
        yield
        return
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _config_label(config):
    if config is None:
        return "-"
    kw = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{kw + ',' if kw else ''}w{config.num_warps},s{config.num_stages}"


def candidates(launch, target):
    """The configs the autotuner's pruning keeps for this launch on the target."""
    configs = launch.configs()
    if configs == [None]:
        return configs
    capability, limit = TARGETS[target]
    return K.fitting_configs(_kind(launch.name), configs, launch.bound(), limit, capability)


def _kind(name):
    return {"_fused_mlp_fwd_kernel": "fwd", "_fused_mlp_bwd_kernel": "bwd",
            "_fused_mlp_dz_kernel": "dz"}[name]


def _compile_case(case):
    label, spec = case
    if spec is None:
        return label, {"error": "the pruning keeps no config for this launch"}
    target, dname, H, op, det, B, i, j = spec
    try:
        launch = _gate_launches(dname, H, op, det, B)[i]
        return label, compile_launch(launch, candidates(launch, target)[j], target)
    except Exception as e:  # reported per case; the gate fails on it
        return label, {"error": f"{type(e).__name__}: {e}"}


def run_gate(jobs=2, H_values=(8000, 400000)):
    """{label: report or {"error": ...}} for every gate case, compiled on `jobs` processes."""
    cases = gate_cases(H_values)
    if jobs <= 1:
        return dict(map(_compile_case, cases))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return dict(pool.map(_compile_case, cases))


def problems(label, report):
    """What a compiled kernel does wrong by the gate's rules (empty: it passes)."""
    if "error" in report:
        return [f"does not compile: {report['error']}"]
    out = []
    if report["spill_store_bytes"]:
        out.append(f"spills {report['spill_store_bytes']} bytes")
    if report["shared_bytes"] > report["shared_limit"]:
        out.append(f"shared memory {report['shared_bytes']} > {report['shared_limit']}")
    estimate = report.get("shared_estimate")
    if estimate is not None and report["shared_bytes"] > estimate:
        out.append(f"shared memory {report['shared_bytes']} above the pruning's estimate "
                   f"{estimate}: the pruning could keep a config that cannot launch")
    if report["kernel"] != "_reduce_splits_kernel":
        if report["target"] == "sm_90a" and not report["wgmma"]:
            out.append("no wgmma on sm_90a")
        if not (report["wgmma"] or report["mma_sync"]):
            out.append("no tensor-core MMA")
        if not (report["cp_async"] or report["tma"]):
            out.append("no async copies (cp.async / TMA) in the main loops")
    return out


def main(argv=None):
    if K is None or K.INTERPRET:
        print("triton_offline: needs triton with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(prog="python -m mimic_fast.ops.triton_offline",
                                description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    p.add_argument("--H", type=int, nargs="+", default=[8000, 400000])
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    reports = run_gate(args.jobs, tuple(args.H))
    bad = 0
    print(f"{'case':<92} {'regs':>4} {'spill':>5} {'smem KB':>7} {'wgmma':>5} {'mma':>4} "
          f"{'cp.async':>8} {'tma':>4} {'s':>5}")
    for label, r in reports.items():
        why = problems(label, r)
        bad += bool(why)
        if "error" in r:
            print(f"{label:<92} ERROR {r['error'][:200]}")
            continue
        print(f"{label:<92} {r['registers']:>4} {r['spill_store_bytes']:>5} "
              f"{r['shared_bytes'] / 1024:>7.1f} {r['wgmma']:>5} {r['mma_sync']:>4} "
              f"{r['cp_async']:>8} {r['tma']:>4} {r['compile_s']:>5}"
              + (f"  FAIL: {'; '.join(why)}" if why else ""))
    print(f"{len(reports)} kernels, {bad} failing, {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
