"""What the figures are scored against: the matmul (and on a GPU the copy) rate measured in the same
run, throughput from explicit counts, and the checks that catch an unreliable peak.

Every time here comes from the one timer (mimic_fast._timing.interleave). A peak is the best of its
rounds: the matmul's own rate can only be lower in any single round, so a figure above the best
round of the same run says the count, the timing or the peak is wrong (flagged by suites.flag_noise).
"""
import torch

from .._timing import interleave, summarize
from ..ops.flops import mm_flops

DRIFT_LIMIT = 0.10  # peaks measured before and after a run that differ by more: the machine changed


def matmul_fn(device="cpu", dtype=torch.float32, n=None):
    """(fn, flops, n): one square torch.mm in `dtype` (2048 on CPU, 8192 on a GPU), the rate every
    fraction of peak is scored against."""
    n = n or (8192 if torch.device(device).type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b)), mm_flops(n, n, n), n


def rate_record(seconds, flops=None, nbytes=None):
    """summarize() plus tflops / gbps at the median and at the best round."""
    s = summarize(seconds)
    s["tflops"], s["gbps"] = throughput(flops, nbytes, s["median_ms"] / 1e3)
    s["best_tflops"], s["best_gbps"] = throughput(flops, nbytes, s["min_ms"] / 1e3)
    return s


def measure_matmul_peak(device="cpu", dtype=torch.float32, n=None, warmup=2, rounds=10):
    """{op: mm, shape, dtype, timing, tflops (median), best_tflops (best round)}."""
    fn, fl, n = matmul_fn(device, dtype, n)
    times, errors = interleave({"mm": fn}, device=device, warmup=warmup, rounds=rounds)
    if errors:
        raise errors["mm"]
    return {"op": "mm", "shape": [n, n, n], "dtype": str(dtype).replace("torch.", ""), "flops": fl,
            **rate_record(times["mm"], fl)}


def measure_copy_bandwidth(device="cuda", nbytes=1 << 30, warmup=3, rounds=20):
    """Achieved GB/s of a device-to-device copy (read + write counted): the bandwidth peak."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times, errors = interleave({"copy": lambda: dst.copy_(src)}, device=device, warmup=warmup,
                               rounds=rounds)
    if errors:
        raise errors["copy"]
    return {"op": "copy", "bytes": 2 * nbytes, **rate_record(times["copy"], nbytes=2 * nbytes)}


def measure_peaks(device, dtype, small=False, n=None):
    """The ceilings measured now: the dtype's n³ matmul rate and, on a GPU, the device-copy bandwidth."""
    peaks = {"matmul": measure_matmul_peak(device, dtype, n=n or (256 if small else None))}
    if torch.device(device).type == "cuda":
        peaks["copy"] = measure_copy_bandwidth(device, nbytes=(1 << 24) if small else 1 << 30)
    return peaks


def throughput(flops=None, nbytes=None, seconds=None):
    """(TFLOP/s, GB/s) for a run of `seconds`; None where a count or the time is missing."""
    if not seconds or seconds <= 0:
        return None, None
    tflops = flops / seconds / 1e12 if flops else None
    gbps = nbytes / seconds / 1e9 if nbytes else None
    return tflops, gbps


def peak_drift(before, after):
    """|after - before| / max of two peak measurements (TFLOP/s or GB/s); None if either is missing."""
    if not before or not after:
        return None
    return abs(after - before) / max(before, after)


def best_peak(doc, op="mm", dtype=None):
    """The highest rate of `op` ("mm": TFLOP/s, "copy": GB/s) measured anywhere in the run, in
    `dtype` (None: any): before, after, and every interleaved record of that op; None if none was.
    The best round counts (files of the older schema have only median rates)."""
    field = "best_gbps" if op == "copy" else "best_tflops"
    peaks = [p for p in (*(doc.get("peaks") or {}).values(), *(doc.get("peaks_after") or {}).values())
             if isinstance(p, dict)]
    rows = [r for r in doc.get("results", []) if r.get("status", "ok") == "ok"]

    def wanted(r):
        return r.get("op") == op and (dtype is None or op == "copy" or r.get("dtype") == dtype)

    # a row's own median is never its peak (that would exempt it from the check against the peak)
    vals = [p.get(field) or p.get(field[5:]) for p in peaks if wanted(p)]
    vals = [v for v in vals + [r.get(field) for r in rows if wanted(r)] if v]
    return max(vals) if vals else None


def speedup(rec, base):
    """(from the best rounds, from the medians): how many times faster `rec` ran than `base`, two
    timed records of the same interleaved rounds. The best round is the least disturbed by load
    that both shared; the median is reported beside it."""
    return base["min_ms"] / rec["min_ms"], base["median_ms"] / rec["median_ms"]


def rate_fraction(rec, mm):
    """(from the best rounds, from the medians): `rec`'s FLOP rate as a fraction of the matmul
    record `mm`'s, both timed in the same interleaved rounds."""
    best = (rec["flops"] / rec["min_ms"]) / (mm["flops"] / mm["min_ms"])
    median = (rec["flops"] / rec["median_ms"]) / (mm["flops"] / mm["median_ms"])
    return best, median
