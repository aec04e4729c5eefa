"""The one results schema of the benchmark harness, its one JSON writer and its loader.

A result file ("mimic_fast.bench/2") is one document:
    schema, suite, created (UTC), command (the exact command that writes this file), note,
    env (device, versions, threads), load_avg {before, after} (1/5/15-minute load averages),
    peaks / peaks_after (the ceilings measured in the same run, before and after: matmul TFLOP/s
    from the best of its interleaved rounds, and on a GPU the copy bandwidth), results [record],
    targets [target], warnings [str]; a suite may add its own top-level fields (config, profiles).
A record is one measured thing: name (unique in the file, the key `bench compare` matches on),
status ("ok" | "incorrect" | "error" | "oom" | "skipped"), error, and where timed median_ms,
q20_ms, q80_ms, min_ms, mean_ms, rounds, interleaved_with; op records add op, pass, provider, shape,
dtype, device, flops, bytes, tflops, gbps; student records model, role, metric, batch, samples_per_s.
A target is {target, measured, threshold, pass, detail} or {target, status, why} when not measured.
"""
import datetime
import json
import os
import shutil
import subprocess

import torch

from .. import _env
from .._io import atomic_write_text

SCHEMA = "mimic_fast.bench/2"
OLDER_SCHEMAS = ("mimic_fast.bench/1",)
# Every field the report and the compare read: a file without one was written by an older harness.
REQUIRED = ("schema", "suite", "created", "command", "env", "load_avg", "peaks", "peaks_after",
            "results", "targets", "warnings")


def load_average():
    """(1, 5, 15)-minute load averages, or None where the OS has none."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def new_doc(suite, command, device="cpu", note=None):
    return {"schema": SCHEMA, "suite": suite,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": command, "note": note, "env": environment(device),
            "load_avg": {"before": load_average(), "after": None}, "peaks": {}, "peaks_after": {},
            "results": [], "targets": [], "warnings": []}


def finish(doc):
    """Stamp what is known only at the end of a run (the load average after it)."""
    doc["load_avg"]["after"] = load_average()
    return doc


def write(doc, path):
    """Write `doc` to `path` atomically (a killed run leaves the previous complete file)."""
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(doc, indent=1, default=str) + "\n")


def missing_fields(doc):
    """Fields of the current schema that `doc` lacks ([] for a current document)."""
    return [k for k in REQUIRED if k not in doc]


def timed_ok(r):
    """Whether record `r` exists, is "ok" and was timed."""
    return r is not None and r.get("status") == "ok" and bool(r.get("min_ms"))


def case_H(r):
    """The student's H of an op record; of a matmul record, H of the case it was timed beside."""
    return (r.get("beside") or r["shape"])["H"]


def load(path):
    """A result document from `path`: the current schema or an older one (see missing_fields)."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") not in (SCHEMA, *OLDER_SCHEMAS):
        raise ValueError(f"{path}: not a mimic_fast.bench result file (schema "
                         f"{doc.get('schema') if isinstance(doc, dict) else None!r}, expected {SCHEMA!r})")
    if not isinstance(doc.get("results"), list):
        raise ValueError(f"{path}: no 'results' list")
    return doc


def environment(device="cpu", tools=False):
    """The machine record of `_env` (CPU model, flags, instruction-set variables, versions, threads)
    plus the device: the CPU's name, or on CUDA the GPU's name, memory, SMs and L2; tools=True adds
    nvcc, nvidia-smi and the Triton target (the GPU check's probe)."""
    env = _env.record()
    env.update(torch_cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=p.name, device_memory_gib=round(p.total_memory / 2**30, 1),
                   compute_capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                   l2_bytes=getattr(p, "L2_cache_size", None))
    else:
        env["device"] = env["cpu"]
    if tools:
        env.update(_tools(env))
    return env


def _run(cmd):
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        return (p.stdout or p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"unavailable: {e}"


def _tools(env):
    out = {}
    nvcc = shutil.which("nvcc")
    out["nvcc"] = _run([nvcc, "--version"]).splitlines()[-1] if nvcc else None
    if shutil.which("nvidia-smi"):
        out["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                                  "clocks.sm,clocks.max.sm,clocks.mem,power.limit,temperature.gpu",
                                  "--format=csv"])
    if env.get("sms") is not None:
        try:
            out["triton_target"] = str(__import__("triton").runtime.driver.active.get_current_target())
        except Exception as e:  # noqa: BLE001
            out["triton_target"] = f"unavailable: {e}"
    return out
