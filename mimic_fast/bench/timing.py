"""Timers (wall clock on CPU, CUDA events on GPU), quantile summaries and same-run peak probes.

Every figure is a median with 20/80 quantiles over `rounds` calls after `warmup` calls. On CPU a
round is timed with perf_counter; on CUDA with a pair of events, so launch overhead between rounds
does not count but a host sync inside the op does.
"""
import os
import platform
import time

import torch

from ..ops.flops import mm_flops


def summarize(seconds):
    """median / q20 / q80 / min / mean in ms over a list of per-round seconds."""
    import numpy as np

    a = np.asarray(seconds, dtype=float) * 1e3
    return {"median_ms": float(np.median(a)), "q20_ms": float(np.quantile(a, 0.2)),
            "q80_ms": float(np.quantile(a, 0.8)), "min_ms": float(a.min()), "mean_ms": float(a.mean()),
            "rounds": int(a.size)}


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device="cpu", warmup=1, rounds=5, setup=None, max_seconds=None):
    """Per-round seconds of fn(*setup()) (setup untimed; None: fn()).

    Stops early after `max_seconds` of timed work once at least 3 rounds are in, so a slow provider
    cannot eat a suite's budget.
    """
    is_cuda = torch.device(device).type == "cuda"
    for _ in range(warmup):
        args = setup() if setup else ()
        fn(*args)
    _sync(device)
    times = []
    spent = 0.0
    for _ in range(rounds):
        args = setup() if setup else ()
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(*args)
            end.record()
            end.synchronize()
            dt = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
        times.append(dt)
        spent += dt
        if max_seconds is not None and spent > max_seconds and len(times) >= 3:
            break
    return times


def measure_matmul_peak(device="cpu", dtype=torch.float32, n=None, warmup=2, rounds=10):
    """Achieved TFLOP/s of one large square torch.mm in `dtype`: the peak figures are scored against."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = summarize(time_fn(lambda: torch.mm(a, b), device, warmup, rounds))
    return {"op": "mm", "shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), **s,
            "tflops": mm_flops(n, n, n) / (s["median_ms"] / 1e3) / 1e12}


def measure_copy_bandwidth(device="cuda", nbytes=1 << 30, warmup=3, rounds=20):
    """Achieved GB/s of a device-to-device copy (read + write counted): the bandwidth peak."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    s = summarize(time_fn(lambda: dst.copy_(src), device, warmup, rounds))
    return {"op": "copy", "bytes": 2 * nbytes, **s, "gbps": 2 * nbytes / (s["median_ms"] / 1e3) / 1e9}


def environment(device="cpu"):
    """Device name and library versions recorded with every result file."""
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "torch_cuda": torch.version.cuda, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import mimic_fast

        env["mimic_fast"] = mimic_fast.__version__
    except Exception as e:  # noqa: BLE001 - recorded, never fatal
        env["mimic_fast"] = f"unavailable: {e}"
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["device_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["compute_capability"] = f"{props.major}.{props.minor}"
    else:
        env["device"] = _cpu_name()
    return env


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def throughput(flops=None, nbytes=None, seconds=None):
    """(TFLOP/s, GB/s) for a run of `seconds`; None where a count or the time is missing."""
    if not seconds or seconds <= 0:
        return None, None
    tflops = flops / seconds / 1e12 if flops else None
    gbps = nbytes / seconds / 1e9 if nbytes else None
    return tflops, gbps


def time_interleaved(fns, device="cpu", warmup=1, rounds=5, setups=None, max_seconds=None):
    """({name: per-round seconds}, {name: error}) with the callables' rounds interleaved (a, b, c, a, ...).

    On a shared machine the load drifts; interleaving puts every provider under the same drift, so
    their ratios are much steadier than from back-to-back runs. `setups` maps a name to an untimed
    setup whose result is passed to fn (as in time_fn). A callable that raises is dropped from the
    rotation and its error returned (one failing provider must not stop the others); OOM included.
    Stops after `max_seconds` of timed work once every survivor has at least 3 rounds.
    """
    setups = setups or {}
    live = dict(fns)
    errors = {}

    def one(name, w, r):
        try:
            return time_fn(live[name], device, w, r, setups.get(name))
        except Exception as e:  # noqa: BLE001 - recorded by the caller
            errors[name] = e
            del live[name]
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            return []

    for name in list(live):
        one(name, warmup, 0)
    out = {name: [] for name in fns}
    spent = 0.0
    for i in range(rounds):
        for name in list(live):
            t = one(name, 0, 1)
            out[name] += t
            spent += sum(t)
        if max_seconds is not None and spent > max_seconds and i + 1 >= 3:
            break
    return out, errors


def peak_drift(before, after):
    """|after - before| / max of two peak measurements (TFLOP/s or GB/s); None if either is missing."""
    if not before or not after:
        return None
    return abs(after - before) / max(before, after)


DRIFT_LIMIT = 0.10  # peaks measured before and after a run that differ by more: the machine changed
