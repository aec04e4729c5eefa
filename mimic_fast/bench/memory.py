"""Peak memory of one full training step (forward + backward) per provider.

CUDA: torch.cuda.max_memory_allocated minus what was allocated before the step (parameters and
inputs). CPU: the step runs in a fresh subprocess; peak = VmHWM − VmRSS around the step, with the
high-water mark reset through /proc/self/clear_refs after a warm-up and glibc told to mmap every
block over 64 KiB, so freed tensors leave RSS and the figure is the step's own (Linux only).
"""
import gc
import json
import os
import re
import subprocess
import sys

import torch

from .providers import Case, Runner, make_inputs


def cuda_peak_bytes(fn):
    """Extra bytes allocated at the peak of fn() over what was allocated before it."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _proc_status():
    with open("/proc/self/status") as f:
        s = f.read()
    return {k: int(v) * 1024 for k, v in re.findall(r"(VmHWM|VmRSS):\s+(\d+) kB", s)}


def _reset_hwm():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_peak_bytes(fn):
    """Peak RSS growth of fn() in this process (needs Linux; meaningful only in a fresh process)."""
    gc.collect()
    base = _proc_status()["VmRSS"]
    _reset_hwm()
    fn()
    return _proc_status()["VmHWM"] - base


def cpu_peak_bytes(jobs, timeout=600):
    """[{case: Case-dict, provider: str}] -> the same dicts with peak_mem_bytes or error, measured in
    one fresh subprocess (jobs run one after another, the high-water mark reset before each)."""
    if not sys.platform.startswith("linux"):
        return [{**j, "peak_mem_bytes": None, "error": "CPU peak RSS needs Linux /proc"} for j in jobs]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "mimic_fast.bench.memory"], input=json.dumps(jobs),
                          capture_output=True, text=True, env=env, timeout=timeout)
    out = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if len(out) != len(jobs):
        err = (proc.stderr or "").strip().splitlines()[-1:] or ["no output"]
        done = {json.dumps(o["case"], sort_keys=True) + o["provider"] for o in out}
        out += [{**j, "peak_mem_bytes": None, "error": f"subprocess failed: {err[0]}"} for j in jobs
                if json.dumps(j["case"], sort_keys=True) + j["provider"] not in done]
    return out


def _child():
    torch.manual_seed(0)
    for job in json.loads(sys.stdin.read()):
        case = Case(**job["case"])
        result = dict(job)
        try:
            inputs = make_inputs(case)
            runner = Runner(job["provider"], case, inputs, job.get("compile_mode"))
            runner.full()  # warm-up: compilation, thread pools, first-touch of the allocator
            result["peak_mem_bytes"] = rss_peak_bytes(runner.full)
            result["error"] = None
        except Exception as e:  # noqa: BLE001 - one failing provider must not hide the others
            result["peak_mem_bytes"] = None
            result["error"] = f"{type(e).__name__}: {e}"[:500]
        print(json.dumps(result), flush=True)
        del inputs
        gc.collect()


if __name__ == "__main__":
    _child()
