"""CI build check of csrc/cuda without a GPU: every kernel source compiles with plain nvcc.

The .cu files must not need torch's headers (the torch binding lives in cuda_ops.cpp). The binding
itself is syntax-checked against torch's headers when torch is CPU-only, with a stub for the one
generated header (c10/cuda/impl/cuda_cmake_macros.h) that a CPU wheel does not ship; a CUDA torch
builds it for real in setup.py. ~30 s of CPU in all.
"""
import ast
import glob
import os
import re
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "csrc", "cuda")
KERNEL_SOURCES = sorted(glob.glob(os.path.join(CUDA_DIR, "*.cu")))
BINDING = os.path.join(CUDA_DIR, "cuda_ops.cpp")


def _find_nvcc():
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home and os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc")


def _cuda_include_dir(nvcc):
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                  os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    for c in candidates:
        if c and os.path.exists(os.path.join(c, "include", "cuda_runtime_api.h")):
            return os.path.join(c, "include")
    return None


def _setup_nvcc_flags():
    """NVCC_FLAGS as setup.py builds the extension with them (read, not imported: setup.py runs setup())."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["NVCC_FLAGS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no NVCC_FLAGS list")


NVCC = _find_nvcc()
NVCC_FLAGS = _setup_nvcc_flags()
no_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not found (neither $CUDA_HOME/bin/nvcc nor on "
                                                   "PATH): the CUDA kernels cannot be compile-checked")


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"`{' '.join(cmd)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-6000:]}"
    return proc


def test_setup_builds_without_fast_math():
    # common.cuh's numerics (exact expf/logf, denormals kept) assume it; see setup.py's comment.
    assert "--use_fast_math" not in NVCC_FLAGS and "-use_fast_math" not in NVCC_FLAGS
    assert "-std=c++17" in NVCC_FLAGS


def test_kernel_sources_do_not_include_torch():
    assert KERNEL_SOURCES, f"no .cu files under {CUDA_DIR}"
    assert os.path.exists(BINDING)
    kernel_side = KERNEL_SOURCES + glob.glob(os.path.join(CUDA_DIR, "*.cuh")) + \
        [os.path.join(CUDA_DIR, "kernels.h")]
    pattern = re.compile(r'#\s*include\s*[<"](torch|ATen|c10)/')
    offenders = [os.path.basename(p) for p in kernel_side if pattern.search(open(p).read())]
    assert not offenders, f"kernel sources must compile without torch headers: {offenders}"


@no_nvcc
@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=os.path.basename)
def test_kernel_compiles_with_plain_nvcc(source, tmp_path):
    obj = tmp_path / (os.path.basename(source) + ".o")
    # -Werror all-warnings: a warning in our kernels (narrowing, unused results) is a bug here.
    _run([NVCC, "-c", "-arch=sm_90", *NVCC_FLAGS, "-Werror", "all-warnings", source, "-o", str(obj)])
    assert obj.stat().st_size > 0


@no_nvcc
def test_binding_passes_a_syntax_check_against_torch_headers(tmp_path):
    if torch.version.cuda is not None:
        pytest.skip("torch has CUDA: setup.py compiles and links the binding for real")
    cxx = shutil.which("c++") or shutil.which("g++")
    include = _cuda_include_dir(NVCC)
    if cxx is None or include is None:
        pytest.skip(f"no C++ compiler ({cxx}) or CUDA include directory ({include})")
    stub = tmp_path / "stub" / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    from torch.utils.cpp_extension import include_paths

    cmd = [cxx, "-std=c++17", "-fsyntax-only", "-I", str(tmp_path / "stub")]
    for p in include_paths():
        cmd += ["-I", p]
    _run(cmd + ["-I", include, BINDING])
