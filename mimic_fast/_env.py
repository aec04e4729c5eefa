"""The machine a figure was measured on, recorded once for every JSON we write (bench results,
demo.json, sweep.json).

Training on the CPU is deterministic for a given machine, but not across machines: MKL, oneDNN and
ATen pick their kernels (and so their summation orders) from the instruction set the CPU offers, and
the GEMMs split work by thread count. So the same command gives the same accuracies, bit for bit,
only with the same CPU model and instruction set, the same torch and triton and the same threads;
REPRODUCE names those fields and `differences` says which of them two records disagree on.
"""
import importlib.metadata
import os
import platform
import re

import torch

# Environment variables that change which instruction set the math libraries use.
ISA_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA",
                 "MKL_ENABLE_INSTRUCTIONS", "MKL_CBWR")
# The CPU flags that decide the GEMMs' kernels (AVX2, AVX-512, the bf16/fp16 matrix units).
FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_bf16",
         "amx_tile", "amx_int8")
# What must match for the demo and the sweep to reproduce accuracies exactly.
REPRODUCE = ("cpu", "cpu_id", "cpu_flags", "torch_cpu_capability", "isa_variables", "torch", "triton",
             "threads")


def _cpuinfo():
    """The first CPU's model name, its vendor/family/model/stepping (a virtual machine's model name
    can be as vague as "AMD EPYC") and its flags."""
    fields, flags = {}, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if not key and fields:  # the end of the first CPU's block
                    break
                if key == "flags":
                    flags = set(value.split())
                elif key in ("model name", "vendor_id", "cpu family", "model", "stepping"):
                    fields[key] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    ident = None
    if "cpu family" in fields:
        ident = (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model "
                 f"{fields.get('model', '?')} stepping {fields.get('stepping', '?')}")
    return name, ident, flags


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _math_libraries():
    """MKL's and oneDNN's versions as torch was built with them (from torch.__config__.show())."""
    text = torch.__config__.show()
    out = {}
    for key, pattern in (("mkl", r"Math Kernel Library Version ([\w.]+)"),
                         ("onednn", r"MKL-DNN v([\w.]+)")):
        m = re.search(pattern, text)
        out[key] = m.group(1) if m else None
    return out


def record(threads=None):
    """A JSON-ready description of this machine and software; threads defaults to torch's count."""
    name, ident, flags = _cpuinfo()
    return {
        "cpu": name,
        "cpu_id": ident,
        "cpu_count": os.cpu_count(),
        "cpu_flags": sorted(f for f in FLAGS if f in flags),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa_variables": {v: os.environ[v] for v in ISA_VARIABLES if v in os.environ},
        "threads": threads if threads is not None else torch.get_num_threads(),
        "machine": platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "mimic_fast": _version("mimic-fast"),
        **_math_libraries(),
    }


def differences(a, b):
    """The REPRODUCE fields on which two records disagree ([] when a figure should reproduce)."""
    return [k for k in REPRODUCE if a.get(k) != b.get(k)]


def describe(rec):
    """One line naming what a figure's exact reproduction needs (the REPRODUCE fields)."""
    isa = ", ".join(f"{k}={v}" for k, v in (rec.get("isa_variables") or {}).items())
    return (f"{rec.get('cpu')} ({rec.get('cpu_id') or 'model unknown'}; ATen "
            f"{rec.get('torch_cpu_capability')}; flags {' '.join(rec.get('cpu_flags') or []) or 'none'}"
            f"{'; ' + isa if isa else ''}), torch {rec.get('torch')}, triton {rec.get('triton')}, "
            f"{rec.get('threads')} thread(s)")
