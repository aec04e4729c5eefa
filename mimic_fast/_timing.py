"""The one timer: callables timed with their rounds interleaved (a, b, c, a, b, c, ...).

On a shared machine the load drifts; interleaving puts every callable under the same drift, so the
ratios between them hold where back-to-back runs would not. A round is timed with perf_counter on
CPU and with a pair of CUDA events on a GPU (launch overhead between rounds does not count; a host
sync inside the callable does). Used by the benchmark harness (mimic_fast.bench) and by
`mimic-fast export --latency`; it sits in the base layer so that both can.
"""
import statistics
import time

import torch

__all__ = ["interleave", "summarize"]


def _cuda(device):
    return torch.device(device).type == "cuda"


def _time_once(fn, args, is_cuda):
    if is_cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def interleave(fns, *, device="cpu", warmup=1, rounds=5, min_rounds=3, min_seconds=0.0,
               max_seconds=None, setups=None):
    """({name: [seconds per round]}, {name: exception}) for the callables in `fns` (name -> fn).

    Each callable runs `warmup` untimed calls, then one timed call per round, in the order of
    `fns`. `setups` maps a name to an untimed setup whose result (a tuple) is passed to its fn
    (e.g. the forward before a timed backward). Rounds stop after `rounds` once `min_seconds` of
    timed work is in, or after `max_seconds` of timed work once `min_rounds` are in. A callable that
    raises (out of memory included) leaves the rotation and its exception is returned: one failing
    provider must not stop the others.
    """
    is_cuda = _cuda(device)
    setups = setups or {}
    live = list(fns)
    times = {name: [] for name in fns}
    errors = {}

    def call(name, timed):
        try:
            args = setups[name]() if name in setups else ()
            if timed:
                return _time_once(fns[name], args, is_cuda)
            fns[name](*args)
        except Exception as e:  # noqa: BLE001 - returned to the caller, who records it
            errors[name] = e
            live.remove(name)
            if is_cuda:
                torch.cuda.empty_cache()
        return None

    for name in list(live):
        for _ in range(warmup):
            if name in live:
                call(name, False)
    if is_cuda:
        torch.cuda.synchronize()
    spent, done = 0.0, 0
    while live:
        for name in list(live):
            dt = call(name, True)
            if dt is not None:
                times[name].append(dt)
                spent += dt
        done += 1
        if done >= rounds and spent >= min_seconds:
            break
        if max_seconds is not None and spent > max_seconds and done >= min_rounds:
            break
    return times, errors


def summarize(seconds):
    """median / q20 / q80 / min / mean in ms (and the round count) of per-round seconds."""
    ms = sorted(s * 1e3 for s in seconds)
    if not ms:
        raise ValueError("summarize needs at least one timed round")
    q20, q80 = (statistics.quantiles(ms, n=5, method="inclusive")[i] for i in (0, 3)) \
        if len(ms) > 1 else (ms[0], ms[0])
    return {"median_ms": statistics.median(ms), "q20_ms": q20, "q80_ms": q80, "min_ms": ms[0],
            "mean_ms": statistics.fmean(ms), "rounds": len(ms)}
