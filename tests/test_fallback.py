"""Without the C++ extension the package still works: one warning, info() says why, auto -> reference."""
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import importlib.abc, sys, warnings

class Block(importlib.abc.MetaPathFinder):  # as if mimic_fast._C had failed to build or load
    def find_spec(self, name, path=None, target=None):
        if name == "mimic_fast._C":
            raise ImportError("simulated: _C not built")

sys.meta_path.insert(0, Block())
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import mimic_fast as mf
    from mimic_fast import dispatch
ours = [w for w in caught if "mimic_fast._C" in str(w.message)]
assert len(ours) == 1, [str(w.message) for w in caught]
assert "reference" in str(ours[0].message)
entry = mf.info()["backends"]["cpu"]
assert not entry["available"] and "simulated: _C not built" in entry["reason"], entry
x, U, V, W = torch.randn(4, 6), torch.randn(3, 6), torch.randn(10, 3), torch.randn(5, 10)
p = dispatch.Problem("mlp", x.device, x.dtype, 4, 6, 3, 10, 5, "relu")
assert dispatch.select("auto", p) == "reference"
y = mf.bottleneck_mlp(x, U, V, None, W, None)
torch.testing.assert_close(y, torch.relu(x @ U.T @ V.T) @ W.T)
try:
    mf.bottleneck_mlp(x, U, V, None, W, None, backend="cpu")
except ValueError as e:
    assert "backend 'cpu' cannot serve" in str(e) and "_C" in str(e), e
else:
    raise AssertionError("backend='cpu' did not refuse")
print("ok")
"""


def test_package_works_without_the_cpu_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")


SETUP_WITHOUT_TORCH = r"""
import importlib.abc, runpy, sys

class Block(importlib.abc.MetaPathFinder):  # as if torch were not installed
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("No module named 'torch'")

sys.meta_path.insert(0, Block())
sys.argv = ["setup.py", "--version"]
runpy.run_path("setup.py", run_name="__main__")
"""


def test_setup_py_without_torch_says_to_install_it_first():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", SETUP_WITHOUT_TORCH], capture_output=True, text=True,
                         cwd=root)
    assert out.returncode != 0
    message = out.stderr.strip().splitlines()
    assert len(message) == 1 and "needs PyTorch to build: install it first" in message[0], out.stderr



def test_bad_cuda_chunk_env_is_a_clear_error_not_an_import_failure(monkeypatch):
    env = {**os.environ, "MIMIC_FAST_CUDA_CHUNK_H": "abc"}
    imported = subprocess.run([sys.executable, "-c", "import mimic_fast"], env=env,
                              capture_output=True, text=True, timeout=120)
    assert imported.returncode == 0, imported.stderr[-2000:]
    from mimic_fast.ops import cuda

    monkeypatch.setenv("MIMIC_FAST_CUDA_CHUNK_H", "abc")
    with pytest.raises(ValueError, match="MIMIC_FAST_CUDA_CHUNK_H='abc'"):
        cuda._env_chunk_h()
