"""The Triton kernels compiled for a GPU that is not here: the speed gate of a machine without one.

The launches come from the plan (ops/triton_plan.py: the same grids, tiles and arguments the
launchers run), bound to meta tensors. `compile_launch()` compiles one launch and config through
Triton's own compiler for sm_90a (TRITON_INTERPRET must be unset) and reads what decides speed:
  ptxas      registers, spilled bytes, shared memory (against the SM's limit and the pruning's
             estimate)
  PTX        tensor-core MMAs (wgmma / mma.sync), async copies (cp.async, TMA), and in every main
             loop (label .. backward branch with wgmmas; the pass-2 kernel has one per branch, the
             others one) the MMA work every warpgroup issues: Σ m·n·k of its wgmma instructions ×
             num_warps / 4 (each warpgroup runs every instruction), which must be at most 1.10x
             the tile's own multiply-adds (triton_plan.tile_macs): no warpgroup repeats another's
             MMAs
  TTGIR      load/compute overlap in every main loop (each scf.for with warp_group_dots): its
             prefetch distance d = async loads issued before the loop in its region (the
             function or the scf.if branch: the pipeliner's prologue, plus any one-off loads, fewer
             than one iteration's) // async loads in one iteration;
             the loads for iteration i+1 are in flight before iteration i's MMAs when d >= 2, or
             d = 1 and the loop body issues its loads before its first MMA. d = 0 (no async load
             in the loop, or no loop) fails. The reduce kernel: no int32 product of its loop
             variable (split offsets advance a 64-bit pointer).
Reports are cached by the compiler's content hash (compiler facts only; what they are checked
against is recomputed every run), so re-runs cost nothing.

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

import torch

from . import triton_plan as P

try:
    from . import triton_kernels as K
except ImportError:  # reported by main()
    K = None

TARGETS = {"sm_90a": (90, 227 * 1024), "sm_80": (80, 163 * 1024)}  # capability, max shared memory
# The backend serves Hopper only (triton_fused.reasons): sm_80 compiles are for reports, not the gate.
GATE_TARGETS = ("sm_90a",)
PAPER = dict(B=4096, D=1845, k=250, C=183)
REPLICATION_LIMIT = 1.10
SMEM_BYTES_PER_CLK = 128  # Hopper's shared-memory bandwidth per SM (informational figure)
MMA_MACS_PER_CLK = 2048  # dense 16-bit tensor-core multiply-adds per SM per clock on Hopper (TF32: half)
REPORT_VERSION = "5"  # bump when compile_launch's cached report gains or changes a field
CACHE_DIR = os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")),
                         "mimic_fast", "triton_offline")
_DTYPES = {"op": None, "f32": torch.float32}


# --------------------------------------------------------------------------------- meta tensors
def meta_tensors(p, dtype, op, reduction="mean"):
    """Every buffer a pass's launches name, as meta tensors of the planned shapes."""
    specs = P.forward_buffers(p) if op in ("forward", "mimic") else P.backward_buffers(p)
    m = dict(device="meta")
    out = {n: torch.empty(s.shape, dtype=_DTYPES[s.dtype] or dtype, **m) for n, s in specs.items()}
    out.update(_dummy=torch.empty(1, dtype=dtype, **m), b2=torch.empty(p.C, dtype=dtype, **m),
               t=torch.empty(p.B, p.C, dtype=dtype, **m), y=torch.empty(p.B, p.C, dtype=dtype, **m),
               dy_unit=torch.empty(p.B, p.C, dtype=torch.float32, **m),
               loss=torch.empty(P.reduce_grid(p, p.B, p.C), dtype=torch.float32, **m),
               db1_row=torch.empty(1, p.H, dtype=dtype, **m))
    if op in ("forward", "mimic"):  # W as the user passes it: (C, H) rows
        out["W_tma"] = torch.empty(p.C, p.H, dtype=dtype, **m)
    return out


def plan_case(dname, H, op, B=PAPER["B"], k=PAPER["k"], C=PAPER["C"]):
    """(plan, launches, meta tensors) of one pass at the paper shape for the offline GPU."""
    dtype = GATE_DTYPES[dname]
    p = P.plan(B, k, H, C, dtype.itemsize, device=P.OFFLINE_DEVICE, interpret=False)
    launches = P.pass_launches(p, op, dot_precision="tf32" if dtype == torch.float32 else None,
                               scale_dz=P.dz_scaled(dtype))
    return p, launches, meta_tensors(p, dtype, op)


# ------------------------------------------------------------------------------------- compiling
def _jit(launch):
    fn = K.kernel(launch.kernel)
    return fn.fn if hasattr(fn, "configs") else fn


def _prepare(launch, tensors, config, capability):
    """(ASTSource, options, target) as Triton's JIT would build them for this launch on the target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = _jit(launch)
    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    _, _, kwargs = K.bind(launch, tensors)
    if config is not None:
        kwargs.update(num_warps=config[0], num_stages=config[1])
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(**kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args,
                                                           specialization, options)
    return ASTSource(jit, signature, constexprs, attrs), options, target


_PTXAS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")
_WGMMA = re.compile(r"wgmma\.mma_async\.sync\.aligned\.m(\d+)n(\d+)k(\d+)\.\w+\.(\w+)\.\w+\s+"
                    r"\{[^}]*\},\s*(\{?)")


def _ptx_counts(ptx):
    return {
        "wgmma": len(re.findall(r"wgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "cp_async": len(re.findall(r"cp\.async\.(?:ca|cg)\.shared", ptx)),
        "tma": len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        "ld_global_v4": len(re.findall(r"ld\.global[.\w]*\.v4", ptx)),
        "atom_red": len(re.findall(r"\b(?:red|atom)\.global|cp\.reduce\.async", ptx)),
    }


def _macs(mmas):
    return sum(int(m) * int(n) * int(k) for m, n, k, _, _ in mmas)


_ELEM_BYTES = {"bf16": 2, "f16": 2, "tf32": 4, "e4m3": 1, "e5m2": 1}


def ptx_main_loop(ptx):
    """The PTX loop (label .. backward branch) whose wgmmas issue the most work (every loop has the
    same tile, so it has the largest issued / useful ratio; the pass-2 kernel has a loop per
    branch): its wgmma count, Σ m·n·k per warpgroup, the shapes, and the shared-memory operand bytes
    per warpgroup (A from shared memory when its operand is a descriptor, not a register list; B
    always)."""
    lines = ptx.splitlines()
    labels, best = {}, None
    for i, line in enumerate(lines):
        m = re.match(r"^\$(L__BB\d+_\d+):", line.strip())
        if m:
            labels[m.group(1)] = i
        m = re.search(r"bra(?:\.uni)?\s+\$(L__BB\d+_\d+);", line)
        if m and m.group(1) in labels and labels[m.group(1)] < i:
            body = "\n".join(lines[labels[m.group(1)]:i + 1])
            mmas = _WGMMA.findall(body)
            if best is None or _macs(mmas) > _macs(best):
                best = mmas
    best = best or []
    macs = _macs(best)
    smem = sum((0 if a_regs else int(m) * int(k) * _ELEM_BYTES[t]) + int(n) * int(k) * _ELEM_BYTES[t]
               for m, n, k, t, a_regs in best)
    return {"loop_wgmma": len(best), "loop_macs_per_warpgroup": macs,
            "loop_smem_operand_bytes_per_warpgroup": smem,
            "loop_wgmma_shapes": sorted({f"m{m}n{n}k{k}" for m, n, k, _, _ in best})}


_ASYNC_LOAD = re.compile(r"ttng\.async_tma_copy_global_to_local|ttg\.async_copy_global_to_local")


def ttgir_main_loop(ttgir):
    """The pipelined main loops in TTGIR (every scf.for with a dot; the pass-2 kernel has one per
    branch): for each, the async loads issued before it in its own region (from the line that
    opens the region: the function, or the branch of an scf.if, to the loop: the pipeliner's
    prologue) and in its body, and whether the body issues a load before its first dot. Returns
    the worst loop's figures (the smallest prefetch distance) and how many loops there are."""
    lines = ttgir.splitlines()
    loops = []
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith("}") and
                    len(lines[j]) - len(lines[j].lstrip()) == indent), len(lines) - 1)
        body = lines[i + 1:end]
        dots = [j for j, b in enumerate(body) if re.search(r"warp_group_dot |tt\.dot ", b)]
        if not dots:
            continue
        region = max((j for j in range(i) if lines[j].strip() and
                      len(lines[j]) - len(lines[j].lstrip()) < indent), default=0)
        loads = [j for j, b in enumerate(body) if _ASYNC_LOAD.search(b)]
        prologue = sum(1 for b in lines[region:i] if _ASYNC_LOAD.search(b))
        loops.append({"loop_dots": len(dots), "prologue_loads": prologue, "loop_loads": len(loads),
                      "loads_before_first_dot": bool(loads) and loads[0] < dots[0]})
    if not loops:
        return {"loop_dots": 0, "prologue_loads": 0, "loop_loads": 0,
                "loads_before_first_dot": False, "main_loops": 0}

    def distance(x):
        return (x["prologue_loads"] // x["loop_loads"] if x["loop_loads"] else 0,
                x["loads_before_first_dot"])
    return {**min(loops, key=distance), "main_loops": len(loops)}


def int32_split_offsets(ttgir):
    """Lines of `ttgir` that multiply a loop's induction variable into an i32 (a split offset
    s · stride that can pass 2³¹ elements): the reduce kernel must advance a 64-bit pointer instead."""
    bad, var = [], None
    for line in ttgir.splitlines():
        m = re.search(r"scf\.for (%[\w.#]+) =", line)
        if m:
            var = m.group(1)
        elif var and "arith.muli" in line and re.search(r":\s*(?:tensor<[^>]*x)?i32\b", line) \
                and re.search(re.escape(var) + r"\b", line.split("=", 1)[1]):
            bad.append(line.strip())
    return bad


def _cache_path(src, options, target):
    import triton

    key = "|".join([src.hash(), options.hash(), str(target), triton.__version__, REPORT_VERSION])
    return os.path.join(CACHE_DIR, hashlib.sha256(key.encode()).hexdigest() + ".json")


def compile_launch(launch, tensors, config, target_name="sm_90a", use_cache=True):
    """Compile one launch with one config (num_warps, num_stages) for the target; a dict of what
    decides its speed (the compiler's facts and the gate's expectations)."""
    import triton
    from triton import knobs

    capability, smem_limit = TARGETS[target_name]
    src, options, target = _prepare(launch, tensors, config, capability)
    path = _cache_path(src, options, target)
    if use_cache and os.path.exists(path):
        with open(path) as f:
            return _with_expectations(json.load(f), launch, _elem(tensors))
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
        "kernel": P.KERNELS[launch.kernel], "target": target_name,
        "config": None if config is None else {"num_warps": config[0], "num_stages": config[1]},
        "registers": max(regs) if regs else None,
        "stack_bytes": max((s[0] for s in spills), default=None),
        "spill_store_bytes": max((s[1] for s in spills), default=None),
        "spill_load_bytes": max((s[2] for s in spills), default=None),
        "shared_bytes": compiled.metadata.shared, "shared_limit": smem_limit,
        "num_warps": compiled.metadata.num_warps,
        "compile_s": round(time.perf_counter() - t0, 2),
        **_ptx_counts(compiled.asm["ptx"]), **ptx_main_loop(compiled.asm["ptx"]),
        **ttgir_main_loop(compiled.asm["ttgir"]),
        "int32_split_offsets": int32_split_offsets(compiled.asm["ttgir"]),
    }
    if use_cache:
        os.makedirs(CACHE_DIR, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(report, f)
        os.replace(tmp, path)
    return _with_expectations(report, launch, _elem(tensors))


def _with_expectations(report, launch, elem):
    """The compiler's facts plus what the gate checks them against, computed afresh every time
    from the plan (a changed estimate or tile in the Python code is always re-checked)."""
    out = dict(report)
    if launch.kernel == "reduce":
        return {**out, "shared_estimate": None, "tile_macs": None}
    meta = {"elem": elem, "KP": launch.args.get("KP", launch.args.get("BLOCK_N")),
            "CP": launch.args.get("C1", 0) + launch.args.get("C2", 0),
            "C1": launch.args.get("C1", 0), **{
                k: launch.args[k] for k in ("BLOCK_B", "BLOCK_H", "BLOCK_M", "BLOCK_K")
                if k in launch.args}}
    stages = (report.get("config") or {}).get("num_stages", 1)
    out["shared_estimate"] = P.smem_bytes(launch.kernel, meta, stages)
    out["tile_macs"] = P.tile_macs(launch.kernel, launch.args)
    warpgroups = max(1, out["num_warps"] // 4)
    issued = out["loop_macs_per_warpgroup"] * warpgroups
    out["issued_over_useful"] = round(issued / out["tile_macs"], 4) if out["tile_macs"] else None
    if out["loop_macs_per_warpgroup"]:
        clocks = issued / (MMA_MACS_PER_CLK if elem <= 2 else MMA_MACS_PER_CLK // 2)
        out["smem_operand_bytes_per_clk"] = round(
            out["loop_smem_operand_bytes_per_warpgroup"] * warpgroups / clocks, 1)
    loads = out.get("loop_loads", 0)
    out["prefetch_distance"] = out.get("prologue_loads", 0) // loads if loads else 0
    return out


def _elem(tensors):
    """Operand bytes of a pass (its padded z)."""
    return tensors["z_pad"].element_size()


# --------------------------------------------------------------------------------- the gate matrix
GATE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "tf32": torch.float32}
GATE_OPS = ("forward", "mimic", "backward")


def gate_cases(H_values=(8000, 400000)):
    """(label, spec) for every config autotune can pick, of every kernel, at the paper shape:
    bf16, fp16 and fp32-TF32 on the gate's targets, forward, mimic and backward. A spec is plain
    data (the worker re-plans it); launches whose specialisation repeats (H, chunk offsets and loop
    counts are runtime values) are listed once."""
    seen, cases = set(), []
    for target in GATE_TARGETS:
        capability, limit = TARGETS[target]
        for dname in GATE_DTYPES:
            for H in H_values:
                for op in GATE_OPS:
                    p, launches, tensors = plan_case(dname, H, op)
                    for i, launch in enumerate(launches):
                        configs = candidates(launch, p, target)
                        if not configs:
                            cases.append((f"{target}/{dname}/H={H}/{op}/{P.KERNELS[launch.kernel]}"
                                          "/none", None))
                        for config in configs:
                            src, options, _ = _prepare(launch, tensors, config, capability)
                            key = (src.hash(), options.hash(), target)
                            if key in seen:
                                continue
                            seen.add(key)
                            label = f"{target}/{dname}/H={H}/{op}/{P.KERNELS[launch.kernel]}/" \
                                    f"{_config_label(launch, config)}"
                            # two specialisations with the same tiles keep a report each
                            n = sum(1 for x, _ in cases if x.split("#")[0] == label)
                            label += f"#{n + 1}" if n else ""
                            cases.append((label, (target, dname, H, op, i, tuple(config or ()))))
    return cases


def _config_label(launch, config):
    tiles = ",".join(f"{k}={launch.args[k]}" for k in ("BLOCK_B", "BLOCK_H", "BLOCK_M", "BLOCK_K")
                     if k in launch.args)
    if launch.kernel == "reduce":
        tiles += f",P={launch.args['P'].name}" + (",scaled" if launch.args["SCALED"] else "")
    if launch.kernel == "gemm":
        tiles += ",dV_split" if launch.args["dv_part_rows"] else ""
        tiles += ",acc" if launch.args["DZ_ACCUMULATE"] else ""
    if config is None:
        return tiles or "-"
    return f"{tiles},w{config[0]},s{config[1]}"


def candidates(launch, p, target):
    """The configs (num_warps, num_stages) the autotuner's pruning keeps for this launch on the
    target ([None]: not autotuned)."""
    if not launch.autotuned:
        return [None]
    capability, limit = TARGETS[target]
    return P.fitting_configs(launch.kernel, P.CONFIGS[launch.kernel], p.meta(launch.kernel), limit,
                             capability)


def _compile_case(case):
    label, spec = case
    if spec is None:
        return label, {"error": "the pruning keeps no config for this launch"}
    target, dname, H, op, i, config = spec
    try:
        _, launches, tensors = plan_case(dname, H, op)
        return label, compile_launch(launches[i], tensors, config or None, target)
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
    if report["kernel"] == P.KERNELS["reduce"]:
        if report.get("int32_split_offsets"):
            out.append(f"int32 split offsets: {report['int32_split_offsets'][:2]}")
        return out
    if report["target"] == "sm_90a" and not report["wgmma"]:
        out.append("no wgmma on sm_90a")
    if not (report["wgmma"] or report["mma_sync"]):
        out.append("no tensor-core MMA")
    if not (report["cp_async"] or report["tma"]):
        out.append("no async copies (cp.async / TMA) in the main loops")
    if report["atom_red"]:
        out.append(f"{report['atom_red']} reduce-adds / atomics (the design has none)")
    ratio = report.get("issued_over_useful")
    if report["target"] == "sm_90a" and (ratio is None or ratio > REPLICATION_LIMIT):
        out.append(f"replicated MMA: the main loop's wgmmas issue {ratio}x the tile's "
                   f"{report.get('tile_macs')} multiply-adds (limit {REPLICATION_LIMIT}x)")
    d = report.get("prefetch_distance", 0)
    if not (d >= 2 or (d == 1 and report.get("loads_before_first_dot"))):
        out.append(f"loads not overlapped with the MMAs: prefetch distance {d} "
                   f"({report.get('prologue_loads')} prologue / {report.get('loop_loads')} loop "
                   f"loads), loads {'before' if report.get('loads_before_first_dot') else 'after'}"
                   f" the first MMA of the loop body")
    return out


def planted_cases():
    """Configs the gate must reject, each with the rule it breaks: the evidence that its checks can
    fail (`--planted`). bf16, paper shape, H=400k."""
    p, launches, tensors = plan_case("bf16", 400000, "backward")
    bwd, dv = launches[0], launches[1]  # pass 1, pass 2 of the first chunk
    p64 = p._replace(bwd_block_h=64)
    bwd64 = P.pass_launches(p64, "backward")[0]
    pf, fl, ft = plan_case("bf16", 400000, "forward")
    f64 = P.pass_launches(pf._replace(fwd_block_b=64), "forward")[0]
    f_wide = P.pass_launches(pf._replace(fwd_block_h=64), "forward")[0]
    return [
        ("backward pass 1, 64 hidden rows on 8 warps", bwd64, tensors, (8, 3), "replicated MMA"),
        ("forward, 64 batch rows on 8 warps", f64, ft, (8, 4), "replicated MMA"),
        ("pass-2 gemm (dz + dV), 1 stage", dv, tensors, (8, 1), "loads not overlapped"),
        ("backward pass 1, 2 stages", bwd, tensors, (8, 2), "loads not overlapped"),
        ("forward, 64 hidden units, 2 stages", f_wide, ft, (8, 2), "loads not overlapped"),
    ]


def run_planted():
    """{label: (report, problems, expected)} of every planted defect."""
    out = {}
    for label, launch, tensors, config, expected in planted_cases():
        r = compile_launch(launch, tensors, config)
        out[label] = (r, problems(label, r), expected)
    return out


def main(argv=None):
    if K is None or K.INTERPRET:
        print("triton_offline: needs triton with TRITON_INTERPRET unset", file=sys.stderr)
        return 2
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m mimic_fast.ops.triton_offline",
                                description=__doc__.splitlines()[0])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--json", default=None)
    p.add_argument("--H", type=int, nargs="+", default=[8000, 400000])
    p.add_argument("--planted", action="store_true",
                   help="compile the planted defects instead: each must fail its rule")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.planted:
        planted = run_planted()
        missed = 0
        for label, (r, why, expected) in planted.items():
            hit = any(w.startswith(expected) for w in why)
            missed += not hit
            print(f"{label:<44} issued/useful {r.get('issued_over_useful')}, prefetch distance "
                  f"{r.get('prefetch_distance')}: {'; '.join(why) or 'passes'}"
                  f"{'' if hit else f'  MISSED: expected {expected!r}'}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({k: {"report": r, "problems": w, "expected": e}
                           for k, (r, w, e) in planted.items()}, f, indent=1)
        return 1 if missed else 0
    reports = run_gate(args.jobs, tuple(args.H))
    bad = 0
    print(f"{'case':<84} {'regs':>4} {'spill':>5} {'smemKB':>6} {'wgmma':>5} {'tma':>4} "
          f"{'cp.as':>5} {'issued/useful':>13} {'pref':>4} {'smemB/clk':>9} {'s':>5}")
    for label, r in reports.items():
        why = problems(label, r)
        bad += bool(why)
        if "error" in r:
            print(f"{label:<84} ERROR {r['error'][:200]}")
            continue
        ratio = r.get("issued_over_useful")
        print(f"{label:<84} {r['registers']:>4} {r['spill_store_bytes']:>5} "
              f"{r['shared_bytes'] / 1024:>6.1f} {r['wgmma']:>5} {r['tma']:>4} {r['cp_async']:>5} "
              f"{'-' if ratio is None else f'{ratio:.3f}':>13} {r.get('prefetch_distance', 0):>4} "
              f"{r.get('smem_operand_bytes_per_clk', '-'):>9} {r['compile_s']:>5}"
              + (f"  FAIL: {'; '.join(why)}" if why else ""))
    print(f"{len(reports)} kernels, {bad} failing, {time.perf_counter() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(reports, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
