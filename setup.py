"""Build mimic_fast and its C++ extensions.

The CPU extension (mimic_fast._C, csrc/cpu) is always built. The CUDA extension (mimic_fast._C_cuda,
csrc/cuda) is built only when torch has CUDA and nvcc is found, unless MIMIC_FAST_SKIP_CUDA_BUILD=1.
TORCH_CUDA_ARCH_LIST and MAX_JOBS are honoured by torch's BuildExtension.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("mimic_fast needs PyTorch to build: install it first (pip install torch==2.13.0), "
             "then install this package with --no-build-isolation.")

HERE = os.path.dirname(os.path.abspath(__file__))


def _rel(paths):
    return sorted(os.path.relpath(p, HERE) for p in paths)


def cuda_build_reason():
    """Why the CUDA extension is not built, or None when it is."""
    if os.environ.get("MIMIC_FAST_SKIP_CUDA_BUILD", "0") == "1":
        return "MIMIC_FAST_SKIP_CUDA_BUILD=1"
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "nvcc not found"
    return None


extra_cpp = ["-O3", "-std=c++17"]
# No --use_fast_math: it swaps expf/logf for approximate intrinsics and flushes denormals, which the
# loss and activation kernels (csrc/cuda/common.cuh) must not depend on, and buys them nothing: they
# are memory-bound (one read and one write per element). tests/test_cuda_compile.py builds with these.
NVCC_FLAGS = ["-O3", "-std=c++17", "-lineinfo"]
# ATen's at::parallel_for is a header template: compiled without -fopenmp it runs serially (no
# INTRA_OP_PARALLEL), whatever torch.set_num_threads says. Where torch's intra-op backend is OpenMP,
# the CPU extension is built with it; at run time libgomp.so.1 resolves to the copy torch already
# loaded (same SONAME), so both share one thread pool and one thread count.
openmp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
ext_modules = [
    CppExtension(
        "mimic_fast._C",
        _rel(glob.glob(os.path.join(HERE, "csrc", "cpu", "*.cpp"))),
        extra_compile_args={"cxx": extra_cpp + openmp},
        extra_link_args=openmp,
    )
]

reason = cuda_build_reason()
if reason is None:
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
    ext_modules.append(
        CUDAExtension(
            "mimic_fast._C_cuda",
            _rel(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu"))
                 + glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cpp"))),
            extra_compile_args={"cxx": extra_cpp, "nvcc": NVCC_FLAGS},
        )
    )
else:
    print(f"mimic_fast: not building the CUDA extension ({reason})")

setup(
    name="mimic_fast",
    version="0.1.0",
    description="Fast mimic learning: fused kernels for wide shallow students with a linear bottleneck",
    packages=find_packages(include=["mimic_fast", "mimic_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "tqdm", "scikit-learn", "matplotlib", "filelock"],
    extras_require={
        "test": ["pytest", "pytest-timeout", "expecttest", "hypothesis"],
        "triton": ["triton"],
        "export": ["onnx", "onnxscript", "onnxruntime"],  # ONNX export, run in onnxruntime
    },
    entry_points={"console_scripts": ["mimic-fast = mimic_fast.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
